"""What each revocation does, end to end: ``cleanroom admin`` against a real broker, and
``cleanroom sidecar run`` on a real swtpm (the rows of the table in docs/operations.md).

* ``admin ak revoke``: the sidecar's AK gets no challenge; a new AK of the same TPM (the old one
  evicted) is not enrolled either, because the TPM's EK is kept out until re-admitted.
* ``admin ek revoke``: no AK of the TPM, old or new, gets a challenge.
* ``admin ek readmit``: the TPM enrolls a new AK again (the revoked AK stays revoked).

No key is released while the TPM is out, and each refusal is in the audit log.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.swtpm import Swtpm
from tests.support.cleanroom import (
    PY,
    CleanRoom,
    audit,
    run_sidecar,
    running_clean_room,
)

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

CLEANROOM = Path(sys.executable).parent / "cleanroom"
AK_HANDLE = "0x81010002"  # the sidecar's default ak_handle


@pytest.fixture
def room(tmp_path: Path) -> Iterator[CleanRoom]:
    with running_clean_room(tmp_path / "room", rows=50) as room:
        yield room


def admin(room: CleanRoom, *argv: str) -> str:
    """``cleanroom admin ARGV`` as the operator; it must succeed. Returns stdout."""
    cert, key = room.pki.cert_and_key("operator")
    proc = subprocess.run(
        [
            str(CLEANROOM),
            "admin",
            *("--broker", room.broker.grpc_address, "--cert", str(cert), "--key", str(key)),
            *("--ca", str(room.pki.ca_cert), "--server-name", "localhost"),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run(room: CleanRoom, tpm: Swtpm, name: str) -> subprocess.CompletedProcess[str]:
    """One ``sidecar run`` of the approved join workload, outputs in a directory of its own."""
    config = room.write_sidecar_config(
        room.directory / f"sidecar-{name}.toml", tcti=tpm.tcti, outputs=f"out-{name}"
    )
    return run_sidecar(config, PY, "-B", "run.py", "join", cwd=room.directory)


def evict_ak(tpm: Swtpm) -> None:
    """What whoever controls the TEE can do: evict the AK, so that the next run creates a new
    one and enrolls it."""
    tpm.tools("tpm2_evictcontrol", "-C", "o", "-c", AK_HANDLE)


def releases_after(room: CleanRoom, action: str) -> list[tuple[str, str, str, str]]:
    """The key releases recorded after the last ``action`` record."""
    records = audit(room)
    last = max(i for i, r in enumerate(records) if r[0] == action)
    return [r for r in records[last:] if r[0] == "key.release" and r[2] == "allow"]


def ek_id(room: CleanRoom) -> str:
    rows = admin(room, "ek", "list").splitlines()[1:]
    assert len(rows) == 1, rows  # one row per TPM
    return rows[0].split()[0]


def test_revoking_an_ak_keeps_its_tpm_out_until_the_ek_is_readmitted(
    room: CleanRoom, swtpm: Swtpm
) -> None:
    first = run(room, swtpm, "first")
    assert first.returncode == 0, first.stderr
    (ak_line,) = admin(room, "ak", "list").splitlines()[1:]
    ak_name = ak_line.split()[0]
    the_ek = ek_id(room)

    admin(room, "ak", "revoke", ak_name, "--reason", "test: AK leaked")
    same_ak = run(room, swtpm, "same-ak")
    assert same_ak.returncode == 1
    assert f"the broker refused a challenge: AK {ak_name} is revoked" in same_ak.stderr

    evict_ak(swtpm)
    new_ak = run(room, swtpm, "new-ak")
    assert new_ak.returncode == 1
    assert (
        f"the broker at {room.broker.grpc_address} refused the enrollment: EK {the_ek} is revoked"
        in new_ak.stderr
    ), new_ak.stderr
    assert not (room.directory / "out-new-ak").exists() or not any(
        (room.directory / "out-new-ak").iterdir()
    )
    assert releases_after(room, "ak.revoke") == []
    assert ("ak.credential", "", "deny", f"EK {the_ek} is revoked") in audit(room)
    assert ek_id(room) == the_ek
    # The EK is kept out, and says why.
    assert f"AK {ak_name} revoked: test: AK leaked" in admin(room, "ek", "list")

    # Re-admitted: the TPM's new AK (created by the refused run) enrolls; the old one stays out.
    assert f"re-admitted EK {the_ek}" in admin(
        room, "ek", "readmit", the_ek, "--reason", "test: AK replaced"
    )
    readmitted = run(room, swtpm, "readmitted")
    assert readmitted.returncode == 0, readmitted.stderr
    assert len(releases_after(room, "ek.readmit")) == 2
    aks = {line.split()[0]: line for line in admin(room, "ak", "list").splitlines()[1:]}
    assert len(aks) == 2 and " yes " in aks[ak_name]
    readmits = [r for r in audit(room) if r[0] == "ek.readmit"]
    assert readmits == [
        (
            "ek.readmit",
            the_ek,
            "allow",
            f"test: AK replaced; lifted: AK {ak_name} revoked: test: AK leaked",
        )
    ]


def test_revoking_the_ek_keeps_every_ak_of_the_tpm_out_until_readmitted(
    room: CleanRoom, swtpm: Swtpm
) -> None:
    first = run(room, swtpm, "first")
    assert first.returncode == 0, first.stderr
    the_ek = ek_id(room)
    admin(room, "ek", "revoke", the_ek, "--reason", "test: TEE retired")

    old_ak = run(room, swtpm, "old-ak")
    assert old_ak.returncode == 1
    assert "the broker refused a challenge: AK " in old_ak.stderr
    assert " is revoked" in old_ak.stderr
    evict_ak(swtpm)
    new_ak = run(room, swtpm, "new-ak")
    assert new_ak.returncode == 1
    assert f"EK {the_ek} is revoked" in new_ak.stderr, new_ak.stderr
    assert releases_after(room, "ek.revoke") == []
    denials = [r for r in audit(room) if r[2] == "deny"]
    assert ("ak.credential", "", "deny", f"EK {the_ek} is revoked") in denials
    assert ek_id(room) == the_ek

    admin(room, "ek", "readmit", the_ek)
    readmitted = run(room, swtpm, "readmitted")
    assert readmitted.returncode == 0, readmitted.stderr
    assert len(releases_after(room, "ek.readmit")) == 2
