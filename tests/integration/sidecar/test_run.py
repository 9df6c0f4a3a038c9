"""``cleanroom sidecar run`` end to end: a real swtpm, a real broker process over mTLS, two
parties with their own keys, sealed inputs, and a small workload that uses the workload SDK.

Everything is set up the way people set it up: the operator adds the parties; each party
registers its data key and approves the workload through :class:`broker.client.BrokerClient`;
the sidecar enrolls its AK by credential activation (its own code, on the first run) and then
attests on every run. One broker and one TPM serve the module; the re-attestation test has its
own broker (with a two-second attestation lifetime) and its own TPM.

The helpers (:class:`CleanRoom`, :func:`build_clean_room`, :func:`start_sidecar`) are also used
by ``bench/bench_startup.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sealing.envelope import open_bytes
from sealing.errors import SealingError
from sealing.keys import generate_recipient_key
from tests.harness.azurite import Azurite
from tests.harness.swtpm import Swtpm, running_copy
from tests.support.cleanroom import (
    CLEANROOM,
    OUTPUT_RECIPIENTS,
    PARTIES,
    PY,
    WORKLOAD_FILES,
    CleanRoom,
    audit,
    config_for,
    run_sidecar,
    running_clean_room,
    sidecar_env,
    start_sidecar,
)

pytestmark = [pytest.mark.swtpm]


# --- the clean room ----------------------------------------------------------------------------


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the sidecar exited ({proc.returncode}) early:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def sealed_outputs(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def files_containing(needle: bytes, roots: Sequence[Path], *, since: float) -> list[Path]:
    """Regular files under ``roots`` changed since ``since`` that contain ``needle``."""
    found: list[Path] = []
    for root in roots:
        for dirpath, _, names in os.walk(root, onerror=lambda e: None):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                    if not path.is_file() or path.is_symlink() or st.st_mtime < since:
                        continue
                    if st.st_size > 64 << 20:
                        continue
                    if needle in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue
    return found


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_tpm(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One swtpm for the module: the AK is enrolled once and reused, as on a real machine."""
    with running_copy(swtpm_template, tmp_path_factory.mktemp("run-swtpm") / "state") as tpm:
        yield tpm


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanRoom]:
    with running_clean_room(tmp_path_factory.mktemp("clean-room")) as room:
        yield room


@pytest.fixture
def rundir(room: CleanRoom, request: pytest.FixtureRequest) -> Path:
    """The sidecar's working directory for one test (inside the clean room's directory)."""
    path = room.directory / f"run-{request.node.name}"
    path.mkdir()
    return path


# --- tests -------------------------------------------------------------------------------------


def test_two_party_join_outputs_open_for_each_party_only(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, PY, "-B", "run.py", "join", cwd=rundir)
    assert proc.returncode == 0, proc.stderr
    # One summary line, nothing else (the workload writes nothing to stderr).
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "cleanroom: workload exited 0; sealed 2 output(s) (insights/summary.txt, joined.csv); "
        "session "
    ), lines

    outputs = sealed_outputs(rundir / "outputs")
    assert sorted(outputs) == ["insights/summary.txt.sealed", "joined.csv.sealed"]
    expected_rows = room.plaintexts["advertiser"].count(b"\n") - 1
    for party, key in room.party_keys.items():
        summary = open_bytes(outputs["insights/summary.txt.sealed"], private_key=key)
        assert summary == f"rows={expected_rows}\n".encode(), party
        joined = open_bytes(outputs["joined.csv.sealed"], private_key=key)
        assert joined.startswith(f"0,{room.marker}-advertiser-0,0\n".encode())
        assert room.marker.encode() not in outputs["joined.csv.sealed"]
    with generate_recipient_key() as stranger:
        for data in outputs.values():
            with pytest.raises(SealingError):
                open_bytes(data, private_key=stranger)

    # The AK was enrolled by credential activation through the sidecar, and the session ended
    # with the exit code and the outputs.
    with room.client("operator") as operator:
        aks = operator.list_aks()
    assert [a.enrolled_by for a in aks] == ["credential-activation"]
    assert (rundir.parent / "sidecar-state" / "enrollment.json").exists()
    ends = [r for r in audit(room) if r[0] == "session.end"]
    assert ends and "exit code 0" in ends[-1][3]
    assert "joined.csv" in ends[-1][3] and "insights/summary.txt" in ends[-1][3]


def test_no_plaintext_on_disk_while_the_workload_runs(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    config = config_for(room, module_tpm, rundir)
    ready, go = rundir / "ready", rundir / "go"
    since = time.time() - 1
    proc = start_sidecar(config, PY, "-B", "run.py", "pause", str(ready), str(go), cwd=rundir)
    try:
        wait_for_file(ready, proc)
        # The workload holds both inputs in memory now; none of it may be on disk anywhere the
        # sidecar or the workload writes.
        needle = room.marker.encode()
        roots = [rundir, room.workload_root, room.directory, Path(tempfile.gettempdir())]
        assert files_containing(needle, roots, since=since) == []
        go.touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert files_containing(room.marker.encode(), [rundir], since=since) == []
    joined = open_bytes(
        (rundir / "outputs" / "joined.csv.sealed").read_bytes(),
        private_key=room.party_keys["publisher"],
    )
    assert room.marker.encode() in joined


def test_a_changed_workload_file_is_denied_before_the_workload_starts(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    changed = rundir / "workload"
    shutil.copytree(room.workload_root, changed)
    with open(changed / "lib.py", "a") as f:
        f.write("# changed after approval\n")
    ran = rundir / "ran"
    config = config_for(room, module_tpm, rundir, root=changed)
    before = len(audit(room))
    proc = run_sidecar(config, PY, "-B", "run.py", "touch", str(ran), cwd=rundir)

    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert not ran.exists()
    assert not (rundir / "outputs").exists() or not any((rundir / "outputs").iterdir())

    with room.client("operator") as operator:
        records = list(operator.list_audit_records(limit=1000))[before:]
    denials = [r for r in records if r.action == "attest" and r.decision == "deny"]
    assert len(denials) == 1
    assert "not approved by advertiser" in denials[0].reason
    assert "not approved by publisher" in denials[0].reason
    # The sidecar states what the broker told it (the class and the records), no exact reason.
    keys = {r.subject: r.sequence for r in records if r.action == "key.release"}
    assert lines[0] == (
        "cleanroom: error: the broker denied the release (NOT_APPROVED; audit record "
        f"{denials[0].sequence}; withheld: 'advertiser-data' NOT_APPROVED; audit record "
        f"{keys['advertiser-data']}, 'publisher-data' NOT_APPROVED; audit record "
        f"{keys['publisher-data']})"
    )


def _challenges(room: CleanRoom) -> int:
    return sum(1 for r in audit(room) if r[0] == "challenge")


def test_a_run_that_cannot_write_its_outputs_never_attests(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    # An earlier run's output is where this run would write its own: the run would attest,
    # get the keys, run the workload and then fail at the output. It must fail first.
    outputs = rundir / "outputs"
    outputs.mkdir()
    (outputs / "joined.csv.sealed").write_bytes(b"an earlier run's output")
    config = config_for(room, module_tpm, rundir)
    ran = rundir / "ran"
    challenges = _challenges(room)
    proc = run_sidecar(config, PY, "-B", "run.py", "touch", str(ran), cwd=rundir)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"cleanroom: error: output location {outputs} already holds outputs (joined.csv.sealed):"
        " this run could not write its own; move them away, choose another [outputs] directory,"
        " or set [outputs] replace = true to replace them\n"
    )
    assert not ran.exists()
    # No nonce was asked for: the broker's audit log shows no challenge.
    assert _challenges(room) == challenges

    # A directory the sidecar cannot write to. As root, the sidecar runs without the
    # capabilities that let root ignore file modes (setpriv), as in test_errors.py.
    (outputs / "joined.csv.sealed").unlink()
    outputs.chmod(0o500)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to drop root's DAC override"
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    try:
        denied = subprocess.run(
            [*prefix, str(CLEANROOM), "sidecar", "run", "--config", str(config), "--", PY,
             "-B", "run.py", "touch", str(ran)],
            cwd=rundir, env=sidecar_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        outputs.chmod(0o700)
    assert denied.returncode == 1
    assert denied.stderr == (
        f"cleanroom: error: cannot write to the output directory {outputs}: Permission denied\n"
    )
    assert not ran.exists()
    assert _challenges(room) == challenges

    # Told to replace what is there, the run attests and replaces it.
    (outputs / "joined.csv.sealed").write_bytes(b"an earlier run's output")
    replacing = room.write_sidecar_config(
        room.directory / f"sidecar-{rundir.name}-replace.toml",
        tcti=module_tpm.tcti,
        outputs=f"{rundir.name}/outputs",
        replace_outputs=True,
    )
    proc = run_sidecar(replacing, PY, "-B", "run.py", "join", cwd=rundir)
    assert proc.returncode == 0, proc.stderr
    assert _challenges(room) > challenges
    joined = (outputs / "joined.csv.sealed").read_bytes()
    assert open_bytes(joined, private_key=room.party_keys["advertiser"]).startswith(b"0,")
    assert sorted(p.name for p in outputs.iterdir()) == ["insights", "joined.csv.sealed"]


def test_a_tampered_input_fails_the_read_clearly(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    tampered = rundir / "advertiser.sealed"
    data = bytearray(room.sealed["advertiser"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(data)
    inputs = [
        ("advertiser", str(tampered), "advertiser-data"),
        ("publisher", str(room.sealed["publisher"]), "publisher-data"),
    ]
    config = config_for(room, module_tpm, rundir, inputs=inputs)
    proc = run_sidecar(config, PY, "-B", "run.py", "read", "advertiser", cwd=rundir)
    assert proc.returncode == 4, proc.stderr
    assert re.search(
        r"^workload: InputIntegrityError: input 'advertiser'.*failed authentication",
        proc.stderr,
        re.M,
    ), proc.stderr
    # The untouched input still reads.
    proc = run_sidecar(config, PY, "-B", "run.py", "read", "publisher", cwd=rundir)
    assert proc.returncode == 0, proc.stderr


def test_the_workload_exit_code_is_the_sidecar_exit_code(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, PY, "-B", "run.py", "exit", "3", cwd=rundir)
    assert proc.returncode == 3, proc.stderr
    ends = [r for r in audit(room) if r[0] == "session.end"]
    assert "exit code 3; outputs: none" in ends[-1][3]


def test_sigterm_stops_the_workload_and_leaves_no_complete_looking_output(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    config = config_for(room, module_tpm, rundir)
    ready = rundir / "ready"
    proc = start_sidecar(config, PY, "-B", "run.py", "hang", str(ready), cwd=rundir)
    try:
        wait_for_file(ready, proc)
        workload_pid = int(ready.read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    with pytest.raises(ProcessLookupError):
        os.kill(workload_pid, 0)
    outputs = rundir / "outputs"
    assert not (outputs / "partial.csv.sealed").exists()
    # Whatever is left in the output directory does not open as a complete output.
    for leftover in (p for p in outputs.rglob("*") if p.is_file()):
        for key in room.party_keys.values():
            with pytest.raises(SealingError):
                open_bytes(leftover.read_bytes(), private_key=key)
    ends = [r for r in audit(room) if r[0] == "session.end"]
    assert f"exit code {128 + signal.SIGTERM}; outputs: none" in ends[-1][3]


SIBLING = """\
import sys

import workload
from workload.errors import AccessDeniedError

try:
    workload.list_inputs()
except AccessDeniedError as e:
    print(f"denied: {e}")
    sys.exit(0)
print("served")
sys.exit(1)
"""


def test_a_process_outside_the_workload_tree_is_refused_by_the_run_socket(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    config = config_for(room, module_tpm, rundir)
    published, go = rundir / "socket-path", rundir / "go"
    proc = start_sidecar(config, PY, "-B", "run.py", "socket", str(published), str(go), cwd=rundir)
    try:
        wait_for_file(published, proc)
        socket_path = published.read_text()
        # A sibling: started by the test, same user, not a descendant of the workload.
        env = sidecar_env()
        env["CLEANROOM_WORKLOAD_SOCKET"] = socket_path
        sibling = subprocess.Popen(
            [PY, "-c", SIBLING],
            env=env,
            cwd=rundir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sibling_out, sibling_err = sibling.communicate(timeout=60)
        go.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sibling.returncode == 0, (sibling_out, sibling_err)
    assert sibling_out.startswith("denied: list inputs: this process is not part of the "), (
        sibling_out
    )
    # The workload itself is still served, after the refusal.
    assert proc.returncode == 0, err
    size = len(room.plaintexts["advertiser"])
    assert f"workload served: advertiser,publisher {size}" in out
    assert re.search(
        rf"workload socket: DENIED ListInputs from pid={sibling.pid} uid={os.getuid()} .*"
        "not in the workload's process tree",
        err,
    ), err
    assert not Path(socket_path).exists()


def test_failures_before_the_start_are_one_clear_line(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path, tmp_path: Path
) -> None:
    ran = rundir / "ran"
    cases: list[tuple[Path, str]] = []
    # No TPM listening at the configured TCTI.
    from tests.harness.net import free_port

    no_tpm = room.write_sidecar_config(
        rundir / "no-tpm.toml",
        tcti=f"swtpm:host=127.0.0.1,port={free_port()}",
        outputs="outputs",
        root=room.workload_root,
        inputs=[("advertiser", str(room.sealed["advertiser"]), "advertiser-data")],
    )
    cases.append((no_tpm, "cleanroom: error: cannot reach the TPM through TCTI"))
    # No broker listening: the retries run out.
    no_broker = room.write_sidecar_config(
        rundir / "no-broker.toml",
        tcti=module_tpm.tcti,
        outputs="outputs",
        root=room.workload_root,
        state_dir=str(room.directory / "sidecar-state"),
        target=f"127.0.0.1:{free_port()}",
        retries=2,
        inputs=[("advertiser", str(room.sealed["advertiser"]), "advertiser-data")],
    )
    cases.append((no_broker, "cleanroom: error: cannot reach the broker at 127.0.0.1:"))
    # An input whose key nobody registered.
    unknown_key = room.write_sidecar_config(
        rundir / "unknown-key.toml",
        tcti=module_tpm.tcti,
        outputs="outputs",
        root=room.workload_root,
        state_dir=str(room.directory / "sidecar-state"),
        inputs=[
            ("advertiser", str(room.sealed["advertiser"]), "advertiser-data"),
            ("extra", str(room.sealed["publisher"]), "nobody-registered-this"),
        ],
    )
    cases.append(
        (
            unknown_key,
            "cleanroom: error: the broker withheld data key 'nobody-registered-this' of "
            "required input 'extra' (NOT_APPROVED; audit record ",
        )
    )
    for config, expected in cases:
        proc = run_sidecar(config, PY, "-B", "run.py", "touch", str(ran), cwd=rundir)
        assert proc.returncode == 1, (config.name, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, (config.name, proc.stderr)
        assert proc.stderr.startswith(expected), (config.name, proc.stderr)
        assert not ran.exists()
    # A command named by a bare name (looked up on PATH) is refused before anything is
    # contacted: the sidecar runs only an absolute path.
    proc = run_sidecar(no_tpm, "no-such-workload-binary", cwd=rundir, approve=False)
    assert proc.returncode == 1
    assert proc.stderr == (
        "cleanroom: error: workload command: the command's first word "
        "'no-such-workload-binary' must be an absolute path (such as "
        "/usr/bin/no-such-workload-binary): the sidecar executes exactly the measured path and "
        "never searches PATH\n"
    )


def test_inputs_and_outputs_in_azure_blob(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path, azurite: Azurite, blob_container: str
) -> None:
    from azure.storage.blob import BlobServiceClient

    container = blob_container.rsplit("/", 1)[1]
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        client = service.get_container_client(container)
        for party in PARTIES:
            client.upload_blob(f"in/{party}.csv.sealed", room.sealed[party].read_bytes())
        inputs = [
            (party, f"{blob_container}/in/{party}.csv.sealed", f"{party}-data") for party in PARTIES
        ]
        config = config_for(
            room, module_tpm, rundir, inputs=inputs, outputs=f"{blob_container}/out"
        )
        # The blob credentials come from the environment, as the blob docs recommend; the
        # workload must not inherit them.
        env = sidecar_env()
        env["CLEANROOM_BLOB_CONNECTION_STRING"] = azurite.connection_string()
        env["CLEANROOM_SIDECAR_BROKER_RETRIES"] = "3"
        seen = rundir / "workload-env"
        # An output already under the prefix: refused before any nonce is asked for.
        client.upload_blob("out/joined.csv.sealed", b"an earlier run's output")
        challenges = _challenges(room)
        proc = start_sidecar(config, PY, "-B", "run.py", "env", str(seen), cwd=rundir, env=env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        assert err.startswith(
            f"cleanroom: error: output location {blob_container}/out already holds outputs "
            f"(azure://{blob_container.removeprefix('azure://')}/out/joined.csv.sealed): "
        ), err
        assert not seen.exists() and _challenges(room) == challenges
        # With [outputs] replace, the run goes ahead and replaces it.
        env["CLEANROOM_SIDECAR_OUTPUTS_REPLACE"] = "true"
        proc = start_sidecar(config, PY, "-B", "run.py", "env", str(seen), cwd=rundir, env=env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert seen.read_text() == "CLEANROOM_WORKLOAD_SOCKET"
        names = sorted(b.name for b in client.list_blobs(name_starts_with="out/"))
        assert names == ["out/insights/summary.txt.sealed", "out/joined.csv.sealed"]
        joined = client.download_blob("out/joined.csv.sealed").readall()
    finally:
        service.close()
    assert room.marker.encode() not in joined
    for key in room.party_keys.values():
        assert open_bytes(joined, private_key=key).startswith(b"0,")
    assert not (rundir / "outputs").exists()


def test_time_to_first_plaintext_byte(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(room, module_tpm, rundir)
    env = sidecar_env(pycache=rundir / "pycache")
    # The first run may enroll and fills the bytecode cache; the measured runs are the steady
    # state ("once enrolled").
    warm_up = start_sidecar(config, PY, "-B", "run.py", "first-byte", cwd=rundir, env=env)
    assert warm_up.wait(timeout=60) == 0
    figures = []
    for _ in range(3):
        t0 = time.monotonic()
        proc = start_sidecar(config, PY, "-B", "run.py", "first-byte", cwd=rundir, env=env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        first = float(out.split("first-byte ", 1)[1].split()[0])
        figures.append((first - t0) * 1000)
    with capsys.disabled():
        print(
            f"\n[sidecar run] time to first plaintext byte: "
            f"{', '.join(f'{f:.0f}' for f in figures)} ms (best {min(figures):.0f} ms)"
        )
    # Not a timed test (the machine is shared); a sanity bound only. bench/bench_startup.py
    # reports the figure against its baseline.
    assert min(figures) < 5000


# --- re-attestation ----------------------------------------------------------------------------


@pytest.fixture
def short_lived_room(tmp_path: Path) -> Iterator[CleanRoom]:
    with running_clean_room(tmp_path / "room", attestation_lifetime_seconds=2.0) as room:
        yield room


@pytest.mark.slow
def test_reattestation_after_expiry_and_revocation_stops_reads(
    short_lived_room: CleanRoom, swtpm: Swtpm
) -> None:
    room = short_lived_room
    rundir = room.directory / "run"
    rundir.mkdir()
    config = room.write_sidecar_config(
        room.directory / "sidecar.toml", tcti=swtpm.tcti, outputs="run/outputs"
    )
    ready1, go1, ready2, go2 = (rundir / n for n in ("ready1", "go1", "ready2", "go2"))
    proc = start_sidecar(
        config,
        PY,
        "-B",
        "run.py",
        "reattest",
        *(str(p) for p in (ready1, go1, ready2, go2)),
        "2.5",
        cwd=rundir,
    )
    try:
        wait_for_file(ready1, proc)
        attests = [r for r in audit(room) if r[0] == "attest" and r[2] == "allow"]
        go1.touch()
        wait_for_file(ready2, proc)
        # The long pause outlived the two-second attestation; the read re-attested.
        after = [r for r in audit(room) if r[0] == "attest" and r[2] == "allow"]
        assert len(after) > len(attests)
        with room.client("operator") as operator:
            (ak,) = operator.list_aks()
            operator.revoke_ak(ak.ak_name, reason="test: machine retired")
        go2.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "second read ok" in out
    assert proc.returncode == 5, err
    # The workload learns that the data stopped; the sidecar's log says why.
    assert re.search(
        r"^workload: InputUnavailableError: input 'advertiser'.*re-attestation failed", err, re.M
    ), err
    assert re.search(r"^WARNING .*re-attestation failed: .*AK \w+ is revoked", err, re.M), err
    challenges = [r for r in audit(room) if r[0] == "challenge" and r[2] == "deny"]
    assert challenges and "revoked" in challenges[-1][3]
    ends = [r for r in audit(room) if r[0] == "session.end"]
    assert len(ends) == len(after) and all("exit code 5" in e[3] for e in ends)


# --- the launch: what runs is what the parties approved ----------------------------------------
#
# Each attack below got the advertiser's plaintext before the launch was measured: the sidecar
# ran whatever command, interpreter and environment it was started with.


def _read_plaintext_command(marker_file: Path) -> tuple[str, ...]:
    """An unapproved command that would write the advertiser's plaintext to ``marker_file``."""
    code = (
        "import workload, pathlib; "
        f"pathlib.Path({str(marker_file)!r}).write_bytes(workload.open_input('advertiser').read())"
    )
    return (PY, "-c", code)


def _reason_for(room: CleanRoom, key_id: str, before: int) -> str:
    reasons = [r[3] for r in audit(room)[before:] if r[:3] == ("key.release", key_id, "deny")]
    assert reasons, audit(room)[before:]
    return reasons[-1]


def test_another_argv_gets_no_key(room: CleanRoom, module_tpm: Swtpm, rundir: Path) -> None:
    room.approve_launch((PY, "-B", "run.py", "join"))
    stolen = rundir / "stolen"
    config = config_for(room, module_tpm, rundir)
    before = len(audit(room))
    proc = run_sidecar(config, *_read_plaintext_command(stolen), cwd=rundir, approve=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("cleanroom: error: the broker denied the release (NOT_APPROVED")
    assert not stolen.exists()
    reason = _reason_for(room, "advertiser-data", before)
    assert "launch differs from the approved launch (command: approved `" in reason, reason
    assert f", measured `{PY} -c " in reason, reason


def _hijacking_python(directory: Path, marker: Path) -> Path:
    """A ``python`` that records that it ran, then runs the real interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "python"
    fake.write_text(f'#!/bin/sh\necho hijacked > "{marker}"\nexec "{PY}" "$@"\n')
    fake.chmod(0o755)
    return fake


def test_another_interpreter_first_on_path_never_runs(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    marker = rundir / "hijacked"
    fake = _hijacking_python(rundir / "evil-bin", marker)
    env = sidecar_env()
    env["PATH"] = f"{fake.parent}:{env.get('PATH', os.defpath)}"
    # A bare name would be looked up on PATH: refused before anything is attested.
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, "python", "run.py", "join", cwd=rundir, env=env, approve=False)
    assert proc.returncode == 1
    assert "must be an absolute path" in proc.stderr and "never searches PATH" in proc.stderr
    assert not marker.exists()
    # The same interpreter named by its absolute path: another executable, so no key.
    before = len(audit(room))
    proc = run_sidecar(config, str(fake), "run.py", "join", cwd=rundir, env=env, approve=False)
    assert proc.returncode == 1, proc.stderr
    assert not marker.exists()
    reason = _reason_for(room, "advertiser-data", before)
    assert f"executable: approved '{PY}', measured '{fake}'" in reason, reason
    # The approved launch, from [workload] command, runs the approved interpreter whatever
    # PATH says.
    command = (PY, "-B", "run.py", "join")
    room.approve_launch(command)
    config = config_for(room, module_tpm, rundir, command=command)
    proc = run_sidecar(config, cwd=rundir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert (rundir / "outputs" / "joined.csv.sealed").exists()


def test_an_interpreter_changed_after_approval_gets_no_key(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    # The parties approve an interpreter at a fixed path (a wrapper here); it is then replaced.
    interpreter = rundir / "bin" / "py"
    interpreter.parent.mkdir()
    interpreter.write_text(f'#!/bin/sh\nexec "{PY}" "$@"\n')
    interpreter.chmod(0o755)
    command = (str(interpreter), "-B", "run.py", "join")
    room.approve_launch(command)
    approved = room.launch(command).executable_sha256.hex()
    marker = rundir / "tampered"
    interpreter.write_text(f'#!/bin/sh\necho tampered > "{marker}"\nexec "{PY}" "$@"\n')
    config = config_for(room, module_tpm, rundir, command=command)
    before = len(audit(room))
    proc = run_sidecar(config, cwd=rundir, approve=False)
    assert proc.returncode == 1, proc.stderr
    assert not marker.exists()
    measured = room.launch(command).executable_sha256.hex()
    assert _reason_for(room, "advertiser-data", before).endswith(
        f"(interpreter digest: approved sha256 {approved}, measured {measured})"
    )


def test_an_injected_pythonpath_sitecustomize_never_reaches_the_workload(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    inject, marker = rundir / "inject", rundir / "injected"
    inject.mkdir()
    # Only in the workload (the sidecar is Python too, and loads it as well).
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if 'CLEANROOM_WORKLOAD_SOCKET' in os.environ:\n"
        f"    open({str(marker)!r}, 'w').write('injected')\n"
    )
    env = sidecar_env()
    env["PYTHONPATH"] = str(inject)
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, PY, "-B", "run.py", "join", cwd=rundir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    # Put in the measured environment instead, it is not what the parties approved.
    config = config_for(
        room,
        module_tpm,
        rundir,
        command=(PY, "-B", "run.py", "join"),
        env={"PYTHONPATH": str(inject)},
        # The first run's outputs are there: without this the preflight stops before attesting.
        replace_outputs=True,
    )
    before = len(audit(room))
    proc = run_sidecar(config, cwd=rundir)
    assert proc.returncode == 1, proc.stderr
    assert not marker.exists()
    assert _reason_for(room, "advertiser-data", before).endswith(
        "(environment: not approved PYTHONPATH)"
    )


_PRELOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void hook(void) {
    /* Only in the workload: the sidecar itself is started with the same environment. */
    if (getenv("CLEANROOM_WORKLOAD_SOCKET") != NULL) {
        FILE *f = fopen(MARKER, "w");
        if (f) { fputs("preloaded", f); fclose(f); }
    }
}
"""


def test_ld_preload_never_reaches_the_workload(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    marker = rundir / "preloaded"
    source, library = rundir / "hook.c", rundir / "hook.so"
    source.write_text(_PRELOAD_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)],
        check=True,
        timeout=60,
    )
    env = sidecar_env()
    env["LD_PRELOAD"] = str(library)
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, PY, "-B", "run.py", "join", cwd=rundir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_admin_variables_never_reach_the_workload(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    seen = rundir / "env-seen"
    env = sidecar_env()
    env["CLEANROOM_ADMIN_CERT"] = str(room.pki.cert_and_key("operator").cert)
    env["CLEANROOM_ADMIN_KEY"] = str(room.pki.cert_and_key("operator").key)
    env["CLEANROOM_ADMIN_CA"] = str(room.pki.ca_cert)
    env["TSS2_LOG"] = "all+NONE"
    config = config_for(room, module_tpm, rundir)
    proc = run_sidecar(config, PY, "-B", "run.py", "env", str(seen), cwd=rundir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert seen.read_text() == "CLEANROOM_WORKLOAD_SOCKET"


#: A package that Python imports instead of the measured ``lib.py`` beside it (a directory
#: package wins over a module of the same name), reading the advertiser's plaintext on import.
_SHADOW_LIB = """
import os, pathlib
if "CLEANROOM_WORKLOAD_SOCKET" in os.environ:
    from workload import open_input
    pathlib.Path({marker!r}).write_bytes(open_input("advertiser").read())
def join(a, b):
    return []
"""


def _plant(root: Path, how: str, marker: Path) -> Path:
    """Puts code that steals the plaintext where Python loads it instead of ``lib.py``;
    returns the directory planted."""
    source = _SHADOW_LIB.format(marker=str(marker))
    if how == "package":
        (root / "lib").mkdir()
        (root / "lib" / "__init__.py").write_text(source)
        return root / "lib"
    # Bytecode whose header carries the measured lib.py's modification time and size: Python
    # takes it as lib.py's up-to-date cache and runs it instead of the source (-B only stops
    # it from writing caches, not from reading them).
    stat = (root / "lib.py").stat()
    code = compile(source, str(root / "lib.py"), "exec")
    data = importlib._bootstrap_external._code_to_timestamp_pyc(  # type: ignore[attr-defined]
        code, int(stat.st_mtime), stat.st_size
    )
    cache = Path(importlib.util.cache_from_source(str(root / "lib.py")))
    cache.parent.mkdir()
    cache.write_bytes(data)
    return cache.parent


@pytest.mark.parametrize("how", ["package", "pycache"])
def test_unmeasured_code_in_the_workload_root_is_refused_before_attesting(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path, how: str
) -> None:
    # The measured files and the approved launch are untouched; the operator only adds code
    # that the interpreter loads from the workload's directory. Before the workload tree was
    # checked, the planted code ran with the released keys and wrote the plaintext.
    stolen = rundir / "stolen"
    planted = _plant(room.workload_root, how, stolen)
    try:
        config = config_for(room, module_tpm, rundir)
        before = len(audit(room))
        proc = run_sidecar(config, PY, "-B", "run.py", "join", cwd=rundir)
        assert not stolen.exists(), "the planted code read the plaintext"
        assert proc.returncode == 1, proc.stderr
        assert "holds what the parties did not approve: " in proc.stderr, proc.stderr
        assert f"{planted.name}/" in proc.stderr, proc.stderr
        # Refused before any challenge: nothing was attested, no key was released.
        attested = [
            r for r in audit(room)[before:] if r[0] in ("challenge", "attest", "key.release")
        ]
        assert attested == []
    finally:
        shutil.rmtree(planted)


def _pcr23(tpm: Swtpm) -> str:
    out = tpm.tools("tpm2_pcrread", "sha256:23").stdout
    return out.split("23:", 1)[1].split()[0].lower().removeprefix("0x")


def test_the_parties_and_sidecar_measure_predict_the_pcr_23_of_a_run(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    command = f"{PY} -B run.py join"
    launch_options = ["--command", command, "--env", "LANG=C.UTF-8", "--env", "SEED=7"]
    files = [str(room.workload_root / f) for f in WORKLOAD_FILES]
    predicted = set()
    for party in PARTIES:
        cert, key = room.pki.cert_and_key("party", party)
        proc = subprocess.run(
            [
                str(CLEANROOM),
                "admin",
                "--broker",
                room.broker.grpc_address,
                "--ca",
                str(room.pki.ca_cert),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--json",
                "workload",
                "approve",
                "--name",
                "join",
                "--key",
                f"{party}-data",
                "--recipient",
                *OUTPUT_RECIPIENTS,
                "--root",
                str(room.workload_root),
                "--file",
                *files,
                *launch_options,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=sidecar_env(),
        )
        assert proc.returncode == 0, proc.stderr
        predicted.add(json.loads(proc.stdout)["expected_pcrs"]["sha256"])
    offline = subprocess.run(
        [
            str(CLEANROOM),
            "sidecar",
            "measure",
            "--offline",
            *launch_options,
            "--workdir",
            str(room.workload_root),
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=sidecar_env(),
    )
    assert offline.returncode == 0, offline.stderr
    predicted.add(offline.stdout.split("sha256:23 0x", 1)[1].split()[0].lower())

    config = config_for(
        room,
        module_tpm,
        rundir,
        command=(PY, "-B", "run.py", "join"),
        env={"LANG": "C.UTF-8", "SEED": "7"},
    )
    proc = run_sidecar(config, cwd=rundir, approve=False)
    assert proc.returncode == 0, proc.stderr
    assert predicted == {_pcr23(module_tpm)}
