"""Starting the workload and supervising it: signals forwarded, exit status returned.

The workload runs in its own process group, so that a signal meant for it reaches the whole
tree it started (a shell script's children too), and so that a Ctrl-C on the terminal does not
reach it twice (once from the terminal, once forwarded). SIGTERM, SIGINT and SIGHUP sent to the
sidecar are forwarded to that group; if the workload is still running ``grace_seconds`` after
the first of them, the group is killed.

Every process the workload starts is contained (see :mod:`sidecar.run.containment`): in its own
cgroup v2 when the system allows it, else under the sidecar as a child subreaper; the root
process dies with the sidecar (parent-death signal), and a watchdog ends the rest should the
sidecar be killed. At the end, :meth:`WorkloadProcess.terminate_leftovers` kills whatever is
left, including processes that left the process group (``setsid``) or were re-parented.

Forking and moving a process into a cgroup cost tens of milliseconds (the move waits for the
kernel's RCU grace period), so ``sidecar run`` takes them off its critical path:
:meth:`WorkloadProcess.prespawn` forks the workload's process while the sidecar attests. The
child joins its cgroup, arms its parent-death signal, and then blocks on a pipe before it has
run anything but the sidecar's own code; only :meth:`WorkloadProcess.start`, after the keys were
released, writes the byte that lets it ``exec`` the measured executable (through the descriptor
it was digested from, with the exact environment given to both calls). Should the run fail
first, the pipe is closed without that byte and the child exits without ever executing: the
workload's code never runs for a denied attestation. The child is forked before any key is
released, so not even the sidecar's copy of its memory holds one. It is forked with
``os.fork`` by the calling thread (``Popen`` would block until the child executed), does what
``subprocess`` does for its children by hand (process group, working directory, signal
dispositions, descriptors closed but the executable's), and never returns into the sidecar's
code: whatever fails, ``os._exit`` ends it.

Before the workload starts, the same signals abort the run instead (SIGINT as the usual
KeyboardInterrupt, SIGTERM and SIGHUP as :class:`RunInterruptedError`), so that the TPM and the
broker connection are released cleanly and nothing is started.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, NoReturn, Protocol, Self

from sidecar.run.containment import Containment, ContainmentMode, open_containment
from sidecar.run.errors import RunInterruptedError, WorkloadStartError

__all__ = ["FORWARDED_SIGNALS", "WorkloadProcess", "exit_status", "start_daemon_thread"]

_log = logging.getLogger(__name__)

#: The signals the sidecar forwards to the workload's process group.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_status(returncode: int) -> int:
    """The shell's exit status for a child's return code: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


#: The byte that lets a pre-spawned child execute the workload; anything else (or end of file)
#: makes it exit without executing.
_GO = b"x"

#: How long the end of a run waits for a cancelled pre-spawned child to be gone.
_CANCEL_WAIT_SECONDS = 10.0

#: The exit status of a pre-spawned child that was not released (it executed nothing).
_NOT_RELEASED_STATUS = 125

#: What a pre-spawned child reports on its error pipe before exiting: its setup (joining the
#: containment) or the ``execve`` failed, with the errno.
_SETUP_FAILED = b"S"
_EXEC_FAILED = b"E"


def start_daemon_thread(target: Callable[[], None]) -> None:
    """Runs ``target`` in a new daemon thread without waiting for the thread to start.

    ``threading.Thread.start`` blocks until the new thread has run its first bytecode, that is,
    until the operating system scheduled it and it took the GIL: on a busy machine a median of
    4 ms and a tail of 20 ms or more, on the start-up's critical path. ``target`` must catch its
    own exceptions (an escaping one is reported through ``sys.unraisablehook``).
    """
    _thread.start_new_thread(target, ())


class _ForkedProcess:
    """The parts of ``subprocess.Popen`` the supervisor uses, for a child forked directly."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped elsewhere (the containment's sweep): it is gone, its status unknown.
                self.returncode = 255
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 255
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _Prespawn:
    """A workload process forked ahead of time and held before ``exec`` on a pipe."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.go_r, self.go_w = os.pipe2(os.O_CLOEXEC)
        # The child's report of a failed setup or execve; end of file once it executed.
        self.err_r, self.err_w = os.pipe2(os.O_CLOEXEC)
        self.proc: _ForkedProcess | None = None
        self.released = False

    def close_pipes(self) -> None:
        for fd in (self.go_r, self.go_w, self.err_r, self.err_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.go_r = self.go_w = self.err_r = self.err_w = -1


class _Process(Protocol):
    """What the supervisor uses of a started process (``Popen`` or :class:`_ForkedProcess`)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def kill(self) -> None: ...


class WorkloadProcess:
    """The workload's process, with signal forwarding while it runs.

    Use as a context manager around the whole run: on entry it installs the signal handlers
    (only in the main thread; elsewhere signals keep their handlers), on exit it restores them
    and, should the workload still run, kills its process group.

    Args:
        command: the program and its arguments.
        cwd: the working directory.
        grace_seconds: how long the workload may take to exit after a forwarded signal.
        containment: ``auto`` (a cgroup when possible, else a child subreaper), ``cgroup``
            (fail to start without one) or ``subreaper``. :meth:`start` must be called from a
            thread that lives as long as the workload (the parent-death signal follows the
            thread that forked).
        executable_fd: an open descriptor of the program to execute instead of looking
            ``command[0]`` up again: the file that was measured through it is the one that
            runs (``execve`` of ``/proc/self/fd/N``; the workload inherits the descriptor).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: str | os.PathLike[str],
        grace_seconds: float,
        containment: ContainmentMode = "auto",
        executable_fd: int | None = None,
    ) -> None:
        self._command = list(command)
        self._containment_mode: ContainmentMode = containment
        self._containment: Containment | None = None
        self._executable_fd = executable_fd
        self._cwd = cwd
        self._grace = grace_seconds
        self._proc: _Process | None = None
        self._prespawned: _Prespawn | None = None
        self._starting = False
        self._pending: list[int] = []
        self._kill_deadline: float | None = None
        self._received: list[int] = []
        self._old: dict[int, Any] = {}
        # A pipe the signal handler writes to, so that the wait loop wakes up to re-check the
        # kill deadline (a plain blocking wait would be resumed after the handler ran).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- context -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED_SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
        pre = self._prespawned
        if pre is not None and not pre.released:
            # The run ended before the workload was released: the child exits unexecuted.
            self._cancel_prespawn(pre)
        if self._proc is not None and self._proc.poll() is None:
            # Only reached when the sidecar itself failed while the workload ran.
            self._kill_everything()
            self._proc.wait()
        if self._containment is not None:
            self._containment.kill_all()
            self._containment.close()
        if pre is not None:
            pre.close_pipes()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)
        if self._proc is None:
            if self._starting:
                # Popen is running: deliver once the process group exists.
                self._pending.append(signum)
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise RunInterruptedError(
                f"stopped by {signal.Signals(signum).name} before the workload started; "
                "nothing was started"
            )
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        _log.info("forwarding %s to the workload", signal.Signals(signum).name)
        self._signal_group(signum)
        if self._kill_deadline is None:
            self._kill_deadline = time.monotonic() + self._grace
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _signal_group(self, signum: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The group is gone and its id reused by someone else's group: signal the root only.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signum)

    @property
    def signals_received(self) -> tuple[int, ...]:
        """The forwarded signals received so far."""
        return tuple(self._received)

    # --- start and wait ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def containment(self) -> Containment | None:
        """The workload's containment, once started (its mode, its cgroup, its processes)."""
        return self._containment

    def start(self, env: Mapping[str, str]) -> int:
        """Starts the workload with the complete environment ``env`` in a new process group,
        contained (see :mod:`sidecar.run.containment`); returns its pid.

        After :meth:`prespawn` with the same ``env``, this releases the waiting process to
        ``exec`` instead of forking one now.

        Raises:
            WorkloadStartError: the command cannot be executed, the containment cannot be set
                up, or the workload was started already.
        """
        if self._proc is not None:
            raise WorkloadStartError("the workload was started already")
        self._starting = True
        try:
            try:
                self._proc = self._start_process(env)
            except _ContainmentFailedError as e:
                if self._containment_mode != "auto":
                    raise WorkloadStartError(
                        f"cannot start the workload {self._command[0]!r} in its cgroup: {e}"
                    ) from e
                # The cgroup looked usable but the kernel refused the move (a threaded or
                # otherwise unusual subtree). Nothing ran: start over as a subreaper.
                _log.warning("cannot put the workload in a cgroup (%s); using a subreaper", e)
                self._proc = self._spawn(env, "subreaper")
        finally:
            self._starting = False
        containment = self._containment
        assert containment is not None and self._proc is not None
        containment.started(self._proc.pid)
        if containment.cgroup is None:
            try:
                containment.start_watchdog(process_group=self._proc.pid)
            except OSError as e:
                _log.warning("cannot start the workload's watchdog: %s", e)
        for signum in self._pending:
            self._forward(signum)
        self._pending.clear()
        return self._proc.pid

    def _start_process(self, env: Mapping[str, str]) -> _Process:
        """The pre-spawned process released, or (without one, or for another ``env``) a new
        one spawned in the configured containment.

        Raises:
            WorkloadStartError, _ContainmentFailedError: as :meth:`_spawn`.
        """
        pre = self._prespawned
        if pre is None or pre.released:
            return self._spawn(env, self._containment_mode)
        if pre.env != dict(env):
            # Never the case in ``sidecar run``; a child is only ever released into the exact
            # environment it was forked with.
            _log.warning("the workload's environment changed since it was pre-spawned")
            self._cancel_prespawn(pre)
            return self._spawn(env, self._containment_mode)
        assert pre.proc is not None
        pre.released = True
        os.write(pre.go_w, _GO)
        os.close(pre.go_w)
        pre.go_w = -1
        # End of file once the child executed (the pipe is close-on-exec), or its report.
        report = _read_all(pre.err_r)
        # The child shares no memory with the sidecar any more (it executed or it failed).
        gc.unfreeze()
        if not report:
            return pre.proc
        pre.proc.wait()
        kind, _, number = report.partition(b":")
        err = int(number or 0)
        if kind == _SETUP_FAILED:
            # It could not join its cgroup; it exited without executing anything.
            raise _ContainmentFailedError(os.strerror(err))
        raise WorkloadStartError(
            f"cannot start the workload {self._command[0]!r}: {os.strerror(err)}"
        )

    def prespawn(self, env: Mapping[str, str]) -> None:
        """Forks the workload's process now, in its containment, held before ``exec`` until
        :meth:`start` is called with the same ``env`` (see the module's docstring). Call it from
        the thread that will call :meth:`start`, which must live as long as the workload (the
        parent-death signal follows it). Without a :meth:`start`, leaving the context makes the
        process exit without executing the workload.

        Raises:
            WorkloadStartError: the containment cannot be set up, the process cannot be forked,
                or a process was started or pre-spawned already.
        """
        if self._proc is not None or self._prespawned is not None:
            raise WorkloadStartError("the workload was started already")
        containment = self._containment
        if containment is None:
            containment = self._open_containment(self._containment_mode)
        pre = _Prespawn(env)
        # Everything the child needs is computed before the fork: after it, the child only
        # makes system calls (the sidecar has threads, whose locks the child must not need).
        argv = list(self._command)
        fd = self._executable_fd
        program = f"/proc/self/fd/{fd}" if fd is not None else argv[0]
        cwd = os.fspath(self._cwd)
        keep = sorted({pre.err_w} | ({fd} if fd is not None else set()))
        max_fd = os.sysconf("SC_OPEN_MAX")
        # Until the child executes, it shares the sidecar's memory copy-on-write: every page the
        # sidecar writes meanwhile is copied. The garbage collector would write to every object
        # it traverses (importing tpm2-pytss alone runs several full collections); frozen, the
        # objects that exist now are left alone (about 10 ms of CPU less, measured).
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as e:
            gc.unfreeze()
            pre.close_pipes()
            raise WorkloadStartError(f"cannot fork the workload's process: {e}") from e
        if pid == 0:  # pragma: no cover (the child, which never returns)
            _held_child(
                pre,
                containment,
                argv,
                program,
                env=pre.env,
                cwd=cwd,
                keep=keep,
                max_fd=max_fd,
                executable_fd=fd,
            )
        os.close(pre.go_r)
        os.close(pre.err_w)
        pre.go_r = pre.err_w = -1
        pre.proc = _ForkedProcess(pid)
        self._prespawned = pre

    def _cancel_prespawn(self, pre: _Prespawn) -> None:
        """Makes the pre-spawned child exit without executing, and waits for it."""
        pre.released = True
        if pre.go_w >= 0:
            # End of file on the pipe: the child exits without executing.
            os.close(pre.go_w)
            pre.go_w = -1
        proc = pre.proc
        if proc is None:
            return
        gc.unfreeze()
        deadline = time.monotonic() + _CANCEL_WAIT_SECONDS
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            _log.warning("the pre-spawned workload process did not exit; killing it")
            proc.kill()
            proc.wait()
        elif proc.returncode != _NOT_RELEASED_STATUS:
            _log.warning("the pre-spawned workload process ended with status %d", proc.returncode)

    def prepare(self) -> None:
        """Sets up the containment (the cgroup and its watchdog) ahead of :meth:`start`, so that
        it costs nothing on the way to the workload's start when called early (``sidecar run``
        calls it before attesting). Idempotent; :meth:`start` calls it if needed.

        Raises:
            WorkloadStartError: the containment cannot be set up.
        """
        if self._containment is None:
            self._open_containment(self._containment_mode)

    def _open_containment(self, mode: ContainmentMode) -> Containment:
        if self._containment is not None:
            self._containment.kill_all()
            self._containment.close()
            self._containment = None
        try:
            containment = open_containment(mode)
        except (OSError, ValueError) as e:
            raise WorkloadStartError(f"cannot contain the workload: {e}") from e
        self._containment = containment
        _log.info("workload containment: %s", containment.describe())
        try:
            if containment.cgroup is not None:
                # Before the workload: a sidecar killed from now on leaves nothing behind.
                containment.start_watchdog()
        except OSError as e:
            raise WorkloadStartError(f"cannot start the workload's watchdog: {e}") from e
        return containment

    def _spawn(self, env: Mapping[str, str], mode: ContainmentMode) -> subprocess.Popen[bytes]:
        """Starts the workload in the containment of ``mode`` (set up now unless prepared).

        Raises:
            WorkloadStartError: the containment or the command cannot be set up or executed.
            _ContainmentFailedError: the child could not join its cgroup (nothing ran).
        """
        containment = self._containment
        if containment is None or (mode == "subreaper" and containment.cgroup is not None):
            containment = self._open_containment(mode)
        try:
            return self._popen(env, containment)
        except OSError as e:
            raise WorkloadStartError(
                f"cannot start the workload {self._command[0]!r}: {e.strerror or e}"
            ) from e
        except subprocess.SubprocessError as e:
            # child_setup raised: the child could not join the cgroup and exited before exec.
            raise _ContainmentFailedError(str(e)) from e

    def _popen(self, env: Mapping[str, str], containment: Containment) -> subprocess.Popen[bytes]:
        """Forks and executes the workload in ``containment``.

        Raises:
            OSError: the command cannot be executed.
            subprocess.SubprocessError: the child's setup raised; it exited without executing.
        """
        fd = self._executable_fd
        return subprocess.Popen(
            self._command,
            executable=f"/proc/self/fd/{fd}" if fd is not None else None,
            pass_fds=(fd,) if fd is not None else (),
            cwd=self._cwd,
            env=dict(env),
            process_group=0,
            close_fds=True,
            preexec_fn=containment.child_setup,
        )

    def wait(self) -> int:
        """Waits for the workload to exit; returns its exit status (128 + N for signal N).

        Forwarded signals are handled meanwhile; the workload's group is killed if it outlives
        the grace period after the first of them.
        """
        proc = self._proc
        if proc is None:
            raise WorkloadStartError("the workload was not started")
        pidfd = _pidfd_open(proc.pid)
        try:
            while proc.poll() is None:
                deadline = self._kill_deadline
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if deadline is not None and timeout == 0.0:
                    _log.warning(
                        "the workload did not exit within %.1f s of the signal; killing it",
                        self._grace,
                    )
                    self._kill_everything()
                    proc.wait()
                    break
                self._sleep_until_event(pidfd, timeout)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        assert proc.returncode is not None
        return exit_status(proc.returncode)

    def _sleep_until_event(self, pidfd: int | None, timeout: float | None) -> None:
        """Sleeps until the process exits, a signal arrives or ``timeout`` passes."""
        if pidfd is None:
            # Without pidfd (old kernels), poll: the exit is noticed within 50 ms.
            time.sleep(0.05 if timeout is None else min(0.05, timeout))
            return
        ready, _, _ = select.select([pidfd, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 64)

    def terminate_leftovers(self) -> None:
        """Kills (SIGKILL) every process of the workload still running after it exited:
        processes it started and did not wait for, in its process group or not (they lost
        socket access already). Waits until they are gone, a few seconds at most."""
        self._kill_everything()

    def _kill_everything(self) -> None:
        # The containment finds every process, its group included; the group alone is the
        # fallback before the containment exists.
        if self._containment is not None:
            self._containment.kill_all()
        else:
            self._signal_group(signal.SIGKILL)


class _ContainmentFailedError(Exception):
    """The workload's child could not join its cgroup; it exited before exec."""


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


def _read_all(fd: int) -> bytes:
    """Reads ``fd`` to end of file."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _held_child(
    pre: _Prespawn,
    containment: Containment,
    argv: list[str],
    program: str,
    *,
    env: dict[str, str],
    cwd: str,
    keep: list[int],
    max_fd: int,
    executable_fd: int | None,
) -> NoReturn:  # pragma: no cover (runs in the forked child)
    """The pre-spawned child: joins the containment, waits for the go byte, executes.

    It never returns into the sidecar's code (whatever happens, ``os._exit`` ends it), and
    until ``execve`` it makes only system calls, like a ``preexec_fn``.
    """
    status = _NOT_RELEASED_STATUS
    stage = _SETUP_FAILED
    try:
        # The sidecar's Python handlers must not run here: a signal now ends the child.
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # As subprocess does for its children (Python ignores SIGPIPE and SIGXFSZ).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.close(pre.go_w)
        os.close(pre.err_r)
        os.setpgid(0, 0)
        os.chdir(cwd)
        containment.child_setup()
        if os.read(pre.go_r, 1) != _GO:
            os._exit(_NOT_RELEASED_STATUS)
        stage = _EXEC_FAILED
        if executable_fd is not None:
            os.set_inheritable(executable_fd, True)
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, max_fd)
        # The measured executable, through the descriptor it was digested from.
        os.execve(program, argv, env)  # noqa: S606
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(pre.err_w, stage + b":" + str(e.errno or 0).encode())
        status = 127
    finally:
        os._exit(status)
