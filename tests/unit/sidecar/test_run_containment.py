"""The workload's containment with real processes, in both modes: a cgroup v2 of its own (when
this machine lets us create one: as root with a writable cgroup2 mount it does) and the child
subreaper fallback. Each mode must end an orphan that double-forked and called ``setsid``, and
a SIGKILLed supervisor must take the workload down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.run.containment import _is_subreaper, cgroup_parent, open_containment
from sidecar.run.supervisor import WorkloadProcess

PY = sys.executable
REPO = Path(__file__).resolve().parents[3]

CGROUP_PARENT, CGROUP_REASON = cgroup_parent()

MODES = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(
            CGROUP_PARENT is None, reason=f"no usable cgroup v2 here: {CGROUP_REASON}"
        ),
    ),
    "subreaper",
]

# The workload: a double-forked grandchild that leaves the process group (setsid) and records
# its pid; the workload itself exits at once.
ORPHAN = """
import os, sys, time
from pathlib import Path
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        # Written whole, then renamed: the test waits for the name to exist.
        Path(sys.argv[1] + ".tmp").write_text(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.wait()
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
"""

# The workload: a child in its process group and an escaped (setsid) grandchild, then waits.
TREE = """
import os, subprocess, sys, time
from pathlib import Path
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
escaped = sys.argv[1] + ".escaped"
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        # Written whole, then renamed: the workload waits for the name to exist.
        Path(escaped + ".tmp").write_text(str(os.getpid()))
        os.rename(escaped + ".tmp", escaped)
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.wait()
while not Path(escaped).exists():
    time.sleep(0.01)
# Written whole, then renamed: the test must never read half of it.
Path(sys.argv[1] + ".tmp").write_text(f"{os.getpid()} {child.pid} {Path(escaped).read_text()}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

# A sidecar stand-in: supervises TREE in the given mode until it is killed.
SUPERVISOR = """
import os, sys
from sidecar.run.supervisor import WorkloadProcess
mode, ready, tree = sys.argv[1], sys.argv[2], sys.argv[3]
with WorkloadProcess([sys.executable, "-c", tree, ready], cwd="/", grace_seconds=1,
                     containment=mode) as p:
    p.start(dict(os.environ))
    p.wait()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _wait_for(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)
    return path.read_text()


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _cleanup(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_a_double_forked_setsid_orphan_is_killed_at_the_end(mode: str, tmp_path: Path) -> None:
    ready = tmp_path / "orphan"
    orphan = 0
    try:
        with WorkloadProcess(
            [PY, "-c", ORPHAN, str(ready)],
            cwd=tmp_path,
            grace_seconds=1,
            containment=mode,  # type: ignore[arg-type]
        ) as process:
            process.start(dict(os.environ))
            assert process.containment is not None and process.containment.mode == mode
            assert process.wait() == 0
            orphan = int(_wait_for(ready))
            # It escaped the process group and outlived the workload: today's leftovers.
            assert _alive(orphan)
            assert orphan in process.containment.workload_pids()
            process.terminate_leftovers()
            assert not _alive(orphan)
    finally:
        _cleanup([orphan] if orphan else [])


@pytest.mark.parametrize("mode", MODES)
def test_a_sigkilled_supervisor_takes_the_workload_down(mode: str, tmp_path: Path) -> None:
    ready = tmp_path / "tree"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    supervisor = subprocess.Popen([PY, "-c", SUPERVISOR, mode, str(ready), TREE], env=env)
    pids: list[int] = []
    try:
        root, child, escaped = (int(p) for p in _wait_for(ready).split())
        pids = [root, child, escaped]
        supervisor.kill()
        supervisor.wait()
        # A cgroup takes everything down; the subreaper fallback reaches the root (parent-death
        # signal) and its process group (the watchdog), not a process that left the group.
        expected = pids if mode == "cgroup" else [root, child]
        assert _gone_within(expected, 1.0), [p for p in expected if _alive(p)]
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        _cleanup(pids)


@pytest.mark.skipif(CGROUP_PARENT is None, reason=f"no usable cgroup v2 here: {CGROUP_REASON}")
def test_the_workload_runs_in_its_own_cgroup_which_is_removed_afterwards(tmp_path: Path) -> None:
    out = tmp_path / "cgroup"
    code = "import sys; open(sys.argv[1], 'w').write(open('/proc/self/cgroup').read())"
    with WorkloadProcess([PY, "-c", code, str(out)], cwd=tmp_path, grace_seconds=1) as process:
        process.start(dict(os.environ))
        assert process.wait() == 0
        assert process.containment is not None
        cgroup = process.containment.cgroup
        assert cgroup is not None and cgroup.parent == CGROUP_PARENT
        assert cgroup.is_dir()
    # The workload saw itself in the new cgroup, from its first instruction on.
    assert f"/{cgroup.name}\n" in out.read_text()
    assert not cgroup.exists()


def test_the_subreaper_flag_is_set_for_the_run_only(tmp_path: Path) -> None:
    assert not _is_subreaper()
    with WorkloadProcess(
        [PY, "-c", "pass"], cwd=tmp_path, grace_seconds=1, containment="subreaper"
    ) as process:
        process.start(dict(os.environ))
        assert _is_subreaper()
        assert process.wait() == 0
    assert not _is_subreaper()


def test_a_child_whose_parent_died_before_the_death_signal_was_armed_kills_itself(
    tmp_path: Path,
) -> None:
    # Simulates the race: the parent it checks is not the parent it has (the sidecar "died"
    # between fork and prctl). The child must not run the workload.
    marker = tmp_path / "ran"
    containment = open_containment("subreaper")
    try:
        containment._parent_pid = 1  # the pid a re-parented orphan would see
        proc = subprocess.Popen(
            [PY, "-c", f"open({str(marker)!r}, 'w')"], preexec_fn=containment.child_setup
        )
        assert proc.wait() == -signal.SIGKILL
        assert not marker.exists()
    finally:
        containment.kill_all()
        containment.close()


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown containment mode"):
        open_containment("jail")  # type: ignore[arg-type]
