"""The prepared sidecar (``cleanroom sidecar serve`` + ``sidecar run --prepared``) end to end, with
a real swtpm and a real broker process over mTLS, as in test_run.py: each run attests afresh in
a child forked from a server that holds no TPM or broker connection, no thread and no key; only
the server's uid (or root) may connect; a killed client takes its workload down; the command is
checked as for plain ``sidecar run``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.control import encode_frame
from tests.harness.swtpm import Swtpm, running_copy
from tests.support.cleanroom import (
    CLEANROOM,
    PY,
    CleanRoom,
    audit,
    build_clean_room,
    config_for,
    sidecar_env,
)

pytestmark = [pytest.mark.swtpm]

JOIN = (PY, "-B", "run.py", "join")


@pytest.fixture(scope="module")
def module_tpm(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    with running_copy(swtpm_template, tmp_path_factory.mktemp("prep-swtpm") / "state") as tpm:
        yield tpm


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanRoom]:
    room = build_clean_room(tmp_path_factory.mktemp("prep-room"))
    room.approve_launch(JOIN)
    try:
        yield room
    finally:
        assert room.broker.stop() == 0, room.broker.stderr()


@pytest.fixture
def rundir(room: CleanRoom, request: pytest.FixtureRequest) -> Path:
    path = room.directory / f"run-{request.node.name}"
    path.mkdir()
    return path


class Zygote:
    """A running ``cleanroom -v sidecar serve``, its control socket and its log file."""

    def __init__(self, config: Path, directory: Path) -> None:
        # A short path: a Unix socket's address holds 107 bytes, less than pytest's paths.
        self.base = Path(tempfile.mkdtemp(prefix="crz-"))
        self.control = self.base / "ctl" / "control"
        self.log = directory / "serve.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    str(CLEANROOM),
                    "-v",
                    "sidecar",
                    "serve",
                    "--config",
                    str(config),
                    "--control",
                    str(self.control),
                ],
                env=sidecar_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while not self.control.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the control socket did not appear"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)

    def client(self, *command: str, cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(CLEANROOM), "sidecar", "run", "--prepared", str(self.control), "--", *command],
            cwd=cwd,
            env=sidecar_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def zygote(room: CleanRoom, module_tpm: Swtpm, rundir: Path) -> Iterator[Zygote]:
    config = config_for(room, module_tpm, rundir, command=JOIN, replace_outputs=True)
    z = Zygote(config, rundir)
    try:
        yield z
    finally:
        z.stop()


def _inet_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            inodes |= {line.split()[9] for line in f.readlines()[1:]}
    return inodes


def assert_idle_holds_nothing(server: int) -> None:
    """The server and its idle spare child: one thread each, no TCP/UDP socket (the broker and
    swtpm are TCP), no /dev/tpm* open."""
    children = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    # A run that just ended may be a zombie until the server reaps it (within a second).
    spares = [int(p) for p in children if _alive(int(p))]
    assert len(spares) <= 1, spares
    for pid in [server, *spares]:
        _assert_holds_nothing(pid)


def _assert_holds_nothing(pid: int) -> None:
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nThreads:\t1\n" in status, status
    inet = _inet_inodes(pid)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        assert not target.startswith("/dev/tpm"), target
        if target.startswith("socket:["):
            assert target[len("socket:[") : -1] not in inet, f"fd {fd} is an inet socket"


def test_two_runs_each_attest_afresh_from_a_server_that_holds_nothing(
    room: CleanRoom, zygote: Zygote, rundir: Path
) -> None:
    assert_idle_holds_nothing(zygote.proc.pid)
    before = len(audit(room))
    sessions = []
    for _ in range(2):
        proc = zygote.client(*JOIN, cwd=rundir)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # The run's own one-line summary, on the client's stderr (its descriptor was passed).
        assert err.startswith("cleanroom: workload exited 0; sealed 2 output(s)"), err
        sessions.append(err.rsplit("session ", 1)[1].strip())
        # Between runs (and so before the second one is forked) the server is still idle.
        assert_idle_holds_nothing(zygote.proc.pid)
    assert sessions[0] != sessions[1]
    records = audit(room)[before:]
    attests = [r for r in records if r[0] == "attest" and r[2] == "allow"]
    assert len(attests) == 2, records
    assert len([r for r in records if r[0] == "session.end"]) == 2, records
    assert (rundir / "outputs" / "joined.csv.sealed").exists()


def test_a_command_other_than_the_configured_one_is_refused(
    room: CleanRoom, zygote: Zygote, rundir: Path
) -> None:
    ran = rundir / "ran"
    before = len(audit(room))
    proc = zygote.client(PY, "-B", "run.py", "touch", str(ran), cwd=rundir)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.splitlines() == [err.strip()] and "is not [workload] command" in err, err
    assert not ran.exists()
    assert [r for r in audit(room)[before:] if r[0] == "attest"] == []


def test_another_uid_is_refused_and_logged(zygote: Zygote) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")  # CI runs as root
    import socket

    def connect_as_nobody() -> int:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(zygote.control))
                except PermissionError:
                    code = 10  # the 0700 directory and the 0600 socket stop it
                else:
                    s.settimeout(30)
                    request = encode_frame(
                        {"version": 1, "argv": list(JOIN), "cwd": "/", "verbose": 0}
                    )
                    # Closed unanswered (refused: the send or the read may see the reset),
                    # or answered with an exit status (served).
                    try:
                        socket.send_fds(s, [request], [0, 1, 2])
                        code = 20 if s.recv(64) == b"" else 30
                    except (BrokenPipeError, ConnectionResetError):
                        code = 20
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert connect_as_nobody() == 10
    # With the file permissions opened up (a mistake), SO_PEERCRED still refuses it.
    os.chmod(zygote.base, 0o755)
    os.chmod(zygote.control.parent, 0o755)
    os.chmod(zygote.control, 0o666)
    assert connect_as_nobody() == 20
    deadline = time.monotonic() + 10
    while "refused a control connection" not in zygote.log.read_text():
        assert time.monotonic() < deadline, zygote.log.read_text()
        time.sleep(0.05)
    assert "uid 65534" in zygote.log.read_text()


def test_a_killed_client_leaves_no_workload_running(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    hang = (PY, "-B", "run.py", "hang", str(rundir / "pid"))
    room.approve_launch(hang)
    config = config_for(room, module_tpm, rundir, command=hang, grace_seconds=1)
    zygote = Zygote(config, rundir)
    try:
        client = zygote.client(*hang, cwd=rundir)
        deadline = time.monotonic() + 120
        while not (rundir / "pid").exists():
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workload = int((rundir / "pid").read_text())
        os.kill(workload, 0)  # running
        client.kill()
        client.communicate()
        deadline = time.monotonic() + 30
        while _alive(workload):
            assert time.monotonic() < deadline, "the workload outlived its killed client"
            time.sleep(0.05)
    finally:
        zygote.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_no_prepared_sidecar_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(CLEANROOM), "sidecar", "run", "--prepared", str(tmp_path / "none"), "--", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no prepared sidecar at" in proc.stderr, proc.stderr


def test_the_client_imports_nothing_heavy(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            PY,
            "-X",
            "importtime",
            "-m",
            "cleanroom.app.cli",
            "sidecar",
            "run",
            "--prepared",
            str(tmp_path / "none"),
            "--",
            "/bin/true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "sidecar.control" in modules, proc.stderr
    heavy = {
        m for m in modules if m.split(".")[0] in {"grpc", "google", "cryptography", "tpm2_pytss"}
    }
    assert heavy == set()
    assert not {m for m in modules if m.startswith(("sidecar.run", "broker", "cleanroom.v1"))}


def test_sigterm_to_the_client_stops_the_workload_with_the_run_s_status(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    hang = (PY, "-B", "run.py", "hang", str(rundir / "pid"))
    room.approve_launch(hang)
    config = config_for(room, module_tpm, rundir, command=hang, grace_seconds=5)
    zygote = Zygote(config, rundir)
    try:
        client = zygote.client(*hang, cwd=rundir)
        deadline = time.monotonic() + 120
        while not (rundir / "pid").exists():
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workload = int((rundir / "pid").read_text())
        client.send_signal(signal.SIGTERM)
        _, err = client.communicate(timeout=60)
        # The run forwarded it to the workload, which died of it: sidecar run's 128 + 15.
        assert client.returncode == 128 + signal.SIGTERM, err
        assert not _alive(workload)
        # The incomplete output was discarded, as for a stopped `sidecar run`.
        assert not (rundir / "outputs" / "partial.csv.sealed").exists()
    finally:
        zygote.stop()
