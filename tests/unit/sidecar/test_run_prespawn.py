"""The pre-spawned workload process (``WorkloadProcess.prespawn``), with real processes.

``sidecar run`` forks the workload's process into its containment while it attests, and lets it
``exec`` only after the keys were released. The promises: the held process runs none of the
workload's code before :meth:`WorkloadProcess.start`; one that is never started (the
attestation failed), or whose sidecar is killed, exits without executing; and it executes
with exactly the environment it is started with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.run import WorkloadStartError
from sidecar.run.containment import cgroup_parent
from sidecar.run.supervisor import WorkloadProcess
from tests.support.prespawn import gone, held_children, wait_for_held_child

PY = sys.executable

#: The workload: records its pid and its environment's names the moment it runs.
RECORDER = """
import os, sys
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()) + " " + ",".join(sorted(os.environ)))
"""


def test_a_prespawned_workload_runs_only_once_started(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    with WorkloadProcess([PY, "-c", RECORDER, str(ran)], cwd=tmp_path, grace_seconds=1) as p:
        p.prespawn({"ONLY": "1"})
        held = wait_for_held_child()
        if cgroup_parent()[0] is not None:
            # In its own cgroup before the start: the move is off the start's critical path.
            deadline = time.monotonic() + 10
            while "cleanroom-workload-" not in Path(f"/proc/{held}/cgroup").read_text():
                assert time.monotonic() < deadline, "the held process never joined its cgroup"
                time.sleep(0.01)
        time.sleep(0.5)
        assert not ran.exists()
        assert held_children() == [held]

        pid = p.start({"ONLY": "1"})
        assert pid == held
        assert p.wait() == 0
    recorded_pid, names = ran.read_text().split(" ", 1)
    assert int(recorded_pid) == held
    # Exactly the environment given (Python may add LC_CTYPE when it coerces a C locale).
    assert set(names.split(",")) - {"LC_CTYPE"} == {"ONLY"}


def test_a_prespawned_workload_that_is_never_started_never_runs(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    with WorkloadProcess([PY, "-c", RECORDER, str(ran)], cwd=tmp_path, grace_seconds=1) as p:
        p.prespawn({})
        held = wait_for_held_child()
        # The attestation fails here: the block is left without start().
    assert gone(held)
    time.sleep(0.5)
    assert not ran.exists()


def test_a_prespawned_workload_started_with_another_environment_gets_only_that_one(
    tmp_path: Path,
) -> None:
    ran = tmp_path / "ran"
    with WorkloadProcess([PY, "-c", RECORDER, str(ran)], cwd=tmp_path, grace_seconds=1) as p:
        p.prespawn({"OLD": "1"})
        held = wait_for_held_child()
        pid = p.start({"NEW": "1"})
        assert p.wait() == 0
    assert pid != held and gone(held)
    recorded_pid, names = ran.read_text().split(" ", 1)
    assert int(recorded_pid) == pid
    assert set(names.split(",")) - {"LC_CTYPE"} == {"NEW"}


#: A sidecar stand-in that pre-spawns the workload and is then SIGKILLed while it "attests".
KILLED_SIDECAR = """
import os, signal, sys, time
from pathlib import Path
from sidecar.run.supervisor import WorkloadProcess
from tests.support.prespawn import gone, held_children, wait_for_held_child
ran = sys.argv[1]
recorder = sys.argv[2]
with WorkloadProcess([sys.executable, "-c", recorder, ran], cwd=".", grace_seconds=1) as p:
    p.prespawn({})
    time.sleep(0.3)
    print("prespawned", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_prespawned_workload_dies_with_a_killed_sidecar(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    sidecar = subprocess.Popen(
        [PY, "-c", KILLED_SIDECAR, str(ran), RECORDER],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
    )
    try:
        held = wait_for_held_child(sidecar.pid)
        assert sidecar.stdout is not None
        assert sidecar.stdout.readline() == "prespawned\n"
        assert sidecar.wait(timeout=30) == -signal.SIGKILL
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
    # Its parent-death signal (and the end of file on its pipe) ends it; it never executes.
    assert gone(held)
    time.sleep(0.5)
    assert not ran.exists()


def test_a_prespawned_program_that_cannot_be_executed_is_a_start_error(tmp_path: Path) -> None:
    with WorkloadProcess(["/nonexistent/workload"], cwd=tmp_path, grace_seconds=1) as p:
        p.prespawn({})
        held = wait_for_held_child()
        with pytest.raises(WorkloadStartError, match="cannot start the workload"):
            p.start({})
    assert gone(held)
