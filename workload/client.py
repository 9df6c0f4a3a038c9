"""The workload's client for the sidecar's Unix socket: plaintext inputs in, outputs out.

A workload never handles keys. It opens inputs by name and reads plaintext streams; it creates
outputs by name and writes plaintext streams, which the sidecar seals to the recipients the
approved workload names. See docs/workload-sdk.md.

Inputs and outputs travel over data connections (one Unix connection each, length-prefixed
frames, see workload.wire), which move bytes several times faster than gRPC streams; listing the
inputs is a gRPC call on the same socket.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import os
import select
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError

from cleanroom.closing import AbortOnError, Closeable
from cleanroom.v1 import workload_pb2, workload_pb2_grpc
from workload.errors import (
    AccessDeniedError,
    InputIntegrityError,
    InputNotFoundError,
    InputTooLargeError,
    InputUnavailableError,
    OutputFailedError,
    OutputRejectedError,
    ProtocolError,
    SidecarConnectionError,
    WorkloadError,
)
from workload.wire import (
    FRAME_HEADER,
    FRAMED_PREFACE,
    MAX_NAME_BYTES,
    FrameType,
    ReadFrame,
    decode_error_frame,
    frame_header,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_SEEKABLE_BYTES",
    "SOCKET_ENV",
    "Client",
    "InputInfo",
    "InputStream",
    "OutputReceipt",
    "OutputStream",
    "TextOutputStream",
    "seekable_copy",
]

#: The environment variable that holds the sidecar's socket path.
SOCKET_ENV: Final = "CLEANROOM_WORKLOAD_SOCKET"

#: Plaintext bytes per WriteOutput message.
DEFAULT_CHUNK_SIZE: Final = 1 << 20

#: Largest gRPC message sent or received; the sidecar's default limit.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 << 20

#: Largest input :func:`seekable_copy` holds in memory by default (512 MiB).
DEFAULT_MAX_SEEKABLE_BYTES: Final = 512 << 20

# Kernel buffer per direction of a data connection: a few chunks in flight keep both processes
# busy. The kernel caps it (net.core.wmem_max / rmem_max).
_SOCKET_BUFFER: Final = 4 << 20
_STATUS_BY_NUMBER: Final = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class InputInfo:
    """An input the sidecar offers: its name, the party that owns it, its plaintext size (None
    when the sidecar does not know it)."""

    name: str
    owner_party: str
    size: int | None


@dataclass(frozen=True)
class OutputReceipt:
    """What the sidecar made of a committed output: its name, the plaintext bytes it sealed and
    the parties it sealed them to."""

    name: str
    plaintext_bytes: int
    recipients: tuple[str, ...]


def _translate(e: grpc.RpcError, what: str, *, output: bool = False) -> WorkloadError:
    """Maps a failed call's status to the SDK's error for it."""
    if not isinstance(e, grpc.Call):
        return WorkloadError(f"{what}: {e}")
    code = e.code()
    return _status_error(code, e.details() or code.name, what, output=output)


def _status_error(
    code: grpc.StatusCode, details: str, what: str, *, output: bool = False
) -> WorkloadError:
    """The SDK's error for a call that ended with ``code`` (gRPC or a data connection)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return SidecarConnectionError(f"{what}: the sidecar is unreachable: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return AccessDeniedError(f"{what}: {details}")
    if output:
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
            return OutputRejectedError(f"{what}: {details}")
        return OutputFailedError(f"{what}: not committed ({code.name}): {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return InputNotFoundError(f"{what}: {details}")
    if code == grpc.StatusCode.DATA_LOSS:
        return InputIntegrityError(f"{what}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return InputUnavailableError(f"{what}: {details}")
    if code == grpc.StatusCode.INTERNAL and "deserializ" in details.lower():
        return ProtocolError(f"{what}: unexpected message from the sidecar: {details}")
    return WorkloadError(f"{what}: {code.name}: {details}")


class _DataConnection:
    """One data connection to the sidecar: the preface and the opening frame are sent at once,
    frames are read back one at a time. Failures become the SDK's errors."""

    def __init__(self, path: str, kind: FrameType, name: str, *, max_frame: int) -> None:
        self._what = f"{'input' if kind == FrameType.OPEN_INPUT else 'output'} {name!r}"
        self._output = kind == FrameType.OPEN_OUTPUT
        self._max_frame = max_frame
        self._sock: socket.socket | None = None
        self.error: WorkloadError | None = None
        self._poll: select.poll | None = None
        raw = name.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_NAME_BYTES:
            self.error = (OutputRejectedError if self._output else InputNotFoundError)(
                f"{self._what}: the name is longer than {MAX_NAME_BYTES} bytes"
            )
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            sock.connect(path)
            sock.sendall(FRAMED_PREFACE + frame_header(kind, len(raw)) + raw)
        except OSError as e:
            sock.close()
            self.error = SidecarConnectionError(
                f"{self._what}: the sidecar is unreachable: {e.strerror or e}"
            )
            return
        self._sock = sock

    def _live(self) -> socket.socket:
        if self.error is not None:
            raise self.error
        if self._sock is None:
            raise ValueError(f"{self._what}: the connection is closed")
        return self._sock

    def _fail(self, error: WorkloadError) -> WorkloadError:
        self.error = error
        self.close()
        return error

    def _recv(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only when the sidecar closed the connection)."""
        sock = self._live()
        try:
            data = sock.recv(n, socket.MSG_WAITALL)
            while 0 < len(data) < n:
                more = sock.recv(n - len(data), socket.MSG_WAITALL)
                if not more:
                    break
                data += more
        except OSError as e:
            raise self._broken(e) from e
        return data

    def _broken(self, e: OSError | None = None) -> WorkloadError:
        detail = f": {e.strerror or e}" if e is not None else ""
        if self._output:
            return self._fail(
                OutputFailedError(f"{self._what}: not committed: the connection broke{detail}")
            )
        return self._fail(
            InputIntegrityError(
                f"{self._what}: the stream ended before the sidecar confirmed its end{detail}; "
                "discard what was read"
            )
        )

    def next_frame(self) -> tuple[int, bytes]:
        """(type, payload) of the next frame; an ERROR frame is raised as the SDK's error.

        Raises:
            InputIntegrityError: (inputs) the connection ended before END.
            OutputFailedError: (outputs) the connection ended before the receipt.
            ProtocolError: a frame over the size limit or of an unknown type.
            WorkloadError: the sidecar's ERROR frame, translated.
        """
        head = self._recv(FRAME_HEADER.size)
        if len(head) < FRAME_HEADER.size:
            raise self._broken()
        kind, length = FRAME_HEADER.unpack(head)
        if length > self._max_frame:
            raise self._fail(
                ProtocolError(f"{self._what}: the sidecar sent a frame of {length} bytes")
            )
        payload = self._recv(length) if length else b""
        if len(payload) < length:
            raise self._broken()
        if kind == FrameType.ERROR:
            number, details = decode_error_frame(payload)
            code = _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
            raise self._fail(_status_error(code, details, self._what, output=self._output))
        return kind, payload

    def send(self, kind: FrameType, payload: ReadableBuffer = b"") -> None:
        """Sends one frame from the caller's buffer (no copy in this process).

        Raises:
            WorkloadError: the sidecar already answered with an error (it refused the call), or
                the connection broke.
        """
        sock = self._live()
        # The sidecar answers early only to refuse; look before sending more. poll(), not
        # select(): a workload may hold more than FD_SETSIZE descriptors.
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN)
        if self._poll.poll(0):
            self.next_frame()
            raise self._fail(ProtocolError(f"{self._what}: the sidecar answered before the end"))
        view = memoryview(payload).cast("B")
        parts = [memoryview(frame_header(kind, len(view))), view]
        try:
            while parts:
                n = sock.sendmsg(parts)
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts and n:
                    parts[0] = parts[0][n:]
        except OSError as e:
            # A refusal may be waiting behind the broken pipe.
            with contextlib.suppress(WorkloadError):
                self.next_frame()
            if self.error is not None:
                raise self.error from e
            raise self._broken(e) from e

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class InputStream(io.RawIOBase):
    """An input's plaintext as a read-only binary file (a context manager).

    ``read(n)`` returns ``n`` bytes unless the input ends first, as a buffered file does;
    ``read1``, ``readinto``, ``readline``, iteration by lines and :meth:`chunks` work too. The
    end of the input (``b""``) is reported only after the sidecar has authenticated all of it.
    If it cannot, reading raises :class:`InputIntegrityError` (and keeps raising it): discard
    whatever was read. Closing before the end cancels the stream.
    """

    def __init__(self, connection: _DataConnection, name: str) -> None:
        super().__init__()
        self._conn = connection
        self._name = name
        # The current chunk is _data[_pos:_end]; _data is the received message itself.
        self._data = b""
        self._pos = 0
        self._end = 0
        self._ended = False
        self._error: WorkloadError | None = None
        self._bytes_read = 0

    @property
    def name(self) -> str:
        """The input's name."""
        return self._name

    @property
    def bytes_read(self) -> int:
        """Plaintext bytes handed out so far."""
        return self._bytes_read

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Makes sure unread bytes are buffered; False at the authenticated end.

        Raises:
            InputIntegrityError: the stream ended with DATA_LOSS or without end_of_input.
            WorkloadError: another failure (see the tree in workload.errors).
        """
        if self._error is not None:
            raise self._error
        if self.closed:
            raise ValueError("I/O operation on closed input stream")
        while self._pos >= self._end:
            if self._ended:
                return False
            try:
                kind, payload = self._conn.next_frame()
            except WorkloadError as e:
                self._error = e
                raise
            if kind == FrameType.DATA:
                frame = ReadFrame(payload, 0, len(payload), False)
            elif kind == FrameType.END:
                frame = ReadFrame(b"", 0, 0, True)
                # Nothing follows END: the sidecar's stream is complete.
                self._conn.close()
            else:
                self._error = ProtocolError(
                    f"input {self._name!r}: unexpected frame type {kind} from the sidecar"
                )
                self._conn.close()
                raise self._error
            self._data, self._pos, self._end, self._ended = frame
        return True

    def _take(self, n: int) -> memoryview:
        """Up to ``n`` buffered bytes (after _fill returned True)."""
        start = self._pos
        end = min(self._end, start + n)
        self._pos = end
        self._bytes_read += end - start
        return memoryview(self._data)[start:end]

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fills ``buffer``; fewer bytes than its length only at the end of the input.

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        dest = memoryview(buffer).cast("B")
        got = 0
        while got < len(dest) and self._fill():
            part = self._take(len(dest) - got)
            dest[got : got + len(part)] = part
            got += len(part)
        return got

    def readinto1(self, buffer: WriteableBuffer) -> int:
        """Fills ``buffer`` from at most one received chunk.

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        dest = memoryview(buffer).cast("B")
        if not len(dest) or not self._fill():
            return 0
        part = self._take(len(dest))
        dest[: len(part)] = part
        return len(part)

    def read(self, size: int | None = -1) -> bytes:
        """Reads ``size`` bytes (all the rest when negative); fewer only at the end.

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        if size is None or size < 0:
            return self.readall()
        if size == 0 or not self._fill():
            return b""
        if self._end - self._pos >= size:
            return bytes(self._take(size))
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def read1(self, size: int = -1) -> bytes:
        """Reads up to ``size`` bytes from at most one received chunk (any amount if negative).

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        if size == 0 or not self._fill():
            return b""
        return bytes(self._take(self._end if size < 0 else size))

    def readall(self) -> bytes:
        """Reads to the end of the input (memory grows with it; prefer :meth:`chunks`).

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        return b"".join(bytes(c) for c in self.chunks())

    def chunks(self) -> Iterator[memoryview]:
        """Yields the rest of the input as received, without copying (never empty chunks).

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        while self._fill():
            yield self._take(self._end)

    def readline(self, size: int | None = -1) -> bytes:
        """Reads one line (up to ``size`` bytes), ending with ``b"\\n"`` unless at the end.

        Raises:
            InputIntegrityError, WorkloadError: see the class.
        """
        limit = -1 if size is None else size
        parts: list[bytes] = []
        got = 0
        while (limit < 0 or got < limit) and self._fill():
            stop = self._end if limit < 0 else min(self._end, self._pos + limit - got)
            newline = self._data.find(b"\n", self._pos, stop)
            if newline >= 0:
                parts.append(bytes(self._take(newline + 1 - self._pos)))
                break
            want = stop - self._pos
            parts.append(bytes(self._take(want)))
            got += want
        return b"".join(parts)

    def close(self) -> None:
        """Closes the stream, cancelling it when not read to the end."""
        if not self.closed:
            # Closing the connection before END cancels the stream in the sidecar.
            self._conn.close()
            self._data, self._pos, self._end = b"", 0, 0
        super().close()

    def __repr__(self) -> str:
        return f"<InputStream {self._name!r}>"


class OutputStream(AbortOnError, io.RawIOBase):
    """A writable binary stream that becomes a sealed output (a context manager).

    Leaving the ``with`` block normally, or calling :meth:`commit` (or :meth:`close`), commits
    the output; leaving it with an exception, calling :meth:`abort`, or dropping the stream
    unclosed discards it, and the sidecar keeps nothing that looks complete. Writes are
    buffered into chunks and sent over the output's own connection; a full socket makes
    ``write`` wait, so memory stays bounded.
    """

    def __init__(self, client: Client, name: str, *, chunk_size: int) -> None:
        super().__init__()
        self._name = name
        self._chunk = chunk_size
        self._pending = bytearray()
        self._finished = False
        self._receipt: OutputReceipt | None = None
        self._bytes_written = 0
        self._conn = _DataConnection(
            client.socket_path, FrameType.OPEN_OUTPUT, name, max_frame=client._max_message
        )

    @property
    def name(self) -> str:
        """The output's name."""
        return self._name

    @property
    def receipt(self) -> OutputReceipt | None:
        """The sidecar's receipt once committed."""
        return self._receipt

    @property
    def bytes_written(self) -> int:
        """Plaintext bytes accepted by :meth:`write` so far."""
        return self._bytes_written

    def writable(self) -> bool:
        return True

    def _send(self, chunk: ReadableBuffer) -> None:
        try:
            self._conn.send(FrameType.DATA, chunk)
        except WorkloadError:
            self._finished = True
            raise

    def _check_open(self) -> None:
        if self._finished or self.closed:
            raise ValueError(f"output {self._name!r} is already committed or aborted")

    def write(self, data: ReadableBuffer) -> int:
        """Sends ``data`` for sealing; returns its length.

        Raises:
            OutputRejectedError: the sidecar refused the output (bad or existing name).
            OutputFailedError, WorkloadError: the output failed; it will not be committed.
            ValueError: the output is already committed or aborted.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        if self._pending:
            take = min(self._chunk - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == self._chunk:
                self._send(self._pending)
                self._pending.clear()
        # Whole chunks go straight from the caller's buffer to the socket.
        while len(view) >= self._chunk:
            self._send(view[: self._chunk])
            view = view[self._chunk :]
        if view:
            self._pending += view
        self._bytes_written += total
        return total

    def commit(self) -> OutputReceipt:
        """Sends what is buffered and the COMMIT frame, and waits for the sidecar's receipt.

        Raises:
            OutputRejectedError, OutputFailedError, WorkloadError: the output was not committed.
            ValueError: already committed or aborted.
        """
        self._check_open()
        try:
            if self._pending:
                self._send(self._pending)
                self._pending.clear()
            self._conn.send(FrameType.COMMIT, self._name.encode("utf-8", "surrogatepass"))
            kind, payload = self._conn.next_frame()
            if kind != FrameType.RECEIPT:
                raise ProtocolError(
                    f"output {self._name!r}: unexpected frame type {kind} instead of a receipt"
                )
            try:
                response = workload_pb2.WriteOutputResponse.FromString(payload)
            except DecodeError as e:
                raise ProtocolError(f"output {self._name!r}: malformed receipt") from e
            self._receipt = OutputReceipt(
                name=response.name,
                plaintext_bytes=response.plaintext_bytes,
                recipients=tuple(response.recipients),
            )
            return self._receipt
        finally:
            self._finished = True
            self._conn.close()
            super().close()

    def abort(self) -> None:
        """Discards the output. Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._pending.clear()
        # A connection that ends without COMMIT is discarded by the sidecar.
        self._conn.close()
        super().close()

    def close(self) -> None:
        """Commits the output unless it is already committed or aborted (see :meth:`commit`).

        Raises:
            OutputRejectedError, OutputFailedError, WorkloadError: the output was not committed.
        """
        if not self._finished:
            self.commit()
        super().close()

    def __del__(self) -> None:
        # A stream that was never committed must not be committed by garbage collection
        # (io.IOBase.__del__ would call close(), which commits).
        with contextlib.suppress(Exception):
            self.abort()

    def __repr__(self) -> str:
        return f"<OutputStream {self._name!r}>"


class TextOutputStream(AbortOnError, io.TextIOWrapper):
    """A text output: a text wrapper over an :class:`OutputStream` that commits when its
    ``with`` block ends normally and aborts when it ends with an exception."""

    def __init__(self, raw: OutputStream, *, encoding: str, newline: str | None) -> None:
        super().__init__(raw, encoding=encoding, newline=newline, write_through=False)
        self._raw = raw

    @property
    def receipt(self) -> OutputReceipt | None:
        """The sidecar's receipt once committed."""
        return self._raw.receipt

    def abort(self) -> None:
        """Discards the output. Idempotent."""
        # Once the raw stream is closed, TextIOWrapper.close() does nothing, so buffered text
        # is dropped rather than written.
        self._raw.abort()

    def __del__(self) -> None:
        # As for OutputStream: garbage collection must not commit (TextIOWrapper's finalizer
        # would close, and closing commits).
        with contextlib.suppress(Exception):
            self._raw.abort()


def seekable_copy(
    stream: IO[bytes] | InputStream, *, max_bytes: int = DEFAULT_MAX_SEEKABLE_BYTES, name: str = ""
) -> io.BytesIO:
    """The rest of ``stream`` as a seekable in-memory file, for readers that need random access
    (Parquet reads its footer first). The copy lives only in this process's memory, never on
    disk, and holds at most ``max_bytes``.

    The sidecar serves an input only as one authenticated forward stream, so a seekable view
    costs the input's size in memory; the limit turns an input too large for that into a clear
    error instead of an exhausted TEE. Stream CSV instead when an input may be that large.

    Raises:
        InputTooLargeError: the stream holds more than ``max_bytes``.
        InputIntegrityError, WorkloadError: reading the stream failed (see :class:`InputStream`).
    """
    copy = io.BytesIO()
    while chunk := stream.read(min(1 << 20, max_bytes + 1 - copy.tell())):
        copy.write(chunk)
        if copy.tell() > max_bytes:
            copy.close()
            what = f"input {name!r}" if name else "the input"
            raise InputTooLargeError(
                f"{what} is larger than {max_bytes} bytes, the limit for an in-memory seekable "
                "copy; raise max_bytes or stream it (CSV) instead"
            )
    copy.seek(0)
    return copy


class Client(Closeable):
    """A connection to the sidecar's workload socket (a context manager).

    Args:
        socket_path: the sidecar's Unix socket (``CLEANROOM_WORKLOAD_SOCKET``).
        chunk_size: plaintext bytes per output message.
        max_message_size: largest message sent or received (the sidecar's limit).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if chunk_size < 1 or chunk_size + 64 > max_message_size:
            raise ValueError("chunk_size must be positive and fit in max_message_size")
        self._path = os.fspath(socket_path)
        self._chunk = chunk_size
        self._channel = grpc.insecure_channel(
            f"unix:{self._path}",
            options=[
                ("grpc.max_receive_message_length", max_message_size),
                ("grpc.max_send_message_length", max_message_size),
                ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
                ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
                ("grpc.experimental.tcp_max_read_chunk_size", 1 << 20),
            ],
        )
        self._stub = workload_pb2_grpc.WorkloadServiceStub(self._channel)
        self._max_message = max_message_size

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> Client:
        """A client for the socket named by ``CLEANROOM_WORKLOAD_SOCKET``.

        Raises:
            SidecarConnectionError: the variable is unset or empty.
        """
        path = (os.environ if env is None else env).get(SOCKET_ENV, "")
        if not path:
            raise SidecarConnectionError(
                f"{SOCKET_ENV} is not set: run this workload under the clean-room sidecar"
            )
        return cls(path, **kwargs)

    @property
    def socket_path(self) -> str:
        """The socket this client talks to."""
        return self._path

    def list_inputs(self) -> list[InputInfo]:
        """The inputs the sidecar offers.

        Raises:
            SidecarConnectionError, AccessDeniedError, WorkloadError: the call failed.
        """
        try:
            response = self._stub.ListInputs(workload_pb2.ListInputsRequest())
        except grpc.RpcError as e:
            raise _translate(e, "list inputs") from e
        return [InputInfo(i.name, i.owner_party, i.size or None) for i in response.inputs]

    def open_input(self, name: str) -> InputStream:
        """Opens an input's plaintext stream (use it in a ``with`` block).

        Errors of the call itself (unknown name, access denied) surface at the first read.

        Raises:
            WorkloadError: the call cannot be started.
        """
        connection = _DataConnection(
            self._path, FrameType.OPEN_INPUT, name, max_frame=self._max_message
        )
        return InputStream(connection, name)

    def open_seekable_input(
        self, name: str, *, max_bytes: int = DEFAULT_MAX_SEEKABLE_BYTES
    ) -> io.BytesIO:
        """Reads a whole input into a seekable in-memory file (see :func:`seekable_copy`), for
        ``pyarrow.parquet.read_table`` and other readers that need random access.

        Raises:
            InputTooLargeError: the input holds more than ``max_bytes``.
            InputIntegrityError, InputNotFoundError, WorkloadError: see :class:`InputStream`.
        """
        with self.open_input(name) as stream:
            return seekable_copy(stream, max_bytes=max_bytes, name=name)

    def create_output(self, name: str) -> OutputStream:
        """Starts an output (use it in a ``with`` block; see :class:`OutputStream`).

        ``name`` is a relative path such as ``"insights/summary.csv"``; the sidecar stores it
        sealed as ``<name>.sealed``. A refused name surfaces at the first write or at commit.
        """
        return OutputStream(self, name, chunk_size=self._chunk)

    def create_text_output(
        self, name: str, *, encoding: str = "utf-8", newline: str | None = ""
    ) -> TextOutputStream:
        """Starts a text output (see :meth:`create_output`); ``newline=""`` suits the csv
        module."""
        return TextOutputStream(self.create_output(name), encoding=encoding, newline=newline)

    def read_csv(
        self, name: str, *, encoding: str = "utf-8", **fmtparams: Any
    ) -> Iterator[dict[str, str]]:
        """Yields the rows of a CSV input as dicts keyed by its header row.

        ``fmtparams`` go to :class:`csv.DictReader` (``delimiter=";"``, ``fieldnames=...``).
        The iteration ends normally only after the whole input authenticated; an integrity
        failure raises :class:`InputIntegrityError` from it instead, and every row already read
        must then be discarded.

        Raises:
            InputIntegrityError, InputNotFoundError, WorkloadError: see :class:`InputStream`.
        """
        with (
            self.open_input(name) as raw,
            io.TextIOWrapper(raw, encoding=encoding, newline="") as text,
        ):
            # Iteration ends normally only after the sidecar confirmed the end of the input.
            yield from csv.DictReader(text, **fmtparams)

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __repr__(self) -> str:
        return f"Client({self._path!r})"


_default_lock = threading.Lock()
_default: Client | None = None


def default_client() -> Client:
    """The process's shared client, made from the environment on first use.

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Client.from_env()
            # Close the channel before the interpreter tears down: gRPC's threads and an
            # unclosed channel can otherwise hold up the workload's exit.
            atexit.register(_default.close)
        return _default
