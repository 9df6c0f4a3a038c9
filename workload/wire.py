"""The data path's wire: the framed data connection, and fast encoding of the gRPC
WorkloadService's bulk messages.

The SDK moves input and output bytes over a *data connection*: a plain connection to the same
Unix socket that starts with :data:`FRAMED_PREFACE` and then carries length-prefixed frames
(:data:`FRAME_HEADER`, :class:`FrameType`), one input or output per connection. The byte-by-byte
layout is in docs/workload-sdk.md ("The data connection"). gRPC keeps ListInputs, and the gRPC
ReadInput/WriteOutput calls stay available to other clients; their encoding follows.


``ReadInputResponse`` and ``WriteOutputRequest`` carry the data path's bytes. Building a protobuf
message object per chunk copies the chunk into the message, again into the serialised form, and
once more when the field is read back, which costs about half of the data path's throughput. The
bulk messages hold a single ``bytes`` field (plus a flag), so this module writes and reads their
canonical protobuf wire form directly: ``tag, varint length, bytes``. The encoders produce
exactly what ``SerializeToString`` produces for the same message; the decoders accept that
canonical form and hand anything else (reordered or unknown fields, another implementation's
choices) to the real protobuf parser, so any protobuf peer interoperates. The server and the SDK
both use this module; tests check it against the generated protobuf classes.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING, Final, NamedTuple

from google.protobuf.message import DecodeError

from cleanroom.v1 import workload_pb2
from workload.errors import WireError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "END_OF_INPUT",
    "FRAMED_PREFACE",
    "FRAME_HEADER",
    "MAX_NAME_BYTES",
    "MAX_PREFIX",
    "SERVICE",
    "FrameType",
    "ReadFrame",
    "WireError",
    "decode_error_frame",
    "decode_read_response",
    "decode_write_request",
    "encode_error_frame",
    "encode_read_chunk",
    "encode_varint",
    "encode_write_chunk",
    "encode_write_name",
    "frame_header",
    "read_chunk_prefix",
]

#: The full gRPC service name.
SERVICE: Final = "cleanroom.v1.WorkloadService"

# Field tags: (field number << 3) | wire type (2 = length-delimited, 0 = varint).
_TAG_READ_CHUNK: Final = 0x0A  # ReadInputResponse.chunk = 1
_TAG_READ_END: Final = 0x10  # ReadInputResponse.end_of_input = 2
_TAG_WRITE_NAME: Final = 0x0A  # WriteOutputRequest.name = 1
_TAG_WRITE_CHUNK: Final = 0x12  # WriteOutputRequest.chunk = 2

#: A ReadInputResponse with only ``end_of_input = true``, as protobuf serialises it.
END_OF_INPUT: Final = bytes((_TAG_READ_END, 1))

#: The longest prefix (tag and length varint) a chunk of up to 2**63 bytes needs.
MAX_PREFIX: Final = 11


#: The first bytes of a data connection (an HTTP/2 connection, gRPC's, starts with "PRI ").
FRAMED_PREFACE: Final = b"CRWD/1\r\n"

#: Every frame starts with this header: type (u8), three zero bytes, payload length (u32,
#: big-endian); the payload follows.
FRAME_HEADER: Final = struct.Struct(">B3xI")

#: Longest input or output name a data connection accepts, in UTF-8 bytes.
MAX_NAME_BYTES: Final = 4096


class FrameType(IntEnum):
    """The frame types of a data connection (docs/workload-sdk.md, "The data connection")."""

    #: workload -> sidecar, first frame: stream the input named by the UTF-8 payload.
    OPEN_INPUT = 1
    #: workload -> sidecar, first frame: start the output named by the UTF-8 payload.
    OPEN_OUTPUT = 2
    #: either way: bytes. From the sidecar, authenticated plaintext; to it, output plaintext.
    DATA = 3
    #: sidecar -> workload: the input ended and all of it authenticated (empty payload).
    END = 4
    #: workload -> sidecar: the output is complete; the payload repeats its name.
    COMMIT = 5
    #: sidecar -> workload: the output is committed; payload: a WriteOutputResponse message.
    RECEIPT = 6
    #: sidecar -> workload: the call failed; payload: status code (u8) and UTF-8 details.
    ERROR = 7


def frame_header(kind: FrameType, length: int) -> bytes:
    """The header of a frame of ``kind`` with a ``length``-byte payload."""
    return FRAME_HEADER.pack(kind, length)


def encode_error_frame(code: int, details: str) -> bytes:
    """A whole ERROR frame: the gRPC status code number and the details."""
    payload = bytes((code,)) + details.encode("utf-8", "replace")
    return frame_header(FrameType.ERROR, len(payload)) + payload


def decode_error_frame(payload: bytes) -> tuple[int, str]:
    """(status code number, details) of an ERROR frame's payload.

    Raises:
        WireError: the payload is empty.
    """
    if not payload:
        raise WireError("an ERROR frame without a status code")
    return payload[0], payload[1:].decode("utf-8", "replace")


def encode_varint(n: int) -> bytes:
    """The protobuf base-128 varint of a non-negative integer."""
    if n < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_chunk_prefix(length: int) -> bytes:
    """The bytes that precede a ``length``-byte chunk in a ReadInputResponse."""
    return bytes((_TAG_READ_CHUNK,)) + encode_varint(length)


def encode_read_chunk(chunk: ReadableBuffer, *, end_of_input: bool = False) -> bytes:
    """``ReadInputResponse(chunk=chunk, end_of_input=end_of_input).SerializeToString()``."""
    view = memoryview(chunk).cast("B")
    parts: list[ReadableBuffer] = []
    if len(view):
        parts = [read_chunk_prefix(len(view)), view]
    if end_of_input:
        parts.append(END_OF_INPUT)
    return b"".join(parts)


def encode_write_chunk(chunk: ReadableBuffer) -> bytes:
    """``WriteOutputRequest(chunk=chunk).SerializeToString()``."""
    view = memoryview(chunk).cast("B")
    # A oneof member is serialised even when empty, unlike a plain proto3 field.
    return b"".join((bytes((_TAG_WRITE_CHUNK,)), encode_varint(len(view)), view))


def encode_write_name(name: str) -> bytes:
    """``WriteOutputRequest(name=name).SerializeToString()``."""
    return workload_pb2.WriteOutputRequest(name=name).SerializeToString()


def _decode_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None when the varint runs off the end or is too long."""
    value = 0
    shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


def _canonical_bytes_field(data: bytes, tag: int) -> tuple[int, int] | None:
    """(start, end) of the field's value when ``data`` starts with ``tag`` and a length that
    fits, else None."""
    if not data or data[0] != tag:
        return None
    decoded = _decode_varint(data, 1)
    if decoded is None:
        return None
    length, start = decoded
    end = start + length
    if end > len(data):
        return None
    return start, end


class ReadFrame(NamedTuple):
    """A decoded ReadInputResponse: the chunk is ``data[start:end]`` (no copy made)."""

    data: bytes
    start: int
    end: int
    end_of_input: bool

    @property
    def chunk(self) -> memoryview:
        """The chunk as a view into ``data``."""
        return memoryview(self.data)[self.start : self.end]


def decode_read_response(data: bytes) -> ReadFrame:
    """Parses a serialised ReadInputResponse.

    On the canonical fast path the frame refers to ``data`` itself, without a copy.

    Raises:
        WireError: the bytes are not a valid ReadInputResponse.
    """
    span = _canonical_bytes_field(data, _TAG_READ_CHUNK)
    if span is not None:
        start, end = span
        rest = len(data) - end
        if rest == 0:
            return ReadFrame(data, start, end, False)
        if rest == 2 and data[end] == _TAG_READ_END and data[end + 1] == 1:
            return ReadFrame(data, start, end, True)
    elif data == END_OF_INPUT:
        return ReadFrame(b"", 0, 0, True)
    try:
        msg = workload_pb2.ReadInputResponse.FromString(data)
    except DecodeError as e:
        raise WireError("malformed ReadInputResponse") from e
    return ReadFrame(msg.chunk, 0, len(msg.chunk), msg.end_of_input)


def decode_write_request(data: bytes) -> tuple[str | None, memoryview | None]:
    """Parses a serialised WriteOutputRequest into (name, chunk); at most one is not None.

    The chunk is a view into ``data`` (no copy) on the canonical fast path.

    Raises:
        WireError: the bytes are not a valid WriteOutputRequest.
    """
    span = _canonical_bytes_field(data, _TAG_WRITE_CHUNK)
    if span is not None and span[1] == len(data):
        return None, memoryview(data)[span[0] : span[1]]
    try:
        msg = workload_pb2.WriteOutputRequest.FromString(data)
    except DecodeError as e:
        raise WireError("malformed WriteOutputRequest") from e
    part = msg.WhichOneof("part")
    if part == "name":
        return msg.name, None
    if part == "chunk":
        return None, memoryview(msg.chunk)
    return None, None
