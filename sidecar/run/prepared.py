"""The prepared sidecar (``cleanroom sidecar serve``): ``sidecar run`` with its imports done.

Started once (at boot), it imports what a run needs (gRPC, protobuf and the cleanroom.v1
messages, cryptography, tpm2-pytss, the run's modules), loads and checks its config, then waits
on a control Unix socket for ``cleanroom sidecar run --prepared PATH`` (:mod:`sidecar.control`).
While it waits it holds no TPM context, no broker channel, no thread and no key: those are
made per run, after ``fork``, by a child that runs exactly :func:`sidecar.run.run_workload` for
the request with the client's stdin, stdout and stderr as its own. Each run is therefore a
fresh copy of a process that never attested, and a run's keys die with its child.

Who may connect: the socket is 0600 in a directory the server creates 0700; beyond that, the
peer's ``SO_PEERCRED`` uid must be the server's own or root, otherwise the connection is closed
unanswered and logged. The run child watches the connection: a ``{"signal": N}`` frame is
raised in it as if sent to ``sidecar run`` (forwarded to the workload once started), and end of
file (the client exited or was killed) is taken as SIGTERM, so the workload is stopped through
its containment as for a stopped ``sidecar run``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import logging
import os
import select
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sidecar.control import MAX_FRAME, PROTOCOL_VERSION, FrameReader, encode_frame
from sidecar.dataplane.peers import peer_credentials
from sidecar.errors import PreparedSidecarError
from sidecar.run.errors import RunInterruptedError
from sidecar.run.supervisor import start_daemon_thread
from sidecar.runconfig import RunConfig

__all__ = ["default_control_path", "serve"]

_log = logging.getLogger(__name__)

#: What the server imports before it waits, so that a run finds them loaded (the run imports
#: some of them only on the way, to keep plain ``sidecar run`` fast when it does not need them).
_PRELOAD = (
    "grpc",
    # gRPC loads these on its first channel and server, cryptography its OpenSSL backend on the
    # first EC key object, concurrent.futures its thread pool on first use (found by profiling
    # a run: 18 ms of imports were left in it without them).
    "grpc._channel",
    "grpc._server",
    "grpc._interceptor",
    "grpc._simple_stubs",
    "grpc.experimental",
    "cryptography.hazmat.backends.openssl",
    "concurrent.futures.thread",
    "google.protobuf",
    "cleanroom.v1.attestation_pb2",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.x509",
    "tpm2_pytss",
    "ctypes",
    "broker.client",
    "pki.tls",
    "sidecar.run",
    "sidecar.run.runner",
    "sidecar.tpm",
    "sidecar.dataplane",
    "sidecar.dataplane.server",
)

#: How long a run child waits for the request after the connection was accepted.
_REQUEST_TIMEOUT_SECONDS = 10.0

#: How often the idle server wakes up to reap finished run children.
_REAP_SECONDS = 1.0


def default_control_path() -> Path:
    """``$XDG_RUNTIME_DIR/cleanroom-sidecar/control`` when that directory is usable, else
    ``cleanroom-sidecar-UID/control`` in the system's temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "cleanroom-sidecar" / "control"
    return Path(tempfile.gettempdir()) / f"cleanroom-sidecar-{os.getuid()}" / "control"


def _private_directory(path: Path) -> None:
    """Creates ``path`` 0700, or accepts it if it is a directory of this uid that nobody else
    can enter.

    Raises:
        PreparedSidecarError: it cannot be created, or exists and is not private.
    """
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise PreparedSidecarError(f"cannot create {path}: {e.strerror or e}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PreparedSidecarError(
            f"{path} exists and is not a directory of uid {os.getuid()} with mode 0700; "
            "remove it or choose another --control"
        )


def _listen(path: Path) -> socket.socket:
    """The control socket at ``path``, 0600 in a private directory; a stale socket from a
    server that died is replaced, a live one is not.

    Raises:
        PreparedSidecarError: the directory is not private, another server listens there, or
            the socket cannot be bound.
    """
    _private_directory(path.parent)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink()  # Nobody listens: a server that died left it.
        else:
            raise PreparedSidecarError(f"a prepared sidecar already listens at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        raise PreparedSidecarError(f"cannot listen at {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def serve(
    config: RunConfig,
    control: Path,
    *,
    run: Callable[[RunConfig, list[str], int], int],
) -> int:
    """Imports the run's modules, listens at ``control`` and serves runs until SIGTERM/SIGINT.

    ``run(config, argv, verbose)`` is called in each forked run child with the client's
    descriptors as 0, 1 and 2 and returns the exit status sent back (``sidecar run``'s).

    Raises:
        PreparedSidecarError: the control socket cannot be set up.
    """
    for name in _PRELOAD:
        importlib.import_module(name)
    if config.tpm.azure_snp:
        importlib.import_module("sidecar.snp")
    if config.uses_blob:
        importlib.import_module("blobstore.store")
        importlib.import_module("sidecar.dataplane.blob")
    # Everything loaded so far lives as long as the server: moved out of the collector's
    # generations, a run's collections neither scan it nor write to its pages (which the run
    # shares copy-on-write with the server until it writes to them).
    gc.collect()
    gc.freeze()
    listener = _listen(control)
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: set[int] = set()
    # A spare run child, forked ahead of the next request, accepts it: the fork (and the first
    # copy-on-write faults) are off the run's path. It is the server's copy as it waits (no
    # connection, thread or key); when it accepts a connection it tells the server, which
    # forks the next spare.
    accepted_r, accepted_w = os.pipe2(os.O_CLOEXEC)
    spare: int | None = None
    try:
        _log.warning("prepared sidecar listening at %s (pid %d)", control, os.getpid())
        while not stopping:
            _reap(children)
            if spare is None or spare not in children:
                sys.stdout.flush()
                sys.stderr.flush()
                spare = os.fork()
                if spare == 0:
                    os.close(accepted_r)
                    _run_child(listener, accepted_w, config, run)
                children.add(spare)
            try:
                readable, _, _ = select.select([accepted_r], [], [], _REAP_SECONDS)
            except InterruptedError:
                continue
            if readable:
                os.read(accepted_r, 64)
                spare = None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        listener.close()
        with contextlib.suppress(OSError):
            control.unlink()
        os.close(accepted_r)
        os.close(accepted_w)
        if spare is not None and spare in children:
            # Idle: it holds nothing and has started nothing.
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spare, 0)
            children.discard(spare)
        # Runs in progress are stopped as a stopped `sidecar run` is (the workload gets SIGTERM,
        # then its grace period), and waited for: under systemd, whatever is left when the
        # server exits is killed outright.
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        for child in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
    _log.warning("prepared sidecar stopped")
    return 0


def _reap(children: set[int]) -> None:
    for child in list(children):
        try:
            pid, _ = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pid = child
        if pid:
            children.discard(child)


def _run_child(
    listener: socket.socket,
    accepted: int,
    config: RunConfig,
    run: Callable[[RunConfig, list[str], int], int],
) -> NoReturn:
    """The forked spare: accepts one connection, tells the server, checks the peer, serves the
    run. Never returns into the server's loop, whatever happens."""
    code = 1
    try:
        # The server's handlers (stop serving) are not this child's: until the run installs
        # its own, a signal stops the run before anything started, as for plain `sidecar run`.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _interrupted)
        conn = _accept(listener)
        listener.close()
        os.write(accepted, b"a")
        os.close(accepted)
        with conn:
            peer = peer_credentials(conn)
            pid, uid = peer.pid, peer.uid
            if uid not in (os.getuid(), 0):
                _log.warning(
                    "refused a control connection from pid %d uid %d: only uid %d or root "
                    "may run the prepared sidecar",
                    pid,
                    uid,
                    os.getuid(),
                )
            else:
                _log.info("run %d for pid %d (uid %d)", os.getpid(), pid, uid)
                code = _serve_request(conn, config, run)
    except BaseException as e:
        # Whatever it is, the child ends here: returning would run a second server loop.
        with contextlib.suppress(BaseException):
            if not isinstance(e, RunInterruptedError):
                _log.error("prepared run failed: %s", e)
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


def _accept(listener: socket.socket) -> socket.socket:
    while True:
        try:
            conn, _ = listener.accept()
            return conn
        except OSError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                raise


def _interrupted(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise RunInterruptedError(
        f"stopped by {signal.Signals(signum).name} before the workload started; nothing was started"
    )


def _serve_request(
    conn: socket.socket, config: RunConfig, run: Callable[[RunConfig, list[str], int], int]
) -> int:
    conn.settimeout(_REQUEST_TIMEOUT_SECONDS)
    request, reader = _receive_request(conn)
    argv, cwd, verbose = request
    conn.settimeout(None)
    try:
        os.chdir(cwd)
    except OSError as e:
        print(f"cleanroom: error: cannot enter {cwd}: {e.strerror or e}", file=sys.stderr)
        return _finish(conn, 1)
    logging.getLogger().setLevel(logging.WARNING - 10 * min(verbose, 2))
    done = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        # The client's signals, and its end: a client that exits or is killed before the
        # run's exit status was sent stops the run (and its workload) as SIGTERM would.
        try:
            while True:
                message = reader.read()
                if message is None:
                    break
                signum = message.get("signal")
                if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) and not done.is_set():
                    signal.pthread_kill(main, signum)
        except (OSError, PreparedSidecarError):
            pass
        if not done.is_set():
            _log.warning("the client went away; ending the run")
            signal.pthread_kill(main, signal.SIGTERM)

    start_daemon_thread(watch)
    try:
        code = run(config, argv, verbose)
    except KeyboardInterrupt:
        code = 130
    return _finish(conn, code, done)


def _finish(conn: socket.socket, code: int, done: threading.Event | None = None) -> int:
    if done is not None:
        done.set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(encode_frame({"exit": code}))
    return code


def _receive_request(conn: socket.socket) -> tuple[tuple[list[str], str, int], FrameReader]:
    """The request and the client's three descriptors, installed as 0, 1 and 2.

    Raises:
        PreparedSidecarError: a malformed request, or not exactly three descriptors.
    """
    data, fds, _, _ = socket.recv_fds(conn, MAX_FRAME + 4, 3)
    try:
        if len(fds) != 3:
            raise PreparedSidecarError(f"the request carried {len(fds)} descriptor(s), not 3")
        reader = FrameReader(conn)
        reader.feed(data)
        message = reader.read()
        if message is None:
            raise PreparedSidecarError("the client closed the connection before its request")
        request = _parse_request(message)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    return request, reader


def _parse_request(message: dict[str, Any]) -> tuple[list[str], str, int]:
    if message.get("version") != PROTOCOL_VERSION:
        raise PreparedSidecarError(f"unsupported request version {message.get('version')!r}")
    argv = message.get("argv")
    cwd = message.get("cwd")
    verbose = message.get("verbose", 0)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise PreparedSidecarError("request argv is not a list of strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise PreparedSidecarError("request cwd is not an absolute path")
    if not isinstance(verbose, int) or isinstance(verbose, bool) or verbose < 0:
        raise PreparedSidecarError("request verbose is not a count")
    return argv, cwd, verbose
