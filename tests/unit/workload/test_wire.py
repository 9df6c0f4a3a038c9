"""The fast codec for the bulk messages must match protobuf byte for byte, and its decoders must
accept whatever a protobuf peer sends."""

from __future__ import annotations

import pytest

from cleanroom.v1 import workload_pb2
from workload.wire import (
    END_OF_INPUT,
    WireError,
    decode_read_response,
    decode_write_request,
    encode_read_chunk,
    encode_varint,
    encode_write_chunk,
    encode_write_name,
)

SIZES = [0, 1, 127, 128, 300, 16383, 16384, 65536, (1 << 20) + 5]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 16384, 2**21, 2**35, 2**63])
def test_varint_matches_protobuf(n: int) -> None:
    msg = workload_pb2.InputInfo(size=n)
    # InputInfo.size is field 3, varint: tag 0x18, then the varint.
    assert msg.SerializeToString() == (b"\x18" + encode_varint(n) if n else b"")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("end", [False, True])
def test_read_chunk_encoding_is_protobufs(n: int, end: bool) -> None:
    chunk = bytes(range(256)) * (n // 256) + bytes(n % 256)
    expected = workload_pb2.ReadInputResponse(chunk=chunk, end_of_input=end).SerializeToString()
    assert encode_read_chunk(chunk, end_of_input=end) == expected
    frame = decode_read_response(expected)
    assert bytes(frame.chunk) == chunk
    assert frame.end_of_input is end


def test_end_of_input_constant() -> None:
    assert END_OF_INPUT == workload_pb2.ReadInputResponse(end_of_input=True).SerializeToString()


@pytest.mark.parametrize("n", SIZES)
def test_write_chunk_encoding_is_protobufs(n: int) -> None:
    chunk = b"\xab" * n
    expected = workload_pb2.WriteOutputRequest(chunk=chunk).SerializeToString()
    assert encode_write_chunk(chunk) == expected
    assert encode_write_chunk(memoryview(bytearray(chunk))) == expected
    name, got = decode_write_request(expected)
    assert name is None and got is not None and bytes(got) == chunk


def test_write_name_round_trip() -> None:
    encoded = encode_write_name("insights/summary.csv")
    assert (
        encoded == workload_pb2.WriteOutputRequest(name="insights/summary.csv").SerializeToString()
    )
    assert decode_write_request(encoded) == ("insights/summary.csv", None)


def test_fast_path_does_not_copy() -> None:
    data = encode_read_chunk(b"x" * 1000)
    frame = decode_read_response(data)
    assert frame.data is data
    assert frame.chunk.obj is data


def test_non_canonical_read_response_goes_through_protobuf() -> None:
    # Fields in reverse order, and an unknown field 9: valid protobuf, not our canonical form.
    reordered = b"\x10\x01" + b"\x0a\x03abc"
    frame = decode_read_response(reordered)
    assert (bytes(frame.chunk), frame.end_of_input) == (b"abc", True)
    with_unknown = b"\x0a\x03abc" + b"\x48\x05"
    frame = decode_read_response(with_unknown)
    assert (bytes(frame.chunk), frame.end_of_input) == (b"abc", False)
    # A false end flag written explicitly.
    frame = decode_read_response(b"\x0a\x03abc\x10\x00")
    assert (bytes(frame.chunk), frame.end_of_input) == (b"abc", False)


def test_malformed_messages_raise() -> None:
    with pytest.raises(WireError):
        decode_read_response(b"\x0a\x05ab")  # length beyond the end
    with pytest.raises(WireError):
        decode_write_request(b"\x12\x05ab")
    assert decode_write_request(b"") == (None, None)
