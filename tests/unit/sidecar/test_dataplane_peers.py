"""Peer credentials and the workload process-tree predicate, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.dataplane import ProcessTree
from sidecar.dataplane.peers import is_descendant, peer_credentials, process_start_time

# A child that starts a grandchild and prints its pid, then both sleep until killed.
_PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def family() -> Iterator[tuple[int, int]]:
    """(child pid, grandchild pid)."""
    child = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    try:
        yield child.pid, grandchild
    finally:
        os.kill(grandchild, 9)
        child.kill()
        child.wait()


def test_peer_credentials_are_the_connecting_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        creds = peer_credentials(a)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert creds.start_time == process_start_time(os.getpid())


def test_tree_membership(family: tuple[int, int]) -> None:
    child, grandchild = family
    tree = ProcessTree(root_pid=child)
    uid = os.geteuid()
    assert tree(child, uid)
    assert tree(grandchild, uid)
    assert not tree(os.getpid(), uid), "the workload's parent is not in the workload's tree"
    assert not tree(1, uid)
    assert not tree(child, uid + 1), "another uid is refused"
    assert ProcessTree(root_pid=child, uid=None)(child, uid + 1)
    assert is_descendant(grandchild, os.getpid())
    assert not is_descendant(os.getpid(), child)


def test_unset_root_refuses_after_waiting() -> None:
    tree = ProcessTree(root_wait=0.05)
    start = time.monotonic()
    assert not tree(os.getpid(), os.geteuid())
    assert time.monotonic() - start >= 0.04


def test_a_late_root_is_waited_for(family: tuple[int, int]) -> None:
    child, _ = family
    tree = ProcessTree(root_wait=5)
    import threading

    threading.Timer(0.1, tree.set_root, args=(child,)).start()
    assert tree(child, os.geteuid())


def test_an_exited_root_refuses_everyone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    tree = ProcessTree(root_pid=proc.pid)
    proc.wait()
    assert not tree(proc.pid, os.geteuid())
    with pytest.raises(ValueError, match="no process"):
        tree.set_root(proc.pid)


def test_a_lineage_watch_notices_when_an_ancestor_exits(tmp_path: Path) -> None:
    # root -> middle -> leaf; the middle exits on request, re-parenting the leaf out of the tree.
    leaf_code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    middle_code = (
        "import subprocess, sys, time; from pathlib import Path\n"
        f"subprocess.Popen([sys.executable, '-c', {leaf_code!r}])\n"
        f"while not Path({str(tmp_path / 'go')!r}).exists(): time.sleep(0.01)\n"
    )
    root_code = (
        f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {middle_code!r}]);"
        " time.sleep(60)"
    )
    root = subprocess.Popen([sys.executable, "-c", root_code], stdout=subprocess.PIPE, text=True)
    assert root.stdout is not None
    leaf = int(root.stdout.readline())
    try:
        tree = ProcessTree(root_pid=root.pid)
        watch = tree.watch(leaf)
        assert watch is not None
        try:
            assert watch.intact()
            assert tree.watch(os.getpid()) is None  # not in the tree
            (tmp_path / "go").touch()
            deadline = time.monotonic() + 10
            while watch.intact():
                assert time.monotonic() < deadline, "the middle's exit was not noticed"
                time.sleep(0.01)
            # The full check agrees: the leaf left the tree.
            assert not tree(leaf, os.geteuid())
            assert tree.watch(leaf) is None
        finally:
            watch.close()
    finally:
        os.kill(leaf, signal.SIGKILL)
        root.kill()
        root.wait()
