"""The peer gate: the workload socket's listener, which learns each client's kernel credentials
and splices the connection through to the gRPC server.

gRPC Python reports a Unix-socket peer as ``unix:`` plus the client's bound address, and gives a
handler no way to reach the connection's file descriptor, so ``SO_PEERCRED`` cannot be read from
inside a call. The gate owns the public socket instead. For each accepted connection it reads
``SO_PEERCRED`` (the pid, uid and gid that the kernel recorded at ``connect()``), opens a
connection to gRPC's internal socket from a fresh, unguessable abstract address, remembers
"abstract address -> credentials", and moves bytes both ways with ``splice(2)`` (through a pipe,
so the bytes stay in the kernel). gRPC then reports that abstract address as the call's peer,
and the server looks the credentials up on every call. A connection made to the internal socket
by anyone else has no entry and is refused.

A connection whose first bytes are :data:`~workload.wire.FRAMED_PREFACE` is a *data connection*
(sidecar.dataplane.framed): the gate consumes the preface and hands the socket, with the same
credentials, to the ``data_handler`` on the connection's own thread, without gRPC. gRPC clients
start with the HTTP/2 preface ("PRI * HTTP/2.0"), which cannot be mistaken for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.dataplane.errors import SocketSetupError
from sidecar.dataplane.peers import PeerCredentials, peer_credentials
from workload.wire import FRAMED_PREFACE

#: Serves one data connection (the preface consumed) for the peer with these credentials.
DataHandler = Callable[[socket.socket, PeerCredentials], None]

__all__ = [
    "GRPC_PEER_PREFIX",
    "DataHandler",
    "PeerGate",
    "check_private_ancestry",
    "check_socket_path",
]

_log = logging.getLogger(__name__)
_audit = logging.getLogger("sidecar.dataplane.audit")

#: How gRPC names a peer bound to an abstract Unix address.
GRPC_PEER_PREFIX = "unix-abstract:"

_TAG_PREFIX = "cleanroom-workload-"

# How long a client that sent part of the data-connection preface may take to send the rest.
_PREFACE_WAIT = 10.0

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def check_socket_path(path: Path) -> None:
    """Raises SocketSetupError when ``path`` is too long for a Unix socket address."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise SocketSetupError(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes; use a shorter directory"
        )


def _ancestry_problem(path: Path, st: os.stat_result, euid: int) -> str | None:
    """Why another user could replace entries of the directory ``path``, or None."""
    if st.st_uid not in (0, euid):
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        who = "all users" if st.st_mode & 0o002 else f"group {st.st_gid}"
        return (
            f"{path} is writable by {who} without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return None


def check_private_ancestry(path: Path) -> None:
    """Checks that no other user can rename or replace ``path`` or any directory above it.

    A directory that another user can write without the sticky bit (or that another non-root
    user owns) lets that user rename the socket directory away and put an impostor socket in
    its place, which would then receive the workload's outputs. The components that do not
    exist yet are left out (they are created by us); the path is checked both as written and
    with its symbolic links resolved.

    Raises:
        SocketSetupError: names the first such directory and why.
    """
    euid = os.geteuid()
    written = Path(os.path.abspath(path))
    candidates = [written, *written.parents]
    resolved = Path(os.path.realpath(written))
    candidates += [p for p in (resolved, *resolved.parents) if p not in candidates]
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SocketSetupError(f"cannot inspect {candidate}: {e.strerror or e}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise SocketSetupError(f"{candidate} is not a directory")
        problem = _ancestry_problem(candidate, st, euid)
        if problem is not None:
            raise SocketSetupError(
                f"{problem}: another user could replace the socket directory {written}; "
                "use a directory that only root and this user can write"
            )


class _Link:
    """One workload connection and its upstream connection to gRPC, pumped by two threads."""

    def __init__(
        self,
        *,
        gate: PeerGate,
        client: socket.socket,
        upstream: socket.socket,
        tag: str,
        credentials: PeerCredentials,
    ) -> None:
        self.gate = gate
        self.client = client
        self.upstream = upstream
        self.tag = tag
        self.credentials = credentials
        self._lock = threading.Lock()
        self._running = 2
        self.threads = (
            threading.Thread(
                target=self._pump, args=(client, upstream), name="workload-gate-in", daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(upstream, client), name="workload-gate-out", daemon=True
            ),
        )

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        size = self.gate.pipe_size
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            _log.warning("workload socket: cannot create a pipe: %s", e)
            self.shutdown()
            self._pump_done()
            return
        try:
            with contextlib.suppress(OSError):
                # A bigger pipe moves more per system call; the system limit may refuse it.
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
            src_fd, dst_fd = src.fileno(), dst.fileno()
            while True:
                n = os.splice(src_fd, w, size)
                if n == 0:
                    # End of stream: pass the half-close on, so that HTTP/2 sees it as the peer
                    # going away (never as a clean end of a request stream).
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                while n:
                    n -= os.splice(r, dst_fd, n)
        except OSError:
            # A reset or a shutdown by stop(): tear down both directions.
            self.shutdown()
        finally:
            os.close(r)
            os.close(w)
            self._pump_done()

    def _pump_done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            # Forget the address before closing, so it cannot be re-bound by someone else while
            # it still maps to these credentials.
            self.gate._forget(self)
            self.client.close()
            self.upstream.close()

    def shutdown(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class PeerGate:
    """Listens on ``listen_path`` (mode 0600) and splices each connection to ``upstream_path``,
    recording its peer credentials for :meth:`credentials_for`.

    The directory holding ``listen_path`` must already be private; the socket is made mode
    0600 before ``listen()``, so no client can connect while it is more open.
    """

    def __init__(
        self,
        *,
        listen_path: Path,
        upstream_path: Path,
        max_connections: int = 64,
        pipe_size: int = 1 << 20,
        data_handler: DataHandler | None = None,
    ) -> None:
        self.listen_path = listen_path
        self.upstream_path = upstream_path
        self.max_connections = max_connections
        self.pipe_size = pipe_size
        self.data_handler = data_handler
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}
        # Connections being routed or served as data connections, with their threads.
        self._direct: dict[socket.socket, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Binds, restricts and starts listening on the public socket.

        Raises:
            SocketSetupError: the socket cannot be created, restricted or listened on.
        """
        check_socket_path(self.listen_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fspath(self.listen_path))
            # bind() created the file with the umask's mode; narrow it before listen(), since
            # connect() only succeeds once the socket listens.
            os.chmod(self.listen_path, 0o600)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise SocketSetupError(
                f"cannot create the workload socket {self.listen_path}: {e.strerror or e}"
            ) from e
        self._listener = sock
        self._thread = threading.Thread(
            target=self._accept_loop, name="workload-gate-accept", daemon=True
        )
        self._thread.start()

    def credentials_for(self, grpc_peer: str) -> PeerCredentials | None:
        """The credentials of the workload connection that gRPC names ``grpc_peer``, or None
        when the call did not come through this gate."""
        if not grpc_peer.startswith(GRPC_PEER_PREFIX):
            return None
        with self._lock:
            link = self._links.get(grpc_peer[len(GRPC_PEER_PREFIX) :])
        return None if link is None else link.credentials

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                # Out of descriptors or a transient failure: do not spin.
                _log.warning("workload socket: accept failed: %s", e)
                time.sleep(0.05)
                continue
            try:
                self._admit(client)
            except Exception:
                _log.exception("workload socket: cannot set up a connection")
                client.close()

    def _admit(self, client: socket.socket) -> None:
        client.setblocking(True)
        creds = peer_credentials(client)
        with self._lock:
            full = len(self._links) + len(self._direct) >= self.max_connections
        if full:
            _audit.warning(
                "workload socket: refused connection from pid=%d uid=%d gid=%d: "
                "too many connections (%d)",
                creds.pid,
                creds.uid,
                creds.gid,
                self.max_connections,
            )
            client.close()
            return
        if self.data_handler is None:
            self._splice(client, creds)
            return
        # Which protocol the client speaks shows only in its first bytes, which a slow client
        # may take its time to send: decide on the connection's own thread, not this one.
        thread = threading.Thread(
            target=self._route, args=(client, creds), name="workload-gate-conn", daemon=True
        )
        with self._lock:
            self._direct[client] = thread
        thread.start()

    def _route(self, client: socket.socket, creds: PeerCredentials) -> None:
        """Serves a data connection in this thread, or splices anything else to gRPC."""
        handler = self.data_handler
        assert handler is not None
        spliced = False
        try:
            if self._is_data_connection(client):
                handler(client, creds)
            else:
                with self._lock:
                    self._direct.pop(client, None)
                spliced = True
                self._splice(client, creds)
        except Exception:
            _log.exception("workload socket: a connection failed")
        finally:
            if not spliced:
                with self._lock:
                    self._direct.pop(client, None)
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
                client.close()

    def _is_data_connection(self, client: socket.socket) -> bool:
        """True (the preface consumed) when the client starts with the data preface; False,
        with nothing consumed, as soon as its first bytes differ from it."""
        want = len(FRAMED_PREFACE)
        deadline: float | None = None
        while True:
            head = client.recv(want, socket.MSG_PEEK)
            if not FRAMED_PREFACE.startswith(head) or not head:
                return False
            if len(head) == want:
                client.recv(want, socket.MSG_WAITALL)
                return True
            # A prefix of the preface so far: wait a little for the rest (never busy-loop),
            # and not for ever: a client stuck halfway goes to gRPC, which refuses it.
            now = time.monotonic()
            deadline = now + _PREFACE_WAIT if deadline is None else deadline
            if now >= deadline:
                return False
            time.sleep(0.001)

    def _splice(self, client: socket.socket, creds: PeerCredentials) -> None:
        """Connects ``client`` through to gRPC's internal socket."""
        tag = _TAG_PREFIX + secrets.token_hex(16)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        link = _Link(gate=self, client=client, upstream=upstream, tag=tag, credentials=creds)
        try:
            upstream.bind(b"\0" + tag.encode("ascii"))
            # Registered before connecting: gRPC may dispatch the first call as soon as it
            # accepts, and the lookup must find the credentials then.
            with self._lock:
                self._links[tag] = link
            upstream.connect(os.fspath(self.upstream_path))
        except OSError as e:
            self._forget(link)
            upstream.close()
            client.close()
            _log.warning("workload socket: cannot reach the gRPC server: %s", e)
            return
        _log.debug(
            "workload socket: connection from pid=%d uid=%d gid=%d", creds.pid, creds.uid, creds.gid
        )
        link.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            if self._links.get(link.tag) is link:
                del self._links[link.tag]

    def stop_accepting(self) -> None:
        """Stops accepting new connections and removes the socket file; open ones continue."""
        self._stopping.set()
        listener = self._listener
        if listener is not None:
            # shutdown() wakes a thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()

    def wait_for_data_connections(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the data connections being served to end."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._direct.values())
            if not threads or time.monotonic() >= deadline:
                return
            threads[0].join(timeout=max(0.0, deadline - time.monotonic()))

    def close_all(self, timeout: float = 5.0) -> None:
        """Shuts every open connection down and waits for its threads."""
        with self._lock:
            links = list(self._links.values())
            direct = list(self._direct.items())
        for link in links:
            link.shutdown()
        for sock, _ in direct:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        threads = [t for link in links for t in link.threads] + [t for _, t in direct]
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stops accepting and closes every connection."""
        self.stop_accepting()
        self.close_all()
