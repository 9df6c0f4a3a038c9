"""Finding the workload process ``sidecar run`` pre-spawns: a fork of the sidecar held before
``exec`` (see :mod:`sidecar.run.supervisor`), which the tests watch from outside."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["gone", "held_children", "wait_for_held_child"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def held_children(parent: int | None = None) -> list[int]:
    """Children of ``parent`` (default: this process) that have not executed anything yet:
    forks whose command line is still the parent's own."""
    parent = os.getpid() if parent is None else parent
    own = _cmdline(parent)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] not in (b"Z", b"X"):
            if _cmdline(int(entry)) == own:
                found.append(int(entry))
    return found


def wait_for_held_child(parent: int | None = None, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        children = held_children(parent)
        if children:
            assert len(children) == 1, children
            return children[0]
        assert time.monotonic() < deadline, "no pre-spawned process appeared"
        time.sleep(0.01)


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.02)
    return False
