"""The prepared sidecar's control protocol, and its thin client (``sidecar run --prepared``).

The client must start fast: this module imports only the standard library's light modules
(no gRPC, protobuf, cryptography or tpm2-pytss); the server side is
:mod:`sidecar.run.prepared`.

Every message in either direction is a frame: a 4-byte big-endian length, then that many bytes
of UTF-8 JSON holding one object. The client's first frame is the request,
``{"version": 1, "argv": [...], "cwd": "...", "verbose": N}``, sent in one ``sendmsg`` whose
``SCM_RIGHTS`` carry exactly three descriptors: the client's stdin, stdout and stderr, which
become the run's 0, 1 and 2. Then the client sends ``{"signal": N}`` for each SIGINT, SIGTERM
or SIGHUP it receives, and the server sends ``{"exit": N}`` once, when the run is over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

from sidecar.errors import PreparedSidecarError

# Not typing.TYPE_CHECKING: importing typing costs the client 2 ms; type checkers treat any
# constant of this name alike.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType
    from typing import Any

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "FrameReader",
    "encode_frame",
    "run_prepared",
]

PROTOCOL_VERSION = 1

#: The largest frame accepted (a request is an argv and a path: far less).
MAX_FRAME = 64 * 1024

_HEADER = struct.Struct(">I")

#: The signals the client passes on to the run (which forwards them to the workload).
CLIENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame: the length, then the JSON object."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise PreparedSidecarError(f"control message of {len(body)} bytes (at most {MAX_FRAME})")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Reads frames from a stream socket, keeping what arrived beyond the current frame."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        """Bytes already received on the socket (with the request's descriptors)."""
        self._buffer += data

    def read(self) -> dict[str, Any] | None:
        """The next frame's object; None at end of file between frames.

        Raises:
            PreparedSidecarError: end of file inside a frame, a frame over :data:`MAX_FRAME`,
                or a body that is not a JSON object.
        """
        while True:
            if len(self._buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer)
                if length > MAX_FRAME:
                    raise PreparedSidecarError(f"control frame of {length} bytes is too long")
                end = _HEADER.size + length
                if len(self._buffer) >= end:
                    body, self._buffer = self._buffer[_HEADER.size : end], self._buffer[end:]
                    try:
                        message = json.loads(body)
                    except ValueError:
                        message = None
                    if not isinstance(message, dict):
                        raise PreparedSidecarError("control frame is not a JSON object")
                    return message
            data = self._sock.recv(MAX_FRAME)
            if not data:
                if self._buffer:
                    raise PreparedSidecarError("control connection closed inside a frame")
                return None
            self._buffer += data


def run_prepared(path: str, command: Sequence[str], *, verbose: int = 0) -> int:
    """Asks the prepared sidecar listening at ``path`` to run ``command`` with this process's
    stdin, stdout and stderr; forwards SIGINT/SIGTERM/SIGHUP; returns the run's exit status.

    Raises:
        PreparedSidecarError: no prepared sidecar listens at ``path``, or it ended the
            connection without an exit status (it refused the request; its log says why).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise PreparedSidecarError(
                f"no prepared sidecar at {path} ({e.strerror or e}); start it with "
                "'cleanroom sidecar serve' or run without --prepared"
            ) from None
        request = encode_frame(
            {
                "version": PROTOCOL_VERSION,
                "argv": list(command),
                "cwd": os.getcwd(),
                "verbose": verbose,
            }
        )
        old = {sig: signal.getsignal(sig) for sig in CLIENT_SIGNALS}

        def forward(signum: int, frame: FrameType | None) -> None:
            # The run forwards it to the workload (or stops before starting it).
            try:
                sock.sendall(encode_frame({"signal": signum}))
            except OSError:
                pass

        try:
            for sig in CLIENT_SIGNALS:
                signal.signal(sig, forward)
            try:
                sent = socket.send_fds(sock, [request], [0, 1, 2])
                sock.sendall(request[sent:])
            except OSError as e:
                raise PreparedSidecarError(
                    f"cannot pass the request to the prepared sidecar at {path}: {e.strerror or e}"
                ) from None
            reader = FrameReader(sock)
            while True:
                try:
                    message = reader.read()
                except OSError as e:
                    message = None
                    print(f"cleanroom: control connection: {e.strerror or e}", file=sys.stderr)
                if message is None:
                    raise PreparedSidecarError(
                        f"the prepared sidecar at {path} ended the connection without an exit "
                        "status (it refused the request or failed; see its log)"
                    )
                code = message.get("exit")
                if isinstance(code, int):
                    return code
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
