"""Every kind of damage to a sealed stream fails with its own error, at the damaged place.

The stream used here has chunk size 64 and 202 plaintext bytes: full segments 0, 1 and 2 and a
final segment 3 holding 10 bytes, sealed to Alice (X25519) and Bob (ML-KEM-768 + X25519).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from sealing import envelope, keys
from sealing.envelope import OpenReader
from sealing.errors import (
    EnvelopeError,
    HeaderAuthenticationError,
    HeaderError,
    NoMatchingRecipientError,
    SealingError,
    SealingIOError,
    SegmentAuthenticationError,
    TrailingDataError,
    TruncatedError,
    WrongKeyError,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

CHUNK = 64
SEG = 4 + CHUNK + 16  # length prefix, ciphertext, tag
KEY_ID = "tamper-key"


@dataclass(frozen=True)
class Stream:
    data: bytes
    data_key: bytes
    sealed: bytes
    header_size: int
    alice: keys.RecipientPrivateKey
    bob: keys.RecipientPrivateKey

    def segment(self, i: int) -> slice:
        start = self.header_size + i * SEG
        end = len(self.sealed) if i == 3 else start + SEG
        return slice(start, end)

    def seg_bytes(self, i: int) -> bytes:
        return self.sealed[self.segment(i)]

    def plain(self, i: int) -> bytes:
        return self.data[i * CHUNK : (i + 1) * CHUNK]


@pytest.fixture(scope="module")
def stream() -> Stream:
    alice = keys.generate_recipient_key(keys.KEM_X25519)
    bob = keys.generate_recipient_key(keys.KEM_MLKEM768_X25519)
    dk = envelope.new_data_key()
    data = os.urandom(3 * CHUNK + 10)
    sealed = envelope.seal_bytes(
        data,
        data_key=dk,
        key_id=KEY_ID,
        recipients=[alice.public_key(), bob.public_key()],
        chunk_size=CHUNK,
    )
    hdr = envelope.read_header(io.BytesIO(sealed))
    assert len(sealed) == hdr.size + 3 * SEG + 4 + 10 + 16
    return Stream(data, dk, sealed, hdr.size, alice, bob)


def _flip(data: bytes, pos: int, bit: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= bit
    return bytes(b)


def _released(sealed: bytes, how: str, key: dict[str, object]) -> tuple[bytes, EnvelopeError]:
    got = bytearray()
    with pytest.raises(EnvelopeError) as info:
        with OpenReader(io.BytesIO(sealed), **key) as r:  # type: ignore[arg-type]
            if how == "chunks":  # one-shot decryption of whole segments
                for chunk in r.chunks():
                    got += chunk
            elif how == "copy_to":  # incremental decryption into the reader's buffer
                r.copy_to(_Collect(got))
            else:  # small reads out of the reader's buffer
                while data := r.read(10):
                    got += data
    return bytes(got), info.value


class _Collect:
    def __init__(self, into: bytearray) -> None:
        self._into = into

    def write(self, data: ReadableBuffer, /) -> int:
        self._into += data
        return memoryview(data).nbytes


def _open_all(sealed: bytes, **key: object) -> tuple[bytes, EnvelopeError]:
    """The plaintext released before the failure, and the failure.

    Opens the stream through each way of reading; all must fail alike and release the same.
    """
    got, err = _released(sealed, "chunks", key)
    for how in ("copy_to", "read"):
        other_got, other_err = _released(sealed, how, key)
        assert type(other_err) is type(err), (how, other_err, err)
        if how == "read":
            # A read() that straddles the failing segment raises and returns nothing.
            assert got.startswith(other_got) and len(got) - len(other_got) < 10
        else:
            assert other_got == got, how
    return got, err


def _keys(s: Stream) -> dict[str, dict[str, object]]:
    return {"data key": {"data_key": s.data_key}, "alice": {"private_key": s.alice}}


# --- keys -------------------------------------------------------------------------------------


def test_wrong_data_key(stream: Stream) -> None:
    got, err = _open_all(stream.sealed, data_key=envelope.new_data_key())
    assert type(err) is WrongKeyError
    assert got == b""
    assert KEY_ID in str(err)


def test_wrong_recipient(stream: Stream) -> None:
    eve = keys.generate_recipient_key()
    got, err = _open_all(stream.sealed, private_key=eve)
    assert type(err) is NoMatchingRecipientError
    assert eve.fingerprint() in str(err)
    assert got == b""


def test_recipient_with_same_fingerprint_kind_but_other_kem(stream: Stream) -> None:
    hybrid_eve = keys.generate_recipient_key(keys.KEM_MLKEM768_X25519)
    _, err = _open_all(stream.sealed, private_key=hybrid_eve)
    assert type(err) is NoMatchingRecipientError


# --- header -----------------------------------------------------------------------------------

# (field, offset in the stream, expected error with the data key, expected error with Alice's key)
_KEY_ID_AT = 81
_COUNT_AT = _KEY_ID_AT + len(KEY_ID)
_ALICE_STANZA = _COUNT_AT + 2
_ALICE_WRAPPED = _ALICE_STANZA + 11
_BOB_WRAPPED = _ALICE_WRAPPED + 80 + 11

HEADER_FLIPS: list[tuple[str, int, type[EnvelopeError], type[EnvelopeError]]] = [
    ("magic", 0, HeaderError, HeaderError),
    ("format version", 8, HeaderError, HeaderError),
    ("AEAD id", 9, HeaderError, HeaderError),
    ("KDF id", 10, HeaderError, HeaderError),
    ("flags", 11, HeaderError, HeaderError),
    ("chunk size", 15, HeaderAuthenticationError, HeaderAuthenticationError),
    ("salt", 30, HeaderAuthenticationError, HeaderAuthenticationError),
    # A changed key check cannot be told from a wrong data key; with a recipient key it can.
    ("key check", 60, WrongKeyError, HeaderAuthenticationError),
    ("key id", _KEY_ID_AT + 3, HeaderAuthenticationError, HeaderAuthenticationError),
    # KEM 1 -> 0 is an unknown KEM: a malformed header before any key is tried.
    ("alice's KEM", _ALICE_STANZA, HeaderError, HeaderError),
    ("alice's fingerprint", _ALICE_STANZA + 4, HeaderAuthenticationError, NoMatchingRecipientError),
    (
        "alice's wrapped key",
        _ALICE_WRAPPED + 40,
        HeaderAuthenticationError,
        HeaderAuthenticationError,
    ),
    ("bob's wrapped key", _BOB_WRAPPED + 500, HeaderAuthenticationError, HeaderAuthenticationError),
]


@pytest.mark.parametrize(
    ("field", "pos", "with_data_key", "with_alice"), HEADER_FLIPS, ids=[f[0] for f in HEADER_FLIPS]
)
def test_flipped_header_bit(
    stream: Stream,
    field: str,
    pos: int,
    with_data_key: type[EnvelopeError],
    with_alice: type[EnvelopeError],
) -> None:
    tampered = _flip(stream.sealed, pos)
    for name, expected in (("data key", with_data_key), ("alice", with_alice)):
        got, err = _open_all(tampered, **_keys(stream)[name])
        assert type(err) is expected, (name, err)
        assert got == b""


def test_flipped_mac(stream: Stream) -> None:
    pos = stream.header_size - 1
    for key in _keys(stream).values():
        got, err = _open_all(_flip(stream.sealed, pos), **key)
        assert type(err) is HeaderAuthenticationError
        assert got == b""


def test_not_a_sealed_stream() -> None:
    _, err = _open_all(os.urandom(200), data_key=envelope.new_data_key())
    assert type(err) is HeaderError
    assert "bad magic" in str(err)
    _, err = _open_all(b"", data_key=envelope.new_data_key())
    assert type(err) is HeaderError
    assert "empty" in str(err)


def test_unsupported_version_is_named(stream: Stream) -> None:
    b = bytearray(stream.sealed)
    b[8] = 2
    _, err = _open_all(bytes(b), data_key=stream.data_key)
    assert "unsupported format version 2" in str(err)


def test_oversized_chunk_in_header_is_refused(stream: Stream) -> None:
    b = bytearray(stream.sealed)
    b[12:16] = (envelope.MAX_CHUNK_SIZE + 1).to_bytes(4, "big")
    _, err = _open_all(bytes(b), data_key=stream.data_key)
    assert type(err) is HeaderError
    assert "chunk size" in str(err)


# --- segments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "offset"),
    [(0, 4), (1, 4 + 30), (2, SEG - 1), (3, 4), (3, 4 + 10 + 15)],
    ids=["seg0 ciphertext", "seg1 ciphertext", "seg2 tag", "final ciphertext", "final tag"],
)
def test_flipped_segment_bit(stream: Stream, segment: int, offset: int) -> None:
    pos = stream.segment(segment).start + offset
    for key in _keys(stream).values():
        got, err = _open_all(_flip(stream.sealed, pos, 0x80), **key)
        assert type(err) is SegmentAuthenticationError
        assert f"segment {segment} " in str(err)
        # Only the segments before the damaged one were released.
        assert got == stream.data[: segment * CHUNK]


def test_swapped_segments(stream: Stream) -> None:
    s = stream
    swapped = (
        s.sealed[: s.header_size] + s.seg_bytes(1) + s.seg_bytes(0) + s.sealed[s.segment(2).start :]
    )
    got, err = _open_all(swapped, data_key=s.data_key)
    assert type(err) is SegmentAuthenticationError
    assert got == b""


def test_dropped_middle_segment(stream: Stream) -> None:
    s = stream
    dropped = s.sealed[: s.segment(1).start] + s.sealed[s.segment(2).start :]
    got, err = _open_all(dropped, data_key=s.data_key)
    assert type(err) is SegmentAuthenticationError
    assert got == s.plain(0)


def test_dropped_last_segment(stream: Stream) -> None:
    s = stream
    got, err = _open_all(s.sealed[: s.segment(3).start], data_key=s.data_key)
    assert type(err) is TruncatedError
    assert "without a final segment" in str(err)
    assert got == s.data[: 3 * CHUNK]
    # readall and read() never hand out the partial plaintext as if it were complete.
    with OpenReader(io.BytesIO(s.sealed[: s.segment(3).start]), data_key=s.data_key) as r:
        with pytest.raises(TruncatedError):
            r.read()
        assert not r.complete


def test_final_segment_moved_earlier(stream: Stream) -> None:
    s = stream
    moved = s.sealed[: s.header_size] + s.seg_bytes(0) + s.seg_bytes(3)
    got, err = _open_all(moved, data_key=s.data_key)
    assert type(err) is SegmentAuthenticationError
    assert got == s.plain(0)


@pytest.mark.parametrize(
    "appended",
    ["final segment again", "segment from another stream", "one byte"],
)
def test_appended_data(stream: Stream, appended: str) -> None:
    s = stream
    if appended == "final segment again":
        extra = s.seg_bytes(3)
    elif appended == "segment from another stream":
        other = envelope.seal_bytes(
            os.urandom(CHUNK), data_key=s.data_key, key_id=KEY_ID, chunk_size=CHUNK
        )
        extra = other[-SEG:]
    else:
        extra = b"\x00"
    got, err = _open_all(s.sealed + extra, data_key=s.data_key)
    assert type(err) is TrailingDataError
    # The final segment itself is withheld: the stream as a whole is not valid.
    assert got == s.data[: 3 * CHUNK]


def test_segment_from_another_stream_with_the_same_key(stream: Stream) -> None:
    s = stream
    other = envelope.seal_bytes(
        os.urandom(len(s.data)), data_key=s.data_key, key_id=KEY_ID, chunk_size=CHUNK
    )
    other_hdr = envelope.read_header(io.BytesIO(other)).size
    spliced = s.sealed[: s.segment(1).start] + other[other_hdr + SEG : other_hdr + 2 * SEG]
    spliced += s.sealed[s.segment(2).start :]
    got, err = _open_all(spliced, data_key=s.data_key)
    assert type(err) is SegmentAuthenticationError
    assert got == s.plain(0)


def test_segment_length_above_chunk_size(stream: Stream) -> None:
    s = stream
    b = bytearray(s.sealed)
    b[s.segment(1).start : s.segment(1).start + 4] = (CHUNK + 1).to_bytes(4, "big")
    got, err = _open_all(bytes(b), data_key=s.data_key)
    assert type(err) is SegmentAuthenticationError
    assert "malformed" in str(err)
    assert got == s.plain(0)


def _cut_points(s: Stream) -> dict[str, int]:
    return {
        "inside magic": 4,
        "inside fixed fields": 40,
        "inside key id": _KEY_ID_AT + 2,
        "inside a wrapped key": _BOB_WRAPPED + 100,
        "inside the MAC": s.header_size - 5,
        "right after the header": s.header_size,
        "inside a length prefix": s.segment(1).start + 2,
        "inside a segment": s.segment(1).start + 40,
        "inside a tag": s.segment(2).stop - 3,
        "inside the final segment": len(s.sealed) - 1,
    }


@pytest.mark.parametrize(
    "where",
    [
        "inside magic",
        "inside fixed fields",
        "inside key id",
        "inside a wrapped key",
        "inside the MAC",
        "right after the header",
        "inside a length prefix",
        "inside a segment",
        "inside a tag",
        "inside the final segment",
    ],
)
def test_truncated_stream(stream: Stream, where: str) -> None:
    cut = _cut_points(stream)[where]
    for key in _keys(stream).values():
        got, err = _open_all(stream.sealed[:cut], **key)
        assert type(err) is TruncatedError, err
        assert len(got) < len(stream.data)
        assert stream.data.startswith(got)


def test_each_error_is_a_sealing_error_with_its_own_class() -> None:
    # Callers catch SealingError for "cannot open this"; the subclasses say why, so none may
    # fall outside the root or be caught by a sibling's handler.
    classes = [
        HeaderError,
        HeaderAuthenticationError,
        WrongKeyError,
        NoMatchingRecipientError,
        SegmentAuthenticationError,
        TruncatedError,
        TrailingDataError,
    ]
    for cls in classes:
        assert issubclass(cls, EnvelopeError) and issubclass(cls, SealingError), cls
    related = {
        (a.__name__, b.__name__)
        for a in classes
        for b in classes
        if a is not b and issubclass(a, b)
    }
    # The one intended refinement: "no recipient entry matches" is a kind of wrong key.
    assert related == {("NoMatchingRecipientError", "WrongKeyError")}


# --- the reader after a failure ---------------------------------------------------------------


def test_readinto_wipes_the_unauthenticated_segment(stream: Stream) -> None:
    """readinto decrypts whole segments straight into a large buffer; a bad one is zeroed."""
    s = stream
    tampered = _flip(s.sealed, s.segment(1).start + 10)
    buf = bytearray(b"\xaa" * len(s.data))
    with OpenReader(io.BytesIO(tampered), data_key=s.data_key) as r:
        with pytest.raises(SegmentAuthenticationError):
            r.readinto(buf)
    assert buf[:CHUNK] == s.plain(0)
    assert buf[CHUNK : 2 * CHUNK] == bytes(CHUNK)


def test_internal_buffer_is_wiped_after_failure(stream: Stream) -> None:
    s = stream
    tampered = _flip(s.sealed, s.segment(0).start + 10)
    r = OpenReader(io.BytesIO(tampered), data_key=s.data_key)
    with pytest.raises(SegmentAuthenticationError):
        r.read(1)
    assert bytes(r._out) == bytes(CHUNK)
    r.close()


def test_failure_is_sticky(stream: Stream) -> None:
    s = stream
    with OpenReader(io.BytesIO(_flip(s.sealed, s.segment(1).start + 10)), data_key=s.data_key) as r:
        assert r.read(CHUNK) == s.plain(0)
        with pytest.raises(SegmentAuthenticationError):
            r.read(1)
        # Retrying does not skip the bad segment and go on.
        for _ in range(2):
            with pytest.raises(SegmentAuthenticationError):
                r.read(1)
        with pytest.raises(SegmentAuthenticationError):
            list(r.chunks())


TAMPERINGS: dict[str, Callable[[Stream], bytes]] = {
    "flipped segment": lambda s: _flip(s.sealed, s.segment(0).start + 9),
    "dropped final": lambda s: s.sealed[: s.segment(3).start],
    "appended": lambda s: s.sealed + s.seg_bytes(3),
}


@pytest.mark.parametrize("how", TAMPERINGS)
def test_copy_to_and_readall_fail_too(stream: Stream, how: str) -> None:
    tampered = TAMPERINGS[how](stream)
    with OpenReader(io.BytesIO(tampered), data_key=stream.data_key) as r:
        with pytest.raises(EnvelopeError):
            r.copy_to(io.BytesIO())
    with pytest.raises(EnvelopeError):
        envelope.open_bytes(tampered, data_key=stream.data_key)


class _FailingSource(io.BytesIO):
    """Raises an I/O error once reads pass ``fail_at``."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self._fail_at = fail_at

    def readinto(self, buffer: Any, /) -> int:
        if self.tell() + len(memoryview(buffer)) > self._fail_at:
            raise OSError(5, "Input/output error")
        return super().readinto(buffer)


def test_io_error_mid_segment_stops_the_reader(stream: Stream) -> None:
    s = stream
    src = _FailingSource(s.sealed, fail_at=s.segment(1).start + 30)
    with OpenReader(src, data_key=s.data_key) as r:
        assert r.read(CHUNK) == s.plain(0)
        with pytest.raises(OSError, match="Input/output"):
            r.read(CHUNK)
        # The position inside the stream is lost; the reader does not guess where it is.
        with pytest.raises(SealingIOError, match="reading the sealed stream failed"):
            r.read(CHUNK)
