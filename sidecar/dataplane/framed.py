"""The data connection: inputs and outputs as length-prefixed frames on the workload socket.

gRPC costs the data path most of its throughput (HTTP/2 framing, a copy into and out of every
message, a hop through the gate's splice), so the SDK moves bulk bytes over a plain connection
to the same socket instead: the :class:`~sidecar.dataplane.gate.PeerGate` recognises a
connection that starts with :data:`~workload.wire.FRAMED_PREFACE` and hands it, with the peer
credentials the kernel recorded at ``connect()``, to :func:`serve_data_connection` instead of
splicing it to gRPC. One connection carries one input or one output; the byte layout is in
docs/workload-sdk.md ("The data connection").

The promises are those of the gRPC calls, checked at the same points:

- the peer is checked when the call opens, and before every input chunk (the cheap pidfd
  lineage watch, the full /proc walk when it fired), so a reader that left the workload's tree
  is cut off;
- the key ring is checked before every input chunk and before an output opens and commits, so
  a failed re-attestation stops a read and discards an output;
- an input chunk is sent only once its segment authenticated: a decryption thread fills one
  buffer while the connection's thread sends the previous one, and a segment that fails stops
  the stream with an ERROR frame before any of its bytes (or any later byte) are sent; END is
  sent only after the final segment authenticated with nothing after it;
- an output is committed only on an explicit COMMIT frame repeating its name; a connection that
  ends any other way discards it.

Memory stays at a few chunk buffers per connection whatever the size of the input or output.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from typing import TYPE_CHECKING, Final

import grpc

from cleanroom.v1 import workload_pb2
from sealing.errors import SealingError
from sidecar.dataplane.errors import CallRefusedError as _Failed
from sidecar.dataplane.errors import DataConnectionClosedError as _Gone
from sidecar.dataplane.errors import KeyRingError, WorkloadOutputError
from sidecar.dataplane.peers import PeerCredentials
from workload.wire import (
    FRAME_HEADER,
    MAX_NAME_BYTES,
    FrameType,
    encode_error_frame,
    frame_header,
)

if TYPE_CHECKING:
    from sealing.envelope import OpenReader
    from sidecar.dataplane.outputs import OutputWriter
    from sidecar.dataplane.server import WorkloadServer

__all__ = ["serve_data_connection"]

_log = logging.getLogger(__name__)
_audit = logging.getLogger("sidecar.dataplane.audit")

# Buffers per input stream: one being decrypted, one being sent, one spare so that decryption
# never waits for the socket while there is room.
_READ_BUFFERS: Final = 3
_HEADER: Final = FRAME_HEADER.size
_SOCKET_BUFFER: Final = 4 << 20


def _send(conn: socket.socket, *parts: bytes | memoryview) -> None:
    """Sends all of ``parts`` in as few system calls as the kernel allows.

    Raises:
        _Gone: the workload closed the connection.
    """
    views = [memoryview(p).cast("B") for p in parts]
    try:
        while views:
            n = conn.sendmsg(views, (), socket.MSG_NOSIGNAL)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    except OSError as e:
        raise _Gone from e


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fills ``view``; False when the connection ended before the first byte.

    Raises:
        _Gone: the connection ended or broke inside ``view``.
    """
    got = 0
    while got < len(view):
        try:
            n = conn.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        except OSError as e:
            raise _Gone from e
        if n == 0:
            if got == 0:
                return False
            raise _Gone
        got += n
    return True


def _read_frame_header(conn: socket.socket) -> tuple[int, int] | None:
    """(type, length) of the next frame, or None at a clean end of the connection."""
    raw = bytearray(_HEADER)
    if not _recv_exact(conn, memoryview(raw)):
        return None
    kind, length = FRAME_HEADER.unpack(raw)
    return kind, length


def _read_name(conn: socket.socket, length: int, what: str) -> str:
    if length > MAX_NAME_BYTES:
        raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is longer than {MAX_NAME_BYTES}")
    raw = bytearray(length)
    if length and not _recv_exact(conn, memoryview(raw)):
        raise _Gone
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is not valid UTF-8") from None


def serve_data_connection(
    server: WorkloadServer, conn: socket.socket, creds: PeerCredentials
) -> None:
    """Serves one data connection whose preface the gate has consumed; returns when it is done.

    Never raises: failures go to the workload as an ERROR frame (when it still listens) and to
    the log. The caller closes ``conn``.
    """
    # Room for a few chunks in flight in the kernel: the sender blocks, and switches to the
    # workload, less often. The kernel caps it (net.core.wmem_max).
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    try:
        head = _read_frame_header(conn)
        if head is None:
            return
        kind, length = head
        if kind == FrameType.OPEN_INPUT:
            name = _read_name(conn, length, "the input name")
            server._authorize_data(creds, "ReadInput")
            _serve_input(server, conn, name, creds)
        elif kind == FrameType.OPEN_OUTPUT:
            name = _read_name(conn, length, "the output name")
            server._authorize_data(creds, "WriteOutput")
            _serve_output(server, conn, name, creds)
        else:
            raise _Failed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a data connection must start with OPEN_INPUT or OPEN_OUTPUT, not type {kind}",
            )
    except _Failed as e:
        with contextlib.suppress(_Gone):
            _send(conn, encode_error_frame(e.code.value[0], e.details))
    except _Gone:
        _log.debug("data connection of pid %d closed by the workload", creds.pid)
    except Exception:
        _log.exception("data connection of pid %d failed", creds.pid)
        with contextlib.suppress(_Gone):
            _send(conn, encode_error_frame(grpc.StatusCode.INTERNAL.value[0], "internal error"))


# --- inputs -----------------------------------------------------------------------------------


class _Decryptor:
    """Decrypts an input's segments ahead of the sender, into a small pool of buffers.

    Each buffer has room for the frame header in front of the chunk, so a chunk leaves with one
    ``sendmsg`` straight from the buffer it was decrypted into. The thread hands over a buffer
    only after ``OpenReader.readinto`` returned, that is after its segments authenticated (and,
    at the end, after the final segment authenticated with nothing after it).
    """

    def __init__(self, reader: OpenReader, chunk: int) -> None:
        self._reader = reader
        self._chunk = chunk
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        self._ready: queue.Queue[tuple[bytearray | None, int, BaseException | None]] = queue.Queue()
        self._buffers = [bytearray(_HEADER + chunk) for _ in range(_READ_BUFFERS)]
        for buf in self._buffers:
            self._free.put(buf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload-decrypt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                buf = self._free.get()
                if buf is None:
                    return
                with memoryview(buf) as view:
                    n = self._reader.readinto(view[_HEADER : _HEADER + self._chunk])
                self._ready.put((buf, n, None))
                if n < self._chunk:
                    return
        except BaseException as e:
            self._ready.put((None, 0, e))

    def next(self) -> tuple[bytearray, int]:
        """The next decrypted buffer and its plaintext length (less than a chunk at the end).

        Raises:
            SealingError, OSError: decryption or reading failed (nothing of that segment is
                in any buffer handed out).
        """
        buf, n, err = self._ready.get()
        if err is not None:
            raise err
        assert buf is not None
        return buf, n

    def release(self, buf: bytearray) -> None:
        """Gives a buffer back for the next segment."""
        self._free.put(buf)

    def close(self) -> None:
        """Stops the thread, waits for it and wipes every buffer."""
        self._stop.set()
        self._free.put(None)
        self._thread.join()
        for buf in self._buffers:
            buf[:] = bytes(len(buf))


def _serve_input(
    server: WorkloadServer, conn: socket.socket, name: str, creds: PeerCredentials
) -> None:
    spec, f, reader = server._open_input(name)
    chunk = server._config.chunk_size
    sent = 0
    watch = server._watch_peer(creds)
    try:
        with f, reader:
            decryptor = _Decryptor(reader, chunk)
            try:
                while True:
                    try:
                        buf, n = decryptor.next()
                    except SealingError as e:
                        _log.warning("input %r failed authentication: %s", name, e)
                        raise _Failed(
                            grpc.StatusCode.DATA_LOSS,
                            f"input {name!r} failed authentication after {sent} bytes: {e}; "
                            "discard what was read",
                        ) from e
                    except OSError as e:
                        raise _Failed(
                            grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: cannot read: {e}"
                        ) from e
                    # The same checks as the gRPC stream, at the same point: before each chunk
                    # leaves. A renewal that no longer releases this input's key stops it for
                    # good (the reader holds its own copy of the key).
                    try:
                        server._keyring.check_key(spec.key_id)
                    except KeyRingError as e:
                        raise _Failed(
                            grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: {e}"
                        ) from e
                    if watch is None or not watch.intact():
                        server._recheck_peer(creds, f"ReadInput of {name!r}", sent)
                    if n:
                        FRAME_HEADER.pack_into(buf, 0, FrameType.DATA, n)
                        with memoryview(buf) as view:
                            _send(conn, view[: _HEADER + n])
                        sent += n
                    decryptor.release(buf)
                    if n < chunk:
                        _send(conn, frame_header(FrameType.END, 0))
                        break
            finally:
                decryptor.close()
    finally:
        if watch is not None:
            watch.close()
    _log.info("input %r served to pid %d: %d bytes, authenticated", name, creds.pid, sent)


# --- outputs ----------------------------------------------------------------------------------


def _serve_output(
    server: WorkloadServer, conn: socket.socket, name: str, creds: PeerCredentials
) -> None:
    writer = server._begin_output(name)
    committed = False
    try:
        _copy_output(server, conn, name, writer)
        receipt = server._commit_output(name, writer)
        committed = True
    finally:
        if not committed:
            writer.abort()
    _log.info("output %r from pid %d committed", name, creds.pid)
    response = workload_pb2.WriteOutputResponse(
        name=receipt.name,
        plaintext_bytes=receipt.plaintext_bytes,
        recipients=list(receipt.recipients),
    ).SerializeToString()
    _send(conn, frame_header(FrameType.RECEIPT, len(response)), response)


class _Sealer:
    """Seals an output's chunks on its own thread while the connection's thread receives the
    next ones, through a small pool of buffers (so memory stays bounded)."""

    def __init__(self, writer: OutputWriter, size: int) -> None:
        self._writer = writer
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._ready: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._buffers = [bytearray(size) for _ in range(_READ_BUFFERS)]
        for buf in self._buffers:
            self._free.put(buf)
        self._error: WorkloadOutputError | None = None
        self._thread = threading.Thread(target=self._run, name="workload-seal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._ready.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    with memoryview(buf) as view:
                        self._writer.write(view[:n])
                except WorkloadOutputError as e:
                    self._error = e
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise _Failed(grpc.StatusCode.INTERNAL, str(self._error))

    def buffer(self, size: int) -> bytearray:
        """A free buffer of at least ``size`` bytes (waits while all are being sealed).

        Raises:
            CallRefusedError: INTERNAL, sealing an earlier chunk failed.
        """
        buf = self._free.get()
        self._check()
        if len(buf) < size:
            self._buffers.remove(buf)
            buf[:] = bytes(len(buf))
            buf = bytearray(size)
            self._buffers.append(buf)
        return buf

    def submit(self, buf: bytearray, n: int) -> None:
        """Queues the first ``n`` bytes of ``buf`` for sealing."""
        self._ready.put((buf, n))

    def finish(self) -> None:
        """Waits until every queued chunk is sealed and wipes the buffers.

        Raises:
            CallRefusedError: INTERNAL, sealing failed.
        """
        self._ready.put(None)
        self._thread.join()
        for buf in self._buffers:
            buf[:] = bytes(len(buf))
        self._check()


def _copy_output(
    server: WorkloadServer, conn: socket.socket, name: str, writer: OutputWriter
) -> None:
    """Feeds DATA frames to ``writer`` (sealed on another thread) until the COMMIT frame, and
    returns once everything received is sealed.

    Raises:
        CallRefusedError: a protocol error, a frame over the size limit, or sealing failed.
        DataConnectionClosedError: the connection ended without COMMIT (the caller discards the
            output).
    """
    limit = server._config.max_message_size
    sealer = _Sealer(writer, server._config.chunk_size)
    finished = False
    try:
        while True:
            head = _read_frame_header(conn)
            if head is None:
                raise _Gone
            kind, length = head
            if kind == FrameType.DATA:
                if length > limit:
                    raise _Failed(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"output {name!r}: a frame of {length} bytes exceeds the limit of "
                        f"{limit} bytes",
                    )
                buf = sealer.buffer(length)
                with memoryview(buf) as view:
                    if length and not _recv_exact(conn, view[:length]):
                        raise _Gone
                sealer.submit(buf, length)
            elif kind == FrameType.COMMIT:
                if _read_name(conn, length, "the closing name") != name:
                    raise _Failed(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"output {name!r}: COMMIT must repeat the output's name",
                    )
                finished = True
                sealer.finish()
                return
            else:
                raise _Failed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output {name!r}: expected DATA or COMMIT, not frame type {kind}",
                )
    finally:
        if not finished:
            with contextlib.suppress(_Failed):
                sealer.finish()
