"""The sealed stream format: round trips, writer and reader behaviour, the documented layout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealing import envelope, hpke, keys
from sealing.envelope import OpenReader, SealWriter
from sealing.errors import (
    NoMatchingRecipientError,
    ParameterError,
    SealingError,
    TruncatedError,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

VECTORS = Path(__file__).parent / "vectors"
CHUNK = 64


@pytest.fixture(scope="module")
def alice() -> keys.RecipientPrivateKey:
    return keys.generate_recipient_key(keys.KEM_X25519)


@pytest.fixture(scope="module")
def bob() -> keys.RecipientPrivateKey:
    return keys.generate_recipient_key(keys.KEM_MLKEM768_X25519)


def _seal(data: bytes, dk: bytes, recipients: list[keys.RecipientPublicKey], chunk: int) -> bytes:
    return envelope.seal_bytes(
        data, data_key=dk, key_id="k1", recipients=recipients, chunk_size=chunk
    )


SIZES = {
    "empty": 0,
    "one byte": 1,
    "one chunk less one": CHUNK - 1,
    "exactly one chunk": CHUNK,
    "one chunk plus one": CHUNK + 1,
    "exactly five chunks": 5 * CHUNK,
    "many chunks": 300 * CHUNK + 17,
}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_round_trip_with_data_key_and_each_recipient(
    size: int, alice: keys.RecipientPrivateKey, bob: keys.RecipientPrivateKey
) -> None:
    data = os.urandom(size)
    dk = envelope.new_data_key()
    sealed = _seal(data, dk, [alice.public_key(), bob.public_key()], CHUNK)
    assert envelope.open_bytes(sealed, data_key=dk) == data
    assert envelope.open_bytes(sealed, private_key=alice) == data
    assert envelope.open_bytes(sealed, private_key=bob) == data


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_segment_layout(size: int) -> None:
    """Full chunks are non-final; the final segment holds the rest, possibly nothing."""
    dk = envelope.new_data_key()
    out = io.BytesIO()
    with SealWriter(out, data_key=dk, key_id="k1", chunk_size=CHUNK) as w:
        w.write(os.urandom(size))
    full, rest = divmod(size, CHUNK)
    seg = 4 + CHUNK + 16
    assert len(out.getvalue()) == w.header_size + full * seg + 4 + rest + 16
    body = memoryview(out.getvalue())[w.header_size :]
    for i in range(full):
        assert struct.unpack(">I", body[i * seg : i * seg + 4])[0] == CHUNK
    assert struct.unpack(">I", body[full * seg : full * seg + 4])[0] == rest


def test_default_chunk_size_is_one_mib() -> None:
    assert envelope.DEFAULT_CHUNK_SIZE == 1 << 20
    sealed = envelope.seal_bytes(b"x", data_key=envelope.new_data_key(), key_id="k")
    assert envelope.read_header(io.BytesIO(sealed)).chunk_size == 1 << 20


def test_write_boundaries_do_not_change_the_plaintext(alice: keys.RecipientPrivateKey) -> None:
    data = os.urandom(10 * CHUNK + 7)
    dk = envelope.new_data_key()
    out = io.BytesIO()
    with SealWriter(
        out, data_key=dk, key_id="k1", recipients=[alice.public_key()], chunk_size=CHUNK
    ) as w:
        pos = 0
        for step in [1, 0, 3, CHUNK - 4, CHUNK, 2 * CHUNK + 5, 1, 200, 10_000]:
            assert w.write(data[pos : pos + step]) == len(data[pos : pos + step])
            pos += step
    assert w.plaintext_size == len(data)
    assert envelope.open_bytes(out.getvalue(), private_key=alice) == data


def test_write_accepts_any_buffer() -> None:
    import array

    dk = envelope.new_data_key()
    ints = array.array("I", range(100))
    out = io.BytesIO()
    with SealWriter(out, data_key=dk, key_id="k1", chunk_size=CHUNK) as w:
        assert w.write(ints) == 400
        w.write(bytearray(b"abc"))
        w.write(memoryview(b"defg")[1:])
    assert envelope.open_bytes(out.getvalue(), data_key=dk) == ints.tobytes() + b"abcefg"


def test_same_data_and_key_seal_differently() -> None:
    dk = envelope.new_data_key()
    data = os.urandom(3 * CHUNK)
    a, b = _seal(data, dk, [], CHUNK), _seal(data, dk, [], CHUNK)
    hdr = envelope.read_header(io.BytesIO(a))
    # A fresh salt per stream gives a fresh segment key, so no nonce repeats under one key.
    assert a[hdr.size :] != b[hdr.size :]
    assert hdr.salt != envelope.read_header(io.BytesIO(b)).salt


def test_zero_recipients_open_only_with_data_key(alice: keys.RecipientPrivateKey) -> None:
    dk = envelope.new_data_key()
    sealed = _seal(b"payload", dk, [], CHUNK)
    assert envelope.read_header(io.BytesIO(sealed)).recipients == ()
    assert envelope.open_bytes(sealed, data_key=dk) == b"payload"
    with pytest.raises(NoMatchingRecipientError, match="0 recipient"):
        envelope.open_bytes(sealed, private_key=alice)


def test_read_header(alice: keys.RecipientPrivateKey, bob: keys.RecipientPrivateKey) -> None:
    dk = envelope.new_data_key()
    sealed = envelope.seal_bytes(
        b"x" * 100,
        data_key=dk,
        key_id="party-a/2024-dataset",
        recipients=[alice.public_key(), bob.public_key()],
        chunk_size=4096,
    )
    src = io.BytesIO(sealed)
    hdr = envelope.read_header(src)
    assert hdr.key_id == "party-a/2024-dataset"
    assert hdr.chunk_size == 4096
    assert hdr.version == envelope.FORMAT_VERSION
    assert hdr.recipient_fingerprints == (alice.fingerprint(), bob.fingerprint())
    assert [r.kem for r in hdr.recipients] == [keys.KEM_X25519, keys.KEM_MLKEM768_X25519]
    assert src.tell() == hdr.size
    hdr.check_data_key(dk)
    assert hdr.unwrap_data_key(bob) == dk
    # A reader can continue from where read_header stopped.
    with OpenReader(src, data_key=dk, header=hdr) as r:
        assert r.read() == b"x" * 100
        assert r.complete


def test_header_repr_has_no_wrapped_keys(alice: keys.RecipientPrivateKey) -> None:
    sealed = _seal(b"", envelope.new_data_key(), [alice.public_key()], CHUNK)
    hdr = envelope.read_header(io.BytesIO(sealed))
    assert hdr.recipients[0].sealed_key.hex()[:16] not in repr(hdr)
    assert "k1" in repr(hdr)


def test_reader_file_api() -> None:
    dk = envelope.new_data_key()
    data = os.urandom(5 * CHUNK + 9)
    sealed = _seal(data, dk, [], CHUNK)
    with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
        assert r.readable()
        assert r.key_id == "k1"
        assert r.read(0) == b""
        assert r.read(10) == data[:10]
        assert r.read(2 * CHUNK) == data[10 : 10 + 2 * CHUNK]
        buf = bytearray(CHUNK + 3)
        assert r.readinto(buf) == CHUNK + 3
        assert bytes(buf) == data[10 + 2 * CHUNK : 13 + 3 * CHUNK]
        big = bytearray(10 * CHUNK)
        n = r.readinto(big)
        assert bytes(big[:n]) == data[13 + 3 * CHUNK :]
        assert r.read(5) == b""
        assert r.readinto(bytearray(5)) == 0
        assert r.complete
        assert r.plaintext_read == len(data)
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.read(1)


def test_reader_chunks_and_copy_to() -> None:
    dk = envelope.new_data_key()
    data = os.urandom(4 * CHUNK + 1)
    sealed = _seal(data, dk, [], CHUNK)
    with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
        first = r.read(5)
        chunks = list(r.chunks())
    assert first + b"".join(chunks) == data
    assert [len(c) for c in chunks] == [CHUNK - 5, CHUNK, CHUNK, CHUNK, 1]
    with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
        out = io.BytesIO()
        assert r.copy_to(out) == len(data)
    assert out.getvalue() == data
    # An empty stream yields no chunks.
    with OpenReader(io.BytesIO(_seal(b"", dk, [], CHUNK)), data_key=dk) as r:
        assert list(r.chunks()) == []
        assert r.complete


def test_reader_wraps_in_buffered_reader() -> None:
    dk = envelope.new_data_key()
    data = b"line one\nline two\n" * 50
    reader = OpenReader(io.BytesIO(_seal(data, dk, [], CHUNK)), data_key=dk)
    with io.BufferedReader(reader) as buffered:
        assert buffered.readline() == b"line one\n"
        assert buffered.read() == data[9:]


class _TrickleSource:
    """A source that returns at most 5 bytes per read and has no readinto."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(min(5, size) if size >= 0 else 5)


class _TrickleSink:
    """A raw sink that takes at most 7 bytes per write (as a raw file may)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data)
        self.data += view[:7]
        return min(7, len(view))


def test_short_reads_and_writes_are_completed() -> None:
    dk = envelope.new_data_key()
    data = os.urandom(3 * CHUNK + 11)
    sink = _TrickleSink()
    with SealWriter(sink, data_key=dk, key_id="k1", chunk_size=CHUNK) as w:
        assert w.copy_from(_TrickleSource(data)) == len(data)
    assert envelope.open_bytes(bytes(sink.data), data_key=dk) == data
    with OpenReader(_TrickleSource(bytes(sink.data)), data_key=dk) as r:
        out = _TrickleSink()
        r.copy_to(out)
    assert bytes(out.data) == data


def test_copy_from_then_write() -> None:
    dk = envelope.new_data_key()
    out = io.BytesIO()
    with SealWriter(out, data_key=dk, key_id="k1", chunk_size=CHUNK) as w:
        w.copy_from(io.BytesIO(b"a" * 100))
        w.write(b"b" * 100)
        w.copy_from(io.BytesIO(b"c" * 28))
    assert envelope.open_bytes(out.getvalue(), data_key=dk) == b"a" * 100 + b"b" * 100 + b"c" * 28


def test_exception_in_with_block_leaves_no_final_segment() -> None:
    dk = envelope.new_data_key()
    out = io.BytesIO()
    with (
        pytest.raises(RuntimeError),
        SealWriter(out, data_key=dk, key_id="k1", chunk_size=CHUNK) as w,
    ):
        w.write(b"z" * (2 * CHUNK + 3))
        raise RuntimeError("producer failed")
    assert w.closed
    with OpenReader(io.BytesIO(out.getvalue()), data_key=dk) as r:
        got = bytearray()
        with pytest.raises(TruncatedError, match="without a final segment"):
            for chunk in r.chunks():
                got += chunk
        assert not r.complete
    # The two full chunks were authentic, the pending 3 bytes were never written.
    assert bytes(got) == b"z" * (2 * CHUNK)


def test_empty_writer_gives_a_valid_empty_stream() -> None:
    dk = envelope.new_data_key()
    out = io.BytesIO()
    SealWriter(out, data_key=dk, key_id="k1").close()
    assert envelope.open_bytes(out.getvalue(), data_key=dk) == b""


def test_writer_after_close() -> None:
    out = io.BytesIO()
    w = SealWriter(out, data_key=envelope.new_data_key(), key_id="k1", chunk_size=CHUNK)
    w.write(b"abc")
    w.close()
    size = len(out.getvalue())
    w.close()  # idempotent
    assert len(out.getvalue()) == size
    with pytest.raises(ParameterError, match="closed"):
        w.write(b"more")


class _FailingSink:
    def __init__(self, fail_after: int) -> None:
        self.writes = 0
        self.fail_after = fail_after
        self.data = bytearray()

    def write(self, data: ReadableBuffer, /) -> int:
        self.writes += 1
        if self.writes > self.fail_after:
            raise OSError(28, "No space left on device")
        self.data += data
        return memoryview(data).nbytes


def test_failed_sink_write_breaks_the_writer() -> None:
    sink = _FailingSink(fail_after=2)  # the header and one segment
    w = SealWriter(sink, data_key=envelope.new_data_key(), key_id="k1", chunk_size=CHUNK)
    with pytest.raises(OSError, match="No space"):
        w.write(b"q" * (3 * CHUNK))
    written = bytes(sink.data)
    with pytest.raises(SealingError, match="earlier write failed"):
        w.write(b"more")
    with pytest.raises(SealingError, match="earlier write failed"):
        w.close()
    assert bytes(sink.data) == written
    assert w.closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_key": b"short"}, "32 bytes"),
        ({"data_key": "not bytes"}, "must be bytes"),
        ({"key_id": ""}, "non-empty printable"),
        ({"key_id": "tab\there"}, "non-empty printable"),
        ({"key_id": "x" * 256}, "at most 255"),
        ({"chunk_size": 15}, "chunk size"),
        ({"chunk_size": envelope.MAX_CHUNK_SIZE + 1}, "chunk size"),
        ({"recipients": [b"raw bytes"]}, "RecipientPublicKey"),
    ],
)
def test_writer_parameter_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"data_key": envelope.new_data_key(), "key_id": "k1"}
    args.update(kwargs)
    out = io.BytesIO()
    with pytest.raises(ParameterError, match=message):
        SealWriter(out, **args)  # type: ignore[arg-type]
    assert out.getvalue() == b""


def test_reader_needs_exactly_one_key(alice: keys.RecipientPrivateKey) -> None:
    dk = envelope.new_data_key()
    sealed = _seal(b"", dk, [alice.public_key()], CHUNK)
    with pytest.raises(ParameterError, match="exactly one"):
        OpenReader(io.BytesIO(sealed))
    with pytest.raises(ParameterError, match="exactly one"):
        OpenReader(io.BytesIO(sealed), data_key=dk, private_key=alice)


def test_seal_file_and_open_file(tmp_path: Path, alice: keys.RecipientPrivateKey) -> None:
    data = os.urandom(5000)
    (tmp_path / "in").write_bytes(data)
    dk = envelope.new_data_key()
    n = envelope.seal_file(
        tmp_path / "in",
        tmp_path / "sealed",
        data_key=dk,
        key_id="k1",
        recipients=[alice.public_key()],
        chunk_size=1024,
    )
    assert n == 5000
    assert envelope.open_file(tmp_path / "sealed", tmp_path / "out", private_key=alice) == 5000
    assert (tmp_path / "out").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "sealed"]


def test_open_file_failure_leaves_no_output(tmp_path: Path) -> None:
    dk = envelope.new_data_key()
    sealed = _seal(os.urandom(10 * CHUNK), dk, [], CHUNK)
    (tmp_path / "sealed").write_bytes(sealed[:-30])
    with pytest.raises(TruncatedError):
        envelope.open_file(tmp_path / "sealed", tmp_path / "out", data_key=dk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sealed"]


# --- the documented format --------------------------------------------------------------------


def test_layout_matches_the_documentation(alice: keys.RecipientPrivateKey) -> None:
    """Parses and decrypts a stream with plain primitives, following docs/sealing-format.md."""
    dk = envelope.new_data_key()
    data = os.urandom(2 * CHUNK + 10)
    sealed = envelope.seal_bytes(
        data, data_key=dk, key_id="doc-key", recipients=[alice.public_key()], chunk_size=CHUNK
    )
    assert sealed[0:8] == b"CRSEAL\r\n"
    assert sealed[8:12] == bytes([1, 1, 1, 0])  # version, AEAD, KDF, flags
    assert struct.unpack(">I", sealed[12:16])[0] == CHUNK
    salt, key_check = sealed[16:48], sealed[48:80]
    assert sealed[80] == len(b"doc-key")
    assert sealed[81:88] == b"doc-key"
    bound = sealed[:88]
    assert struct.unpack(">H", sealed[88:90])[0] == 1
    kem, fingerprint, sealed_len = struct.unpack(">B8sH", sealed[90:101])
    assert (kem, fingerprint.hex(), sealed_len) == (1, alice.fingerprint(), 80)
    wrapped = sealed[101 : 101 + sealed_len]
    mac_end = 101 + sealed_len + 32
    header = sealed[:mac_end]

    info = b"cleanroom-sealing v1 recipient" + hashlib.sha256(bound).digest()
    assert hpke.open_sealed(alice, wrapped, info=info) == dk
    expected_check = HKDF(
        hashes.SHA256(), 32, salt=None, info=b"cleanroom-sealing v1 key check"
    ).derive(dk)
    assert key_check == expected_check
    okm = HKDF(hashes.SHA256(), 64, salt=salt, info=b"cleanroom-sealing v1 stream keys").derive(dk)
    mac_key, segment_key = okm[:32], okm[32:]
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(header[:-32])
    h.verify(header[-32:])

    digest = hashlib.sha256(header).digest()
    aead = AESGCM(segment_key)
    pos, plain, index = mac_end, b"", 0
    while True:
        (n,) = struct.unpack(">I", sealed[pos : pos + 4])
        final = n < CHUNK
        nonce = struct.pack(">Q", index) + b"\x00\x00\x00" + bytes([final])
        aad = digest + struct.pack(">QB", index, final)
        plain += aead.decrypt(nonce, sealed[pos + 4 : pos + 4 + n + 16], aad)
        pos += 4 + n + 16
        index += 1
        if final:
            break
    assert pos == len(sealed)
    assert plain == data


def test_format_v1_vector_still_opens() -> None:
    """A stream sealed by the first release (regenerating it would defeat its purpose)."""
    v = json.loads((VECTORS / "format_v1_two_recipients.json").read_text())
    sealed = bytes.fromhex(v["sealed_hex"])
    plain = bytes.fromhex(v["plaintext_hex"])
    assert envelope.open_bytes(sealed, data_key=bytes.fromhex(v["data_key_hex"])) == plain
    for name in ("recipient_x25519_private_pem", "recipient_hybrid_private_pem"):
        key = keys.decode_private_key(v[name].encode())
        assert envelope.open_bytes(sealed, private_key=key) == plain
    hdr = envelope.read_header(io.BytesIO(sealed))
    assert (hdr.key_id, hdr.chunk_size) == (v["key_id"], v["chunk_size"])
