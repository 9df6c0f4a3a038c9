"""``run_workload`` with an injected TPM: the software TPM of tests/support/softtpm.py.

The sidecar takes its TPM the way python-tuf takes its fetcher: ``run_workload(config, command,
tpm_factory=...)`` opens whatever :class:`sidecar.tpm.interface.TpmDevice` the factory returns,
and the real tpm2-pytss adapter is only the default. These tests run the whole path in this
process against a real broker over mTLS (tests/support/cleanroom.py): the operator enrolls the
software AK (it has no EK for credential activation), the sidecar measures the workload into
the software PCR 23, quotes, attests, opens the released keys and runs the workload, which
reads the parties' plaintext and writes sealed outputs. A software TPM whose PCR 23 does not
match its event log is denied, and its workload never runs.

The software TPMs also look, when they are asked to quote (in the middle of the attestation),
for the workload's process that ``sidecar run`` pre-spawns: forked and contained but held
before ``exec``. A denied run's held process must exit without running the workload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from evidence.pcr import WORKLOAD_PCR
from sealing.envelope import open_bytes
from sidecar.config import TpmConfig
from sidecar.run import AttestationDeniedError, run_workload
from sidecar.run.containment import cgroup_parent
from sidecar.run.state import save_enrollment
from sidecar.runconfig import load_run_config
from sidecar.tpm.interface import QuoteResult
from tests.support.cleanroom import PY, CleanRoom, audit, running_clean_room
from tests.support.prespawn import gone, held_children
from tests.support.softtpm import SoftAk, SoftTpm

#: The [tpm] TCTI of these configs: nothing listens there, so a run that opened the real TPM
#: instead of the injected one would fail.
_NO_TPM = "swtpm:host=127.0.0.1,port=9"


class WatchingSoftTpm(SoftTpm):
    """A software TPM that records, when it quotes, the workload processes held before exec
    and whether each is in a workload cgroup already."""

    held: list[tuple[int, bool]]

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int] = (WORKLOAD_PCR,)) -> QuoteResult:
        # The sidecar forks the held process from a thread of its own, so it may take a moment
        # to appear (and its move into the cgroup another, the kernel's RCU grace period).
        deadline = time.monotonic() + 10
        while not held_children() and time.monotonic() < deadline:
            time.sleep(0.005)
        while cgroup_parent()[0] is not None and time.monotonic() < deadline:
            if all(_in_workload_cgroup(pid) for pid in held_children()):
                break
            time.sleep(0.005)
        self.held = [(pid, _in_workload_cgroup(pid)) for pid in held_children()]
        return super().quote(qualifying_data, pcrs)


def _in_workload_cgroup(pid: int) -> bool:
    try:
        return "cleanroom-workload-" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _assert_held_during_attestation(tpm: WatchingSoftTpm) -> int:
    """The one pre-spawned process seen while attesting, in its cgroup when there is one."""
    assert len(tpm.held) == 1, tpm.held
    pid, in_cgroup = tpm.held[0]
    if cgroup_parent()[0] is not None:
        assert in_cgroup, "the pre-spawned process was not in its cgroup while attesting"
    return pid


class DriftedSoftTpm(WatchingSoftTpm):
    """A software TPM whose PCR 23 gets one more extend than its event log records, as if
    something unmeasured had been loaded after the workload's files."""

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        super().extend(index, digests)
        if index == WORKLOAD_PCR:
            super().extend(index, {bank: b"\x5a" * len(d) for bank, d in digests.items()})


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanRoom]:
    with running_clean_room(tmp_path_factory.mktemp("injected-tpm-room")) as room:
        yield room


def _enrolled(room: CleanRoom, directory: Path, tpm: SoftTpm) -> Path:
    """Enrolls the software AK with the operator, records the enrollment in the sidecar's state
    directory (the software TPM has no EK to enroll by credential activation) and writes the
    sidecar's config; returns the config."""
    with room.client("operator") as operator:
        ak_name = operator.enroll_ak(tpm.ak.tpm2b_public).ak_name
    assert ak_name == tpm.ak.name_hex
    config = room.write_sidecar_config(
        directory / "sidecar.toml",
        tcti=_NO_TPM,
        outputs="outputs",
        state_dir="state",
        root=room.workload_root,
    )
    save_enrollment(directory / "state", ak_name=ak_name, broker=room.broker.grpc_address)
    return config


def _factory(tpm: SoftTpm, opened: list[TpmConfig]) -> Callable[[TpmConfig], SoftTpm]:
    """A TPM factory that hands out ``tpm`` and records the configs it was asked to open."""

    def open_tpm(config: TpmConfig) -> SoftTpm:
        opened.append(config)
        return tpm

    return open_tpm


def test_an_injected_software_tpm_attests_and_the_workload_reads_plaintext(
    room: CleanRoom, tmp_path: Path
) -> None:
    command = (PY, "-B", "run.py", "join")
    room.approve_launch(command)
    tpm = WatchingSoftTpm(SoftAk.generate("ecc"))
    config_path = _enrolled(room, tmp_path, tpm)
    opened: list[TpmConfig] = []

    result = run_workload(
        load_run_config(config_path),
        command,
        tpm_factory=_factory(tpm, opened),
    )

    assert result.exit_code == 0
    assert opened and opened[0].tcti == _NO_TPM
    held = _assert_held_during_attestation(tpm)
    assert gone(held)
    assert sorted(result.outputs) == ["insights/summary.txt", "joined.csv"]
    # The workload read both parties' plaintext: the joined rows carry the advertiser's marker,
    # sealed so that each party opens them.
    sealed = (tmp_path / "outputs" / "joined.csv.sealed").read_bytes()
    assert room.marker.encode() not in sealed
    for key in room.party_keys.values():
        joined = open_bytes(sealed, private_key=key)
        assert joined.startswith(f"0,{room.marker}-advertiser-0,0\n".encode())
    # The broker released the keys to the software AK's session, and the session ended.
    records = audit(room)
    released = [r for r in records if r[0] == "key.release" and r[2] == "allow"]
    assert {r[1] for r in released} >= {"advertiser-data", "publisher-data"}
    assert any(r[0] == "session.end" and result.session_ids[0] in r[1] for r in records)


def test_an_injected_software_tpm_whose_pcr_23_differs_is_denied(
    room: CleanRoom, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    command = (PY, "-B", "run.py", "touch", str(ran))
    room.approve_launch(command)
    tpm = DriftedSoftTpm(SoftAk.generate("ecc"))
    config_path = _enrolled(room, tmp_path, tpm)
    before = len(audit(room))

    with pytest.raises(AttestationDeniedError, match="the broker denied the release"):
        run_workload(
            load_run_config(config_path),
            command,
            tpm_factory=_factory(tpm, []),
        )

    # The process forked for the workload while attesting exited without executing it.
    held = _assert_held_during_attestation(tpm)
    assert gone(held)
    time.sleep(0.5)
    assert not ran.exists()
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    denials = [r for r in audit(room)[before:] if r[0] == "attest" and r[2] == "deny"]
    assert len(denials) == 1, denials
    # The exact reason is the audit log's: the quoted PCR 23 is not what the event log replays to.
    assert "EventLogReplayError" in denials[0][3], denials[0][3]
    assert not [r for r in audit(room)[before:] if r[0] == "key.release" and r[2] == "allow"]
