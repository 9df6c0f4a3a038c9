"""Who is on the other end of the workload socket: kernel-reported peer credentials and the
workload process-tree check.

The kernel records the pid, uid and gid of the process that called ``connect()`` on a Unix
socket (``SO_PEERCRED``); no client can forge them. :class:`ProcessTree` decides whether such a
pid belongs to the workload: it is the workload's root process or descends from it, found by
walking the parent chain in ``/proc/<pid>/stat``. The root's start time is remembered so that a
recycled pid is not mistaken for the workload.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AllowedPeer",
    "LineageWatch",
    "PeerCredentials",
    "ProcessTree",
    "is_descendant",
    "peer_credentials",
    "process_start_time",
]

_UCRED = struct.Struct("3i")

# Deeper parent chains than this do not occur in practice; the cap bounds the walk if /proc
# changes under us.
_MAX_DEPTH = 4096


@dataclass(frozen=True)
class PeerCredentials:
    """The credentials the kernel recorded for a connected Unix socket's peer.

    ``start_time`` is the peer process's start time in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``) when it was connected, or None when it had already exited.
    """

    pid: int
    uid: int
    gid: int
    start_time: int | None


#: The caller's policy: may the process ``pid`` running as ``uid`` use the workload socket?
AllowedPeer = Callable[[int, int], bool]


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Reads ``SO_PEERCRED`` of a connected Unix stream socket.

    Raises:
        OSError: the socket is not a connected Unix socket.
    """
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return PeerCredentials(pid=pid, uid=uid, gid=gid, start_time=process_start_time(pid))


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses, so
    # split after the last closing parenthesis.
    _, sep, rest = raw.rpartition(b")")
    if not sep:
        return None
    return rest.decode("ascii", "replace").split()


def _parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def is_descendant(pid: int, root: int) -> bool:
    """True when ``pid`` is ``root`` or a descendant of it (following parent pids via /proc)."""
    current = pid
    for _ in range(_MAX_DEPTH):
        if current == root:
            return True
        if current <= 1:
            return False
        parent = _parent_pid(current)
        if parent is None:
            return False
        current = parent
    return False


class LineageWatch:
    """A process and its ancestors up to the workload's root, held as pidfds.

    A process's parent changes only when that parent exits, so while none of these processes
    has exited the process is still where it was in the tree. :meth:`intact` asks exactly that,
    with one ``poll(2)`` over the pidfds (an exited process's pidfd becomes readable): about a
    microsecond, against tens of microseconds for walking /proc again. When it says False the
    caller does the full check (which then refuses the process, or finds it elsewhere in the
    tree). Close it when the stream ends.
    """

    __slots__ = ("_fds", "_poll")

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds
        self._poll = select.poll()
        for fd in fds:
            self._poll.register(fd, select.POLLIN)

    def intact(self) -> bool:
        """True while none of the watched processes has exited."""
        return not self._fds or not self._poll.poll(0)

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def watch_lineage(pid: int, root: int) -> LineageWatch | None:
    """Pidfds of ``pid`` and each of its ancestors up to ``root``, or None when ``pid`` is not
    (or no longer) a descendant of ``root`` or the lineage changed while it was being read."""
    fds: list[int] = []
    try:
        current = pid
        for _ in range(_MAX_DEPTH):
            fields = _stat_fields(current)
            if fields is None or len(fields) < 20:
                return None
            try:
                fd = os.pidfd_open(current)
            except OSError:
                return None
            fds.append(fd)
            # The pidfd must be the process whose parent we read, not a reused pid.
            if process_start_time(current) != int(fields[19]):
                return None
            if current == root:
                watch = LineageWatch(fds)
                fds = []
                return watch
            if current <= 1:
                return None
            current = int(fields[1])
        return None
    except ValueError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


class ProcessTree:
    """An allowed-peer predicate: the workload's root process and its descendants, with a uid.

    Create it before the workload starts and call :meth:`set_root` with the workload's pid right
    after starting it. A call that arrives before :meth:`set_root` waits up to ``root_wait``
    seconds for it (a workload can connect before its parent has recorded its pid), then is
    refused. ``uid`` defaults to this process's effective uid (None: any uid).

    A process the workload started but that was re-parented (its parent exited, so it now hangs
    under init or a subreaper) is no longer in the tree and loses access, open streams included
    (the server asks again before every chunk). Limits: the check follows the process that
    connected (``SO_PEERCRED``), so a connection handed to another process (inherited across a
    fork, passed with SCM_RIGHTS) is judged by the process that made it; and the check reads
    /proc at call time, so a peer that exits and whose pid is reused by a process
    inside the tree would pass, which needs a workload-tree process to be started in between.
    """

    __slots__ = ("_root", "_root_set", "_root_start", "_root_wait", "_uid")

    def __init__(
        self, *, root_pid: int | None = None, uid: int | None = -1, root_wait: float = 5.0
    ) -> None:
        self._uid = os.geteuid() if uid == -1 else uid
        self._root: int | None = None
        self._root_start: int | None = None
        self._root_wait = root_wait
        self._root_set = threading.Event()
        if root_pid is not None:
            self.set_root(root_pid)

    def set_root(self, pid: int) -> None:
        """Names the workload's root process.

        Raises:
            ValueError: no process with that pid exists.
        """
        start = process_start_time(pid)
        if start is None:
            raise ValueError(f"no process with pid {pid}")
        self._root, self._root_start = pid, start
        self._root_set.set()

    @property
    def root_pid(self) -> int | None:
        """The workload's root pid, once set."""
        return self._root

    def __call__(self, pid: int, uid: int) -> bool:
        if pid <= 0 or (self._uid is not None and uid != self._uid):
            return False
        if not self._root_set.wait(self._root_wait):
            return False
        root = self._root
        if root is None:
            return False
        # A reused root pid would make unrelated processes look like the workload's.
        if process_start_time(root) != self._root_start:
            return False
        return is_descendant(pid, root)

    def watch(self, pid: int) -> LineageWatch | None:
        """A cheap way to learn whether ``pid`` may have left the tree since: see
        :class:`LineageWatch` (None when it is not in the tree now)."""
        root = self._root
        if root is None or process_start_time(root) != self._root_start:
            return None
        return watch_lineage(pid, root)

    def __repr__(self) -> str:
        return f"ProcessTree(root_pid={self._root}, uid={self._uid})"
