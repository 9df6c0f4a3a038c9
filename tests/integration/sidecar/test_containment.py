"""Plaintext does not outlive the session: attacks through ``cleanroom sidecar run`` on swtpm.

Each test is an attack that worked before the workload was contained: an orphan that
double-forked and called ``setsid`` kept running with what it read; a SIGKILLed sidecar left
its workload running under init; a reader re-parented out of the workload's tree kept its
stream; a socket directory under a world-writable parent was accepted; a TPM in
dictionary-attack lockout gave a raw TSS message. The attack workloads and the way they are
approved and started live in :mod:`tests.support.containment`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.swtpm import Swtpm, running_copy
from tests.support.cleanroom import PY, CleanRoom, audit, running_clean_room
from tests.support.containment import (
    approve_attacks,
    gone,
    kill_leftovers,
    start_attack,
    wait_for,
)
from tests.support.sidecar import drive_into_lockout

pytestmark = [pytest.mark.swtpm]

#: Rows of the advertiser's input: about 40 MiB, many times what gRPC's flow-control windows
#: and the socket buffers hold, so a stream cut in the middle is seen as one.
ROWS = 900_000


@pytest.fixture(scope="module")
def module_tpm(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    with running_copy(swtpm_template, tmp_path_factory.mktemp("contain-swtpm") / "state") as tpm:
        yield tpm


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanRoom]:
    with running_clean_room(tmp_path_factory.mktemp("contain-room"), rows=ROWS) as room:
        approve_attacks(room)
        yield room


@pytest.fixture
def rundir(room: CleanRoom, request: pytest.FixtureRequest) -> Path:
    path = room.directory / f"run-{request.node.name}"
    path.mkdir()
    return path


def _in_own_cgroup(pid: int) -> bool:
    """Whether the sidecar put ``pid`` in a workload cgroup (else it fell back to a subreaper,
    on a system without a usable cgroup v2)."""
    try:
        return "cleanroom-workload-" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def test_a_double_forked_setsid_orphan_is_gone_after_the_run(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    ready = rundir / "orphan"
    proc = start_attack(room, module_tpm, rundir, "orphan", str(ready))
    orphan = 0
    try:
        text = wait_for(ready, proc)
        orphan = int(text.split()[0])
        # It holds the publisher's plaintext, outside the process group and the tree.
        assert int(text.split()[1]) == len(room.plaintexts["publisher"])
        assert os.getsid(orphan) != os.getsid(proc.pid)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        # The run is over: the orphan must be gone (not just signalled).
        dead, _ = gone([orphan], timeout=2)
        assert dead, f"the orphan {orphan} outlived the session"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers([orphan] if orphan else [])


def test_a_sigkilled_sidecar_takes_the_workload_and_its_children_down(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    ready = rundir / "tree"
    proc = start_attack(room, module_tpm, rundir, "tree", str(ready))
    pids: list[int] = []
    try:
        root, child, escaped = (int(p) for p in wait_for(ready, proc).split())
        pids = [root, child, escaped]
        contained = _in_own_cgroup(root)
        proc.kill()
        proc.wait()
        # In a cgroup every process dies with the sidecar; with the subreaper fallback the
        # parent-death signal and the watchdog reach the root and its process group, and a
        # process that left the group (setsid) is the documented limit.
        expected = pids if contained else [root, child]
        dead, seconds = gone(expected, timeout=1.0)
        assert dead, f"still running 1 s after the sidecar was killed: {expected}"
        print(f"workload gone {seconds * 1000:.0f} ms after SIGKILL (cgroup: {contained})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(pids)


def test_a_reader_that_left_the_workload_tree_has_its_stream_cut(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path
) -> None:
    opened, go, result = rundir / "opened", rundir / "go", rundir / "result"
    proc = start_attack(
        room, module_tpm, rundir, "reparent", str(opened), str(go), str(result), grace_seconds=10
    )
    try:
        reader = int(wait_for(opened, proc))
        text = wait_for(result, proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    got, error = text.split("\n", 1)
    size = len(room.plaintexts["advertiser"])
    # It read the first chunk while in the tree, then was cut well before the end.
    assert 0 < int(got) < size // 2, (got, size)
    assert error.startswith("AccessDeniedError:"), error
    assert "not part of the workload's process tree" in error
    assert re.search(
        rf"workload socket: CUT ReadInput of 'advertiser' of pid={reader} .*"
        "not in the workload's process tree",
        err,
    ), err


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket path must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="crsock-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_socket_directory_under_a_world_writable_parent_is_refused_before_attesting(
    room: CleanRoom, module_tpm: Swtpm, rundir: Path, short_dir: Path
) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    # chmod, not mkdir's mode: the umask would narrow it.
    os.chmod(shared, 0o777)
    ran = rundir / "ran"
    # The launch is approved first, so that the only records the run could add are its own.
    room.approve_launch((PY, "-B", "run.py", "touch", str(ran)))
    records_before = len(audit(room))
    proc = start_attack(
        room,
        module_tpm,
        rundir,
        "touch",
        str(ran),
        config_lines=[f'socket_dir = "{shared / "sock"}"'],
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    assert f"[runtime] socket_dir: {shared} is writable by all users without the sticky bit" in err
    assert "(mode 0777)" in err
    assert not ran.exists()
    assert not (shared / "sock").exists()
    # Refused before the TPM and the broker were used.
    assert len(audit(room)) == records_before

    # The same directory with the sticky bit (as /tmp has it) is accepted.
    os.chmod(shared, 0o1777)
    proc = start_attack(
        room,
        module_tpm,
        rundir,
        "touch",
        str(ran),
        config_lines=[f'socket_dir = "{shared / "sock"}"'],
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert ran.exists()


def test_a_tpm_in_dictionary_attack_lockout_is_one_documented_line(
    room: CleanRoom, swtpm: Swtpm, rundir: Path
) -> None:
    ran = rundir / "ran"
    # The sidecar's own state for this TPM: it enrolls its AK on the first run.
    state = f"{rundir.name}/state"
    proc = start_attack(room, swtpm, rundir, "touch", str(ran), state_dir=state)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ran.unlink()

    drive_into_lockout(swtpm, rundir)
    proc = start_attack(room, swtpm, rundir, "touch", str(ran), state_dir=state)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    assert "the TPM is in dictionary-attack lockout" in err
    assert "tpm2_dictionarylockout --clear-lockout" in err
    assert not ran.exists()

    # The fix the message names works.
    swtpm.tools("tpm2_dictionarylockout", "--clear-lockout")
    proc = start_attack(room, swtpm, rundir, "touch", str(ran), state_dir=state)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert ran.exists()
