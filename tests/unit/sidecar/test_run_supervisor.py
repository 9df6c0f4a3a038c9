"""The workload's supervision with real processes: exit status, signal forwarding to the
workload's process group, killing after the grace period, signals before the start."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from sidecar.run import RunInterruptedError, WorkloadStartError
from sidecar.run.supervisor import FORWARDED_SIGNALS, WorkloadProcess, exit_status

PY = sys.executable

# A workload that records its pid (and its child's, if it starts one) and then waits.
WAITER = """
import os, signal, subprocess, sys, time
from pathlib import Path
mode, ready = sys.argv[1], Path(sys.argv[2])
if mode == "trap":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pids = [os.getpid()]
if mode == "tree":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pids.append(child.pid)
ready.write_text(" ".join(map(str, pids)))
time.sleep(60)
"""


def _wait_for(path: Path, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)
    return [int(p) for p in path.read_text().split()]


def _signal_self_when(path: Path, sig: int) -> threading.Thread:
    """Sends ``sig`` to this process once ``path`` exists (the workload is ready)."""

    def send() -> None:
        _wait_for(path)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0); it is gone once its parent reaped it.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_exit_status_follows_the_shell_convention() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGKILL) == 137


def test_the_exit_code_and_the_environment_reach_the_workload(tmp_path: Path) -> None:
    code = "import os, sys; sys.exit(int(os.environ['CODE']))"
    with WorkloadProcess([PY, "-c", code], cwd=tmp_path, grace_seconds=1) as process:
        pid = process.start({"CODE": "3", "PATH": os.environ["PATH"]})
        assert pid == process.pid
        assert process.wait() == 3
        with pytest.raises(WorkloadStartError, match="started already"):
            process.start({})


def test_sigterm_is_forwarded_to_the_workload_which_may_handle_it(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    before = {s: signal.getsignal(s) for s in FORWARDED_SIGNALS}
    with WorkloadProcess(
        [PY, "-c", WAITER, "trap", str(ready)], cwd=tmp_path, grace_seconds=10
    ) as process:
        process.start(dict(os.environ))
        _signal_self_when(ready, signal.SIGTERM)
        assert process.wait() == 7
        assert process.signals_received == (signal.SIGTERM,)
    # The handlers are restored afterwards.
    assert {s: signal.getsignal(s) for s in FORWARDED_SIGNALS} == before


def test_the_whole_process_group_gets_the_signal(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with WorkloadProcess(
        [PY, "-c", WAITER, "tree", str(ready)], cwd=tmp_path, grace_seconds=10
    ) as process:
        process.start(dict(os.environ))
        _signal_self_when(ready, signal.SIGINT)
        # Python dies of an unhandled SIGINT by re-raising it after KeyboardInterrupt.
        assert process.wait() == 128 + signal.SIGINT
        _, child = _wait_for(ready)
    # Only the root was signalled by pid; its child got the signal through the process group.
    assert _gone(child)


def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    with WorkloadProcess(
        [PY, "-c", WAITER, "ignore", str(ready)], cwd=tmp_path, grace_seconds=0.3
    ) as process:
        process.start(dict(os.environ))
        _signal_self_when(ready, signal.SIGTERM)
        started = time.monotonic()
        assert process.wait() == 128 + signal.SIGKILL
        assert time.monotonic() - started < 10


def test_signals_before_the_start_abort_the_run(tmp_path: Path) -> None:
    with WorkloadProcess([PY, "-c", "pass"], cwd=tmp_path, grace_seconds=1):
        with pytest.raises(RunInterruptedError, match="stopped by SIGTERM before the workload"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)


def test_a_missing_program_is_a_start_error(tmp_path: Path) -> None:
    with WorkloadProcess(["/nonexistent/workload"], cwd=tmp_path, grace_seconds=1) as process:
        with pytest.raises(WorkloadStartError, match="cannot start the workload"):
            process.start({})
        with pytest.raises(WorkloadStartError, match="not started"):
            process.wait()


def test_leaving_the_block_kills_a_running_workload(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with pytest.raises(RuntimeError):
        with WorkloadProcess(
            [PY, "-c", WAITER, "ignore", str(ready)], cwd=tmp_path, grace_seconds=10
        ) as process:
            process.start(dict(os.environ))
            (pid,) = _wait_for(ready)
            raise RuntimeError("the sidecar failed")
    assert _gone(pid)
