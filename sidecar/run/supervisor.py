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
released, so not even the sidecar's copy of its memory holds one.

Before the workload starts, the same signals abort the run instead (SIGINT as the usual
KeyboardInterrupt, SIGTERM and SIGHUP as :class:`RunInterruptedError`), so that the TPM and the
broker connection are released cleanly and nothing is started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, Self

from sidecar.run.containment import Containment, ContainmentMode, open_containment
from sidecar.run.errors import RunInterruptedError, WorkloadStartError

__all__ = ["FORWARDED_SIGNALS", "WorkloadProcess", "exit_status"]

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


class _NotReleasedError(Exception):
    """Raised in a pre-spawned child when the run ended without releasing it: it exits
    without executing the workload."""


class _Prespawn:
    """A workload process forked ahead of time, held before ``exec`` on a pipe.

    The ``Popen`` runs in a thread of its own, because ``Popen`` returns only once the child
    has executed (or failed to); the thread then stays until the run is over, because the
    child's parent-death signal follows the thread that forked it.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.go_r, self.go_w = os.pipe2(os.O_CLOEXEC)
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: BaseException | None = None
        #: Set when Popen returned or raised in the launcher thread.
        self.launched = threading.Event()
        #: Set when the launcher thread may end (the workload is gone, or never ran).
        self.over = threading.Event()
        self.thread: threading.Thread | None = None
        self.released = False

    def gate(self) -> None:
        """Runs in the child after its containment was set up: waits for the go byte.

        Only system calls (the sidecar has threads; see :meth:`Containment.child_setup`).

        Raises:
            _NotReleasedError: the pipe gave anything but the go byte (end of file when the
                sidecar cancelled the start, or died): the child then exits before ``exec``.
        """
        # The child's copy of the write end would keep the pipe from ever reporting end of file.
        # (It is closed already, -1, when the sidecar released or cancelled before the fork.)
        try:
            os.close(self.go_w)
        except OSError:
            pass
        if os.read(self.go_r, 1) != _GO:
            raise _NotReleasedError

    def close_pipe(self) -> None:
        for fd in (self.go_r, self.go_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.go_r = self.go_w = -1


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
        self._proc: subprocess.Popen[bytes] | None = None
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
            # Everything the workload started is gone: the launcher thread may end now.
            pre.over.set()
            pre.close_pipe()
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

    def _start_process(self, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
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
        pre.released = True
        os.write(pre.go_w, _GO)
        os.close(pre.go_w)
        pre.go_w = -1
        pre.launched.wait()
        if pre.error is not None:
            if isinstance(pre.error, subprocess.SubprocessError):
                # The child's setup failed before it waited for the go byte (it could not join
                # the cgroup); it exited without executing anything.
                raise _ContainmentFailedError(str(pre.error)) from pre.error
            if isinstance(pre.error, OSError):
                raise WorkloadStartError(
                    f"cannot start the workload {self._command[0]!r}: "
                    f"{pre.error.strerror or pre.error}"
                ) from pre.error
            raise WorkloadStartError(f"cannot start the workload: {pre.error}") from pre.error
        assert pre.proc is not None
        return pre.proc

    def prespawn(self, env: Mapping[str, str]) -> None:
        """Forks the workload's process now, in its containment, held before ``exec`` until
        :meth:`start` is called with the same ``env`` (see the module's docstring). Call it from
        the thread that will call :meth:`start`. Without a :meth:`start`, leaving the context
        makes the process exit without executing the workload.

        Raises:
            WorkloadStartError: the containment cannot be set up, or a process was started or
                pre-spawned already.
        """
        if self._proc is not None or self._prespawned is not None:
            raise WorkloadStartError("the workload was started already")
        containment = self._containment
        if containment is None:
            containment = self._open_containment(self._containment_mode)
        pre = _Prespawn(env)
        self._prespawned = pre

        def launch() -> None:
            try:
                pre.proc = self._popen(pre.env, containment, gate=pre.gate)
            except BaseException as e:
                pre.error = e
            finally:
                pre.launched.set()
            # The child's parent-death signal is tied to this thread: it stays until the run
            # is over (or the sidecar's process ends, which kills the child too).
            pre.over.wait()

        pre.thread = threading.Thread(target=launch, name="sidecar-workload-fork", daemon=True)
        pre.thread.start()

    def _cancel_prespawn(self, pre: _Prespawn) -> None:
        """Makes the pre-spawned child exit without executing, and waits for it."""
        pre.released = True
        if pre.go_w >= 0:
            # End of file on the pipe: the child raises before exec and exits.
            os.close(pre.go_w)
            pre.go_w = -1
        if not pre.launched.wait(_CANCEL_WAIT_SECONDS):
            _log.warning("the pre-spawned workload process did not exit; killing its containment")
            if self._containment is not None:
                self._containment.kill_all()
            pre.launched.wait(_CANCEL_WAIT_SECONDS)
        if pre.proc is not None:
            # Popen returned as if the child had executed; it cannot have (it got no go byte),
            # but make sure nothing of it is left.
            with contextlib.suppress(OSError):
                pre.proc.kill()
            pre.proc.wait()

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

    def _popen(
        self,
        env: Mapping[str, str],
        containment: Containment,
        *,
        gate: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Forks and executes the workload in ``containment``; with ``gate``, the child runs it
        after joining the containment and executes only if it returns.

        Raises:
            OSError: the command cannot be executed.
            subprocess.SubprocessError: the child's setup (or ``gate``) raised; it exited
                without executing anything.
        """
        child_setup = containment.child_setup
        setup = child_setup
        if gate is not None:

            def held() -> None:
                child_setup()
                gate()

            setup = held
        fd = self._executable_fd
        return subprocess.Popen(
            self._command,
            executable=f"/proc/self/fd/{fd}" if fd is not None else None,
            pass_fds=(fd,) if fd is not None else (),
            cwd=self._cwd,
            env=dict(env),
            process_group=0,
            close_fds=True,
            preexec_fn=setup,
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
