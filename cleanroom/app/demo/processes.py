"""Child processes of the demo, and stopping every one of them whatever happens.

Each child starts in its own session (so its own process group): a Ctrl-C in the terminal
then reaches only the demo, which stops the children in order (the sidecar before the broker,
the broker before the TPM) instead of all of them dying at once mid-call. Stopping a child
signals its whole process group, SIGTERM first and SIGKILL after a grace period, so what the
child started in its group stops with it.

A child may also start processes in a group of their own (the sidecar may run its workload that
way). To find those even after their parent is gone, the demo makes itself a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux): orphaned descendants are re-parented to
the demo rather than to init, so at the end every descendant still alive is stopped too.

SIGTERM and SIGHUP are turned into :class:`KeyboardInterrupt` while the supervisor is open, so
``kill`` and a closed terminal clean up exactly like Ctrl-C; so is SIGINT even when the demo
was started with it ignored, as a shell starts its background jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, Self

from cleanroom.app.demo.errors import ServiceError
from cleanroom.closing import Closeable

__all__ = [
    "Child",
    "Supervisor",
    "descendants",
    "open_file_positions",
    "process_cmdline",
]

_PR_SET_CHILD_SUBREAPER: Final = 36
#: Seconds a child gets to exit after SIGTERM before SIGKILL.
DEFAULT_GRACE: Final = 5.0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, or None when it is gone."""
    data = _read(f"/proc/{pid}/stat")
    # The command name in parentheses may hold spaces and parentheses: split after the last ")".
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone: with the pid, it
    names one process even after the pid is reused."""
    data = _read(f"/proc/{pid}/stat")
    end = data.rfind(b")")
    try:
        return int(data[end + 2 :].split()[19]) if end >= 0 else None
    except (IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (zombies excluded), from a scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for p in _all_pids():
        st = _stat(p)
        if st is not None:
            states[p] = st[0]
            children.setdefault(st[1], []).append(p)
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        if states.get(p) not in ("Z", "X"):
            out.append(p)
        todo.extend(children.get(p, ()))
    return out


def process_cmdline(pid: int) -> str:
    """A process's command line with spaces between arguments ("" when gone or a zombie)."""
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def open_file_positions(pid: int, paths: Collection[str]) -> dict[str, int]:
    """The read positions of the files in ``paths`` (resolved absolute paths) that ``pid`` has
    open, from ``/proc/<pid>/fdinfo``; the largest position when a file is open twice."""
    out: dict[str, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target not in paths:
            continue
        for line in _read(f"/proc/{pid}/fdinfo/{fd}").splitlines():
            if line.startswith(b"pos:"):
                with contextlib.suppress(ValueError):
                    out[target] = max(out.get(target, 0), int(line.split()[1]))
    return out


def _set_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class Child:
    """A process the supervisor started: its name (for messages), process and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 1) -> str:
        """The last non-empty lines of the child's log, joined on one line."""
        text = _read(str(self.log_file)).decode(errors="replace")
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])


@dataclass
class _Deferred:
    name: str
    stop: Callable[[], None]


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, delivered as a KeyboardInterrupt so that one path cleans up."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


class Supervisor(Closeable):
    """Starts the demo's child processes and stops all of them on :meth:`close`.

    Use it as a context manager: leaving the block (normally, on an error or on Ctrl-C) stops
    every child in reverse start order, then any descendant still alive.

    Args:
        grace: seconds a child gets between SIGTERM and SIGKILL.
        handle_signals: turn SIGTERM and SIGHUP into KeyboardInterrupt while open (only
            possible in the main thread; ignored elsewhere).
        subreaper: become a child subreaper while open, so that orphaned descendants can be
            found and stopped.
    """

    def __init__(
        self,
        *,
        grace: float = DEFAULT_GRACE,
        handle_signals: bool = True,
        subreaper: bool = True,
    ) -> None:
        self.grace = grace
        self._children: list[Child | _Deferred] = []
        self._handle_signals = handle_signals
        self._want_subreaper = subreaper
        self._subreaper = False
        self._saved: dict[int, Any] = {}
        self._open = False
        #: The descendants this process had before the supervisor opened (pid: start time):
        #: they are not the supervisor's, and neither are theirs, so the sweep leaves them.
        self._earlier: dict[int, int | None] = {}
        #: Processes stopped by :meth:`close` (direct children and stray descendants).
        self.stopped: list[str] = []

    def __enter__(self) -> Self:
        self._open = True
        self._earlier = {p: _start_time(p) for p in descendants(os.getpid())}
        if self._want_subreaper:
            self._subreaper = _set_subreaper(True)
        if self._handle_signals:
            # SIGINT too: a shell starts background jobs with SIGINT ignored, and the demo
            # should still stop cleanly on `kill -INT`.
            with contextlib.suppress(ValueError):
                self._saved[signal.SIGINT] = signal.signal(
                    signal.SIGINT, signal.default_int_handler
                )
            for sig in (signal.SIGTERM, signal.SIGHUP):
                try:
                    self._saved[sig] = signal.signal(sig, _raise_interrupt)
                except ValueError:  # not the main thread
                    break
        return self

    @property
    def children(self) -> Sequence[Child]:
        """The processes started with :meth:`start`, in start order."""
        return tuple(c for c in self._children if isinstance(c, Child))

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_file: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Starts ``argv`` in a new session with stdout and stderr appended to ``log_file``.

        Raises:
            ServiceError: the program cannot be started.
        """
        if not self._open:
            raise ServiceError(f"cannot start {name}: the supervisor is closed")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes]
        with open(log_file, "ab") as log:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
            except OSError as e:
                raise ServiceError(f"cannot start {name} ({argv[0]}): {e.strerror or e}") from e
        child = Child(name=name, proc=proc, log_file=log_file)
        self._children.append(child)
        return child

    def defer(self, name: str, stop: Callable[[], None]) -> None:
        """Registers a stop function (for a process started elsewhere, such as swtpm by
        :class:`cleanroom.app.devtpm.Swtpm`); :meth:`close` calls it in reverse start order."""
        self._children.append(_Deferred(name, stop))

    def stop(self, child: Child) -> None:
        """Stops one child's process group: SIGTERM, then SIGKILL after the grace period."""
        proc = child.proc
        if proc.poll() is not None:
            # The leader is gone; members of its group may still run.
            _signal_group(proc.pid, signal.SIGKILL)
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            # The leader exited; anything left in its group gets no second chance.
            _signal_group(proc.pid, signal.SIGKILL)
        self.stopped.append(child.name)

    def _stop_strays(self) -> None:
        # Processes that were running before the supervisor opened (a test session's emulator,
        # say) are someone else's: they and their own descendants are left alone.
        earlier = {p for p, t in self._earlier.items() if t is not None and _start_time(p) == t}
        theirs = set(earlier)
        for p in earlier:
            theirs.update(descendants(p))
        strays = [p for p in descendants(os.getpid()) if p not in theirs and _alive(p)]
        if not strays:
            return
        names = {p: process_cmdline(p).split(" ", 1)[0] or str(p) for p in strays}
        for p in strays:
            _signal_pid(p, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(_alive(p) for p in strays):
            self._reap()
            time.sleep(0.05)
        for p in strays:
            if _alive(p):
                _signal_pid(p, signal.SIGKILL)
        self.stopped.extend(f"{os.path.basename(names[p])} (pid {p})" for p in strays)

    def _reap(self) -> None:
        # As a subreaper the demo inherits orphans; once its own children are waited for,
        # reaping whatever else exited keeps zombies from piling up.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def close(self) -> None:
        """Stops every child (reverse start order), then every other live descendant, and
        restores the signal handlers. Ctrl-C is ignored meanwhile so that cleanup completes;
        it is bounded by the grace periods. Closing twice is harmless."""
        if not self._open:
            return
        # Ctrl-C is ignored meanwhile (the handler saved in __enter__ comes back at the end).
        previous_int = signal.getsignal(signal.SIGINT)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for item in reversed(self._children):
                if isinstance(item, _Deferred):
                    item.stop()
                    self.stopped.append(item.name)
                else:
                    self.stop(item)
            self._stop_strays()
            self._reap()
        finally:
            self._open = False
            if self._subreaper:
                _set_subreaper(False)
                self._subreaper = False
            self._saved.setdefault(signal.SIGINT, previous_int)
            for sig, handler in self._saved.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
            self._saved.clear()
