"""Fast encoding of the WorkloadService's bulk messages, byte-compatible with protobuf.

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

from typing import TYPE_CHECKING, Final, NamedTuple

from google.protobuf.message import DecodeError

from cleanroom.v1 import workload_pb2
from workload.errors import WorkloadError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "END_OF_INPUT",
    "MAX_PREFIX",
    "SERVICE",
    "ReadFrame",
    "WireError",
    "decode_read_response",
    "decode_write_request",
    "encode_read_chunk",
    "encode_varint",
    "encode_write_chunk",
    "encode_write_name",
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


class WireError(WorkloadError, ValueError):
    """A message is not valid protobuf for its type."""


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
