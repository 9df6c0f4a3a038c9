"""Keeping every process of the workload inside its session: a cgroup, or a child subreaper.

Plaintext must not outlive the session, so no process the workload starts may outlive the
sidecar's run. A process group is not enough: a grandchild that forks twice and calls
``setsid()`` leaves it. Two mechanisms, chosen at start (``mode="auto"``):

``cgroup``
    When a cgroup v2 hierarchy is mounted and this process may create a child of its own cgroup
    and move processes into it (root, or a delegated subtree such as systemd's
    ``Delegate=yes``), and the kernel has ``cgroup.kill`` (Linux 5.14), the workload joins a
    fresh cgroup between ``fork()`` and ``exec()``, before it can run any code of its own.
    Forking, ``setsid`` and re-parenting do not leave a cgroup, so at the end one write to
    ``cgroup.kill`` ends every descendant, however it detached itself. (A workload that writes
    its pid into another cgroup's ``cgroup.procs``, which its user may, does leave it: the
    cgroup contains daemonising, not a deliberate escape by the approved code.)

``subreaper``
    Otherwise the sidecar becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): a workload
    process whose parent exits is re-parented to the sidecar instead of init, so it stays in
    the sidecar's process tree and the sidecar can find and kill it at the end (every process
    that descends from the workload or was re-parented to the sidecar after the workload
    started).

In both modes the workload's root process gets a parent-death signal (``PR_SET_PDEATHSIG``,
SIGKILL): if the sidecar dies, even by SIGKILL, the kernel kills the workload's root. The
signal is tied to the thread that forked the child, so the workload must be started from a
thread that lives as long as the run (``sidecar run`` starts it from its main thread); and the
child checks ``getppid()`` after setting it, since the sidecar may have died in between.

A parent-death signal reaches the direct child only. So that the rest of the workload's
processes die with a SIGKILLed sidecar too, a small watchdog process (outside the workload's
cgroup and process group, ignoring the terminal's signals) waits on a pipe whose only write end
the sidecar holds: when the pipe reports end of file (the sidecar exited, however), the
watchdog kills the cgroup and removes it, or in subreaper mode kills the workload's process
group. Limits: in subreaper mode, a process that left the workload's process group (``setsid``)
survives a SIGKILLed sidecar, because its re-parenting then goes to init and nothing still
knows it; a SIGKILLed watchdog leaves the cgroup to the sidecar's normal end only. Both need
someone able to send SIGKILL to the sidecar, that is, its own user or root.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

__all__ = [
    "CONTAINMENT_MODES",
    "Containment",
    "ContainmentMode",
    "cgroup_parent",
    "open_containment",
]

_log = logging.getLogger(__name__)

ContainmentMode = Literal["auto", "cgroup", "subreaper"]
#: The modes :func:`open_containment` accepts.
CONTAINMENT_MODES: tuple[ContainmentMode, ...] = ("auto", "cgroup", "subreaper")

# prctl(2) options (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_SIGKILL = int(signal.SIGKILL)

_CGROUP_PREFIX = "cleanroom-workload-"

# How long the end of a run waits for killed processes to be gone, and how many rounds of
# "find and kill" it makes in subreaper mode (each round catches what forked meanwhile).
_KILL_WAIT_SECONDS = 5.0
_KILL_ROUNDS = 100

#: The watchdog, run as ``python -I -S -c WATCHDOG FD CGROUP PGID``. It keeps nothing of the
#: sidecar but the pipe, ignores the terminal's signals, blocks until the pipe's write end is
#: closed, then kills the cgroup (waiting for it to empty and removing it) or, without a cgroup,
#: the workload's process group.
_WATCHDOG = """
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
fd, cg, pgid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while True:
    try:
        if not os.read(fd, 64):
            break
    except InterruptedError:
        continue
    except OSError:
        break
if cg:
    try:
        with open(os.path.join(cg, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.rmdir(cg)
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.01)
elif pgid > 0:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> int:
    result: int = libc.prctl(option, value, 0, 0, 0)
    return result


# --- cgroup v2 discovery -----------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def _cgroup2_mount() -> tuple[Path, str] | None:
    """The first cgroup v2 mount: (mount point, the hierarchy path it shows)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep or right.split(" ", 1)[0] != "cgroup2":
            continue
        fields = left.split(" ")
        if len(fields) >= 5:
            return Path(_unescape_mount_field(fields[4])), _unescape_mount_field(fields[3])
    return None


def _own_cgroup_path() -> str | None:
    """This process's cgroup v2 path (``0::/path`` in /proc/self/cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def cgroup_parent() -> tuple[Path | None, str]:
    """The directory of this process's own cgroup v2 when the workload can get a child cgroup
    there, or None and the reason why not.

    The checks: a cgroup v2 hierarchy is mounted and shows our cgroup; its directory is
    writable (to create the child) and so is its ``cgroup.procs`` (moving a process needs write
    access to the common ancestor's); the kernel has ``cgroup.kill``. A subtree that is not
    delegated to us (a systemd service without ``Delegate=yes``, a container's read-only
    ``/sys/fs/cgroup``) fails the writability checks.
    """
    mount = _cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    mountpoint, mount_root = mount
    own = _own_cgroup_path()
    if own is None:
        return None, "this process is not in a cgroup v2 hierarchy"
    root = mount_root.rstrip("/")
    if own != mount_root and not own.startswith(root + "/"):
        return None, f"our cgroup {own} is not visible under {mountpoint}"
    directory = mountpoint / own[len(root) :].lstrip("/")
    if not (mountpoint / "cgroup.procs").exists() and not (directory / "cgroup.procs").exists():
        return None, f"{directory} is not a cgroup v2 directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return None, f"cannot create a cgroup in {directory} (not delegated to us)"
    if not os.access(directory / "cgroup.procs", os.W_OK):
        return None, f"cannot move processes out of {directory} (not delegated to us)"
    return directory, ""


# --- the containment ---------------------------------------------------------------------------


class Containment:
    """One workload's containment: set up before its start, ends all of it at :meth:`kill_all`.

    Create it with :func:`open_containment`; use :meth:`child_setup` as the ``preexec_fn`` of
    the workload's ``Popen`` (it runs in the child between ``fork()`` and ``exec()``), call
    :meth:`started` with the workload's pid, :meth:`kill_all` at the end and :meth:`close` last.
    """

    def __init__(self, *, mode: Literal["cgroup", "subreaper"], cgroup: Path | None) -> None:
        self.mode = mode
        self._cgroup = cgroup
        self._libc = _libc()
        # Looked up now: the child must not even create the function object after fork().
        self._prctl_fn = self._libc.prctl
        self._parent_pid = os.getpid()
        self._procs_fd: int | None = None
        self._root: int | None = None
        self._root_start: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watch_w: int | None = None
        self._was_subreaper = False
        self._closed = False
        if cgroup is not None:
            # Opened now so that the child only has to write to it: the child of a process with
            # threads must not allocate or take locks before exec().
            self._procs_fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        else:
            self._was_subreaper = _is_subreaper()
            if _prctl(self._libc, _PR_SET_CHILD_SUBREAPER, 1) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")

    @property
    def cgroup(self) -> Path | None:
        """The workload's cgroup directory (cgroup mode only)."""
        return self._cgroup

    def describe(self) -> str:
        """One line for the log: the mode and, in cgroup mode, the cgroup."""
        if self._cgroup is not None:
            return f"cgroup {self._cgroup}"
        return "child subreaper (no usable cgroup v2)"

    # --- in the child, before exec ------------------------------------------------------------

    def child_setup(self) -> None:
        """Runs in the workload's process between ``fork()`` and ``exec()``: joins the cgroup,
        sets the parent-death signal and checks that the sidecar is still its parent.

        Only system calls here: the sidecar has threads, and a forked child of a threaded
        process may deadlock on a lock another thread held at fork time.
        """
        if self._procs_fd is not None:
            # "0" names the writing process itself.
            os.write(self._procs_fd, b"0")
        self._prctl_fn(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        if os.getppid() != self._parent_pid:
            # The sidecar died before the parent-death signal was armed: nobody will kill us.
            os.kill(os.getpid(), signal.SIGKILL)

    # --- in the sidecar -----------------------------------------------------------------------

    def start_watchdog(self, *, process_group: int = 0) -> None:
        """Starts the watchdog that ends the workload should the sidecar die without cleaning
        up. In cgroup mode call it before the workload starts (an empty cgroup is simply
        removed then); in subreaper mode after, with the workload's ``process_group``.

        Raises:
            OSError: the watchdog cannot be started.
        """
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _WATCHDOG,
                    str(r),
                    str(self._cgroup or ""),
                    str(process_group),
                ],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                # Its own process group: a Ctrl-C on the terminal must not reach it.
                process_group=0,
                close_fds=True,
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._watch_w = w

    def started(self, pid: int) -> None:
        """Records the workload's root process (after ``Popen`` returned)."""
        self._root = pid
        self._root_start = _start_time(pid)

    def kill_all(self) -> None:
        """Kills every process of the workload that is still running and waits until they are
        gone (at most a few seconds). Idempotent."""
        if self._cgroup is not None:
            self._kill_cgroup()
        else:
            self._kill_descendants()

    def _kill_cgroup(self) -> None:
        assert self._cgroup is not None
        try:
            (self._cgroup / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            return
        except OSError as e:
            _log.warning("cannot kill the workload's cgroup %s: %s", self._cgroup, e)
            return
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while time.monotonic() < deadline and _cgroup_populated(self._cgroup):
            time.sleep(0.005)

    def _kill_descendants(self) -> None:
        # Several rounds: a process may fork between the scan and the signal; its child is
        # caught by the next round (processes being killed cannot fork any more).
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        for _ in range(_KILL_ROUNDS):
            pids = self.workload_pids()
            live = [p for p in pids if not _is_zombie(p)]
            for pid in live:
                _kill(pid, pids[pid])
            self._reap_orphans(pids)
            if not live or time.monotonic() > deadline:
                break
            time.sleep(0.002)

    def workload_pids(self) -> dict[int, int]:
        """The workload's processes now: pid -> start time (clock ticks since boot).

        In cgroup mode the cgroup's members; in subreaper mode the root's descendants and those
        re-parented to the sidecar since the workload started, with their descendants.
        """
        if self._cgroup is not None:
            found: dict[int, int] = {}
            with contextlib.suppress(OSError):
                for line in (self._cgroup / "cgroup.procs").read_text().split():
                    start = _start_time(int(line))
                    if start is not None:
                        found[int(line)] = start
            return found
        if self._root is None or self._root_start is None:
            return {}
        table = _process_table()
        me = os.getpid()
        watchdog = self._watchdog.pid if self._watchdog is not None else -1
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        roots = [self._root] if table.get(self._root, (0, -1))[1] == self._root_start else []
        # Orphans re-parented to us: our children that started after the workload did (older
        # ones were ours before it), other than the watchdog.
        roots += [
            pid
            for pid in children.get(me, [])
            if pid not in (self._root, watchdog) and table[pid][1] >= self._root_start
        ]
        result: dict[int, int] = {}
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid in result:
                continue
            result[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
        return result

    def _reap_orphans(self, pids: dict[int, int]) -> None:
        # Re-parented orphans are our children now: reap them, or they stay zombies. The root
        # is left to its Popen, which reaps it.
        for pid in pids:
            if pid == self._root:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    def close(self) -> None:
        """Removes the cgroup, stops the watchdog and restores the subreaper flag. Call after
        :meth:`kill_all`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None
        if self._cgroup is not None:
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(self._cgroup)
                except OSError as e:
                    _log.warning("cannot remove the workload's cgroup %s: %s", self._cgroup, e)
        elif not self._was_subreaper:
            _prctl(self._libc, _PR_SET_CHILD_SUBREAPER, 0)
        if self._watchdog is not None:
            # Everything it would do is done: end it rather than wait for it (it may still be
            # starting its interpreter after a short run).
            with contextlib.suppress(OSError):
                self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._watch_w is not None:
            os.close(self._watch_w)
            self._watch_w = None


def open_containment(mode: ContainmentMode = "auto") -> Containment:
    """Sets up the containment for one workload: a fresh cgroup when possible (``auto``) or
    required (``cgroup``), else a child subreaper.

    Raises:
        ValueError: ``mode`` is unknown.
        OSError: ``cgroup`` was required and no cgroup can be created, or the subreaper flag
            cannot be set.
    """
    if mode not in CONTAINMENT_MODES:
        raise ValueError(f"unknown containment mode {mode!r} (one of {CONTAINMENT_MODES})")
    if mode != "subreaper":
        parent, reason = cgroup_parent()
        if parent is not None:
            cgroup = parent / f"{_CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(cgroup)
                if not (cgroup / "cgroup.kill").exists():
                    os.rmdir(cgroup)
                    raise OSError("this kernel has no cgroup.kill (Linux 5.14 or later)")
                return Containment(mode="cgroup", cgroup=cgroup)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.rmdir(cgroup)
                reason = f"cannot use a cgroup under {parent}: {e}"
        if mode == "cgroup":
            raise OSError(reason)
        _log.debug("workload containment: no cgroup (%s); using a child subreaper", reason)
    return Containment(mode="subreaper", cgroup=None)


# --- /proc helpers -----------------------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    _, sep, rest = raw.rpartition(b")")
    return rest.split() if sep else None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def _is_zombie(pid: int) -> bool:
    fields = _stat(pid)
    return fields is None or fields[0] in (b"Z", b"X")


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) for every process visible now."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or len(fields) < 20:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _kill(pid: int, start: int) -> None:
    """SIGKILLs ``pid`` if it is still the process that started at ``start`` (a pidfd makes the
    check and the signal refer to the same process, so a reused pid is never signalled)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _start_time(pid) == start:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cgroup_populated(cgroup: Path) -> bool:
    try:
        for line in (cgroup / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] != "0"
    except OSError:
        return False
    return False


def _is_subreaper() -> bool:
    value = ctypes.c_int(0)
    libc = _libc()
    # PR_GET_CHILD_SUBREAPER (37) stores the flag through the pointer argument.
    if libc.prctl(37, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return bool(value.value)
