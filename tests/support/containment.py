"""The attack workloads of the containment tests, and the one place that approves and runs them.

The workloads try to keep plaintext past their session: an orphan that double-forks and calls
``setsid``, a process tree left behind by a SIGKILLed sidecar, a reader that leaves the
workload's process tree while its stream is open. They are one measured script (``run.py``,
beside the clean room's ``lib.py``); the attack comes from argv, which is measured too, so
both parties approve the script with each attack's launch before it starts.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from broker.manifests import manifest_from_files
from evidence.proto import manifest_to_pb
from tests.harness.swtpm import Swtpm
from tests.support.cleanroom import PY, WORKLOAD_FILES, CleanRoom, config_for, start_sidecar

__all__ = [
    "ATTACK_SCRIPT",
    "approve_attacks",
    "gone",
    "start_attack",
    "wait_for",
]

ATTACK_SCRIPT = """\
import os, subprocess, sys, time
from pathlib import Path

from workload import open_input
from workload.errors import WorkloadError


def wait_for(path):
    while not Path(path).exists() or not Path(path).read_text():
        time.sleep(0.01)


def publish(path, text):
    # Written whole, then renamed: a reader never sees half of it.
    Path(path + ".tmp").write_text(text)
    os.rename(path + ".tmp", path)


def orphan(ready):
    # A grandchild that reads plaintext, leaves the process group (setsid) and the tree (its
    # parent exits), and keeps what it read.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open_input("publisher") as f:
                kept = f.read()
            publish(ready, f"{os.getpid()} {len(kept)}")
            time.sleep(600)
            os._exit(0)
        wait_for(ready)
        os._exit(0)
    os.wait()
    wait_for(ready)
    return 0


def tree(ready):
    # A child in the process group and a double-forked grandchild out of it, then wait.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    escaped = ready + ".escaped"
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            publish(escaped, str(os.getpid()))
            time.sleep(600)
            os._exit(0)
        os._exit(0)
    os.wait()
    wait_for(escaped)
    publish(ready, f"{os.getpid()} {child.pid} {Path(escaped).read_text()}")
    time.sleep(600)
    return 0


def reparent(opened, go, result):
    # A reader opens a stream while in the tree, then its parent exits (it is re-parented out
    # of the tree) while the workload's root still runs; then it reads on.
    if os.fork() == 0:
        if os.fork() == 0:
            f = open_input("advertiser")
            got = len(f.read(65536))
            publish(opened, str(os.getpid()))
            wait_for(go)
            error = ""
            try:
                while True:
                    data = f.read(1 << 20)
                    if not data:
                        break
                    got += len(data)
            except WorkloadError as e:
                error = f"{type(e).__name__}: {e}"
            publish(result, f"{got}\\n{error}")
            os._exit(0)
        wait_for(opened)
        os._exit(0)
    os.wait()
    Path(go).write_text("go")
    wait_for(result)
    return 0


def main(argv):
    mode = argv[1]
    if mode == "orphan":
        return orphan(argv[2])
    if mode == "tree":
        return tree(argv[2])
    if mode == "reparent":
        return reparent(argv[2], argv[3], argv[4])
    if mode == "touch":
        Path(argv[2]).write_text("the workload ran")
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
"""


def approve_attacks(room: CleanRoom) -> None:
    """Makes ``run.py`` the attack script; both parties approve it with each launch a test
    starts (:func:`start_attack`, through ``start_sidecar``), since the clean room's own
    approvals covered the other script."""
    root = room.workload_root
    (root / "run.py").write_text(ATTACK_SCRIPT)
    room.manifest = manifest_to_pb(
        "attacks", manifest_from_files([str(root / f) for f in WORKLOAD_FILES], root=str(root))
    )
    room.approved_launches.clear()


def start_attack(
    room: CleanRoom,
    tpm: Swtpm,
    rundir: Path,
    *args: str,
    config_lines: Sequence[str] = (),
    **config: object,
) -> subprocess.Popen[str]:
    """Starts ``cleanroom sidecar run`` with the attack script and ``args`` (mode first), that
    launch approved by both parties first. ``config_lines`` are appended to the sidecar.toml
    (its last table is ``[runtime]``)."""
    path = config_for(room, tpm, rundir, **config)
    if config_lines:
        path.write_text(path.read_text() + "".join(line + "\n" for line in config_lines))
    return start_sidecar(path, PY, "-B", "run.py", *args, cwd=rundir)


def wait_for(path: Path, proc: subprocess.Popen[str] | None = None, timeout: float = 60) -> str:
    """Waits until ``path`` has content; fails early if the sidecar exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the sidecar exited ({proc.returncode}) early:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)
    return path.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    # A zombie holds nothing any more: it is dead, waiting for its parent (init) to reap it.
    return state not in (b"Z", b"X")


def gone(pids: Sequence[int], timeout: float) -> tuple[bool, float]:
    """Waits up to ``timeout`` seconds for every pid to be dead; returns (all dead, seconds)."""
    start = time.monotonic()
    while any(_alive(p) for p in pids):
        if time.monotonic() - start > timeout:
            return False, time.monotonic() - start
        time.sleep(0.005)
    return True, time.monotonic() - start


def kill_leftovers(pids: Sequence[int]) -> None:
    """Cleans up after a failing test: SIGKILLs the pids that are still alive."""
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
