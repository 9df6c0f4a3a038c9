"""The sealed stream format: a chunked AES-256-GCM envelope with HPKE-wrapped data keys.

A sealed stream is a header followed by segments. The header names the format version, the
algorithms, the data key's id, the chunk size, a random per-stream salt, a key check value and,
for each recipient, the data key sealed to that recipient with HPKE; an HMAC over the header,
keyed from the data key, ends it. Each segment holds up to ``chunk_size`` bytes of plaintext,
encrypted with AES-256-GCM under a per-stream key derived from the data key and the salt, with
a nonce and associated data that carry the segment index and a final-segment flag. Every
non-final segment holds exactly ``chunk_size`` bytes; the final segment holds fewer (possibly
zero), so a stream always ends with exactly one final segment.

``docs/sealing-format.md`` describes the format byte by byte; keep the two in step.

Memory use is constant: a writer or a reader holds two buffers of about ``chunk_size`` bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from hmac import compare_digest
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cleanroom.closing import AbortOnError, Closeable
from sealing import hpke
from sealing.errors import (
    HeaderAuthenticationError,
    HeaderError,
    HpkeError,
    NoMatchingRecipientError,
    ParameterError,
    SealingError,
    SealingIOError,
    SegmentAuthenticationError,
    TrailingDataError,
    TruncatedError,
    WrongKeyError,
)
from sealing.keys import (
    DATA_KEY_SIZE,
    KEM_NAMES,
    RecipientPrivateKey,
    RecipientPublicKey,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "AEAD_AES_256_GCM",
    "DATA_KEY_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KDF_HKDF_SHA256",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_KEY_ID_SIZE",
    "MAX_RECIPIENTS",
    "MIN_CHUNK_SIZE",
    "Header",
    "OpenReader",
    "RecipientEntry",
    "SealWriter",
    "new_data_key",
    "open_bytes",
    "open_file",
    "read_header",
    "seal_bytes",
    "seal_file",
]

MAGIC: Final = b"CRSEAL\r\n"
FORMAT_VERSION: Final = 1
AEAD_AES_256_GCM: Final = 1
KDF_HKDF_SHA256: Final = 1

DEFAULT_CHUNK_SIZE: Final = 1 << 20
MIN_CHUNK_SIZE: Final = 16
# A reader allocates two buffers of the header's chunk size; the cap keeps a hostile header
# from making it allocate gigabytes.
MAX_CHUNK_SIZE: Final = 64 << 20
MAX_KEY_ID_SIZE: Final = 255
MAX_RECIPIENTS: Final = 256

TAG_SIZE: Final = 16
SALT_SIZE: Final = 32
KEY_CHECK_SIZE: Final = 32
MAC_SIZE: Final = 32
NONCE_SIZE: Final = 12
_MAX_SEGMENTS: Final = 1 << 64

# magic, version, aead id, kdf id, flags, chunk size, salt, key check, key id length
_FIXED: Final = struct.Struct(">8sBBBBI32s32sB")
# kem, fingerprint, sealed key length
_STANZA: Final = struct.Struct(">B8sH")
_COUNT: Final = struct.Struct(">H")
_SEGMENT_LENGTH: Final = struct.Struct(">I")
# AAD = header digest (32) || segment index (u64) || final flag (u8)
_AAD_TAIL: Final = struct.Struct(">QB")
_NONCE_INDEX: Final = struct.Struct(">Q")

_KEY_CHECK_INFO: Final = b"cleanroom-sealing v1 key check"
_STREAM_KEYS_INFO: Final = b"cleanroom-sealing v1 stream keys"
_RECIPIENT_INFO: Final = b"cleanroom-sealing v1 recipient"


class _Source(Protocol):
    def read(self, size: int = -1, /) -> bytes | None: ...


class _Sink(Protocol):
    def write(self, data: ReadableBuffer, /) -> int | None: ...


def new_data_key() -> bytes:
    """A fresh random data key of :data:`DATA_KEY_SIZE` bytes."""
    return os.urandom(DATA_KEY_SIZE)


# --- key schedule ---------------------------------------------------------------------------


def _key_check(data_key: bytes) -> bytes:
    # Unsalted so that a modified salt shows as a header authentication failure, not as a
    # wrong key; the value also commits the stream to one data key across all recipients.
    return HKDF(hashes.SHA256(), KEY_CHECK_SIZE, salt=None, info=_KEY_CHECK_INFO).derive(data_key)


def _stream_keys(data_key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(header MAC key, segment key) for one stream."""
    okm = HKDF(hashes.SHA256(), 64, salt=salt, info=_STREAM_KEYS_INFO).derive(data_key)
    return okm[:32], okm[32:]


def _header_mac(mac_key: bytes, header_body: bytes) -> hmac.HMAC:
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(header_body)
    return h


def _recipient_info(bound_prefix: bytes) -> bytes:
    return _RECIPIENT_INFO + hashlib.sha256(bound_prefix).digest()


def _check_data_key(data_key: object) -> bytes:
    if not isinstance(data_key, bytes | bytearray | memoryview):
        raise ParameterError("a data key must be bytes")
    key = bytes(data_key)
    if len(key) != DATA_KEY_SIZE:
        raise ParameterError(f"a data key must be {DATA_KEY_SIZE} bytes, got {len(key)}")
    return key


def _check_key_id(key_id: str) -> bytes:
    if not isinstance(key_id, str) or not key_id or not key_id.isprintable():
        raise ParameterError("a key id must be a non-empty printable string")
    encoded = key_id.encode("utf-8")
    if len(encoded) > MAX_KEY_ID_SIZE:
        raise ParameterError(f"a key id must be at most {MAX_KEY_ID_SIZE} bytes in UTF-8")
    return encoded


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ParameterError(
            f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
        )


# --- header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientEntry:
    """One recipient stanza of a header: who it is for and the data key sealed to them."""

    kem: int
    fingerprint: str
    sealed_key: bytes = field(repr=False)


@dataclass(frozen=True)
class Header:
    """A parsed (not yet authenticated) header of a sealed stream.

    ``raw`` holds the header's bytes exactly as read, MAC included.
    """

    version: int
    aead: int
    kdf: int
    chunk_size: int
    salt: bytes = field(repr=False)
    key_check: bytes = field(repr=False)
    key_id: str
    recipients: tuple[RecipientEntry, ...]
    mac: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """The header's length in bytes; the first segment starts at this offset."""
        return len(self.raw)

    @property
    def recipient_fingerprints(self) -> tuple[str, ...]:
        """The fingerprints of the recipients, in header order."""
        return tuple(r.fingerprint for r in self.recipients)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the whole header; every segment's associated data starts with it."""
        return hashlib.sha256(self.raw).digest()

    @property
    def _bound_prefix(self) -> bytes:
        # Everything up to and including the key id: the part each recipient's HPKE info binds.
        return self.raw[: _FIXED.size + len(self.key_id.encode("utf-8"))]

    def check_data_key(self, data_key: bytes) -> None:
        """Checks that ``data_key`` is this stream's key and that the header is unmodified.

        Raises:
            ParameterError: ``data_key`` is not :data:`DATA_KEY_SIZE` bytes.
            WrongKeyError: ``data_key`` is not the key this stream was sealed with.
            HeaderAuthenticationError: the key matches but the header was modified.
        """
        self._verify(_check_data_key(data_key), from_recipient=False)

    def _verify(self, data_key: bytes, *, from_recipient: bool) -> bytes:
        """Verifies the key check and the header MAC; returns the segment key."""
        if not compare_digest(_key_check(data_key), self.key_check):
            if from_recipient:
                # The recipient's wrapped key authenticated, so the key check itself (or the
                # sender) is at fault, not the caller's key.
                raise HeaderAuthenticationError(
                    "the key check does not match the data key wrapped for this recipient"
                )
            raise WrongKeyError(
                f"the data key is not the key of this stream (key id {self.key_id!r})"
            )
        mac_key, segment_key = _stream_keys(data_key, self.salt)
        try:
            _header_mac(mac_key, self.raw[:-MAC_SIZE]).verify(self.mac)
        except InvalidSignature as e:
            raise HeaderAuthenticationError("the header failed authentication (modified)") from e
        return segment_key

    def unwrap_data_key(self, private_key: RecipientPrivateKey) -> bytes:
        """Opens the data key sealed to ``private_key`` and authenticates the header with it.

        Raises:
            NoMatchingRecipientError: the key is not among this stream's recipients.
            HeaderAuthenticationError: the recipient's wrapped key or the header was modified.
            HeaderError: the wrapped data key has the wrong size.
        """
        data_key = self._unwrap(private_key)
        self._verify(data_key, from_recipient=True)
        return data_key

    def _unwrap(self, private_key: RecipientPrivateKey) -> bytes:
        fingerprint = private_key.fingerprint()
        matches = [
            r for r in self.recipients if r.kem == private_key.kem and r.fingerprint == fingerprint
        ]
        if not matches:
            raise NoMatchingRecipientError(
                f"key {fingerprint} is not a recipient of this stream "
                f"({len(self.recipients)} recipient(s): "
                f"{', '.join(self.recipient_fingerprints) or 'none'})"
            )
        info = _recipient_info(self._bound_prefix)
        for entry in matches:
            try:
                data_key = hpke.open_sealed(private_key, entry.sealed_key, info=info)
            except HpkeError:
                continue
            if len(data_key) != DATA_KEY_SIZE:
                raise HeaderError("the wrapped data key has the wrong size")
            return data_key
        raise HeaderAuthenticationError(
            f"the data key wrapped for {fingerprint} failed authentication "
            "(header or wrapped key modified)"
        )


def _read_exact(source: _Source, n: int, raw: bytearray, what: str) -> bytes:
    """Reads exactly ``n`` bytes, appends them to ``raw`` and returns them.

    Raises:
        TruncatedError: end of stream first.
    """
    data = _read_upto(source, n)
    raw += data
    if len(data) < n:
        raise TruncatedError(f"the stream ends inside the header ({what})")
    return data


def _read_upto(source: _Source, n: int) -> bytes:
    """Reads up to ``n`` bytes, fewer only at end of stream."""
    data = source.read(n)
    if data is None:
        raise ParameterError("the source is non-blocking and has no data; use a blocking stream")
    if len(data) == n or not data:
        return bytes(data)
    parts = [data]
    got = len(data)
    while got < n:
        more = source.read(n - got)
        if more is None:
            raise ParameterError(
                "the source is non-blocking and has no data; use a blocking stream"
            )
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_header(source: BinaryIO | _Source) -> Header:
    """Reads and parses a sealed stream's header, leaving ``source`` at the first segment.

    The header is not authenticated yet: that needs the data key (see
    :meth:`Header.check_data_key`, :class:`OpenReader`).

    Raises:
        HeaderError: not a sealed stream, unsupported version or algorithm, malformed header.
        TruncatedError: the stream ends inside the header.
        OSError: reading ``source`` failed.
    """
    raw = bytearray()
    magic = _read_upto(source, len(MAGIC))
    raw += magic
    if magic != MAGIC:
        if not magic:
            raise HeaderError("empty input: not a sealed stream")
        if MAGIC.startswith(magic):
            raise TruncatedError("the stream ends inside the header (magic)")
        raise HeaderError("not a sealed stream (bad magic)")
    rest = _read_exact(source, _FIXED.size - len(MAGIC), raw, "fixed fields")
    (_, version, aead, kdf, flags, chunk_size, salt, key_check, key_id_len) = _FIXED.unpack(
        MAGIC + rest
    )
    if version != FORMAT_VERSION:
        raise HeaderError(
            f"unsupported format version {version} (this build reads version {FORMAT_VERSION})"
        )
    if aead != AEAD_AES_256_GCM:
        raise HeaderError(f"unsupported AEAD id {aead}")
    if kdf != KDF_HKDF_SHA256:
        raise HeaderError(f"unsupported KDF id {kdf}")
    if flags != 0:
        raise HeaderError(f"unsupported header flags {flags:#04x}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise HeaderError(f"chunk size {chunk_size} is out of range")
    if key_id_len == 0:
        raise HeaderError("empty key id")
    try:
        key_id = _read_exact(source, key_id_len, raw, "key id").decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError("the key id is not UTF-8") from e
    if not key_id.isprintable():
        raise HeaderError("the key id has unprintable characters")
    (count,) = _COUNT.unpack(_read_exact(source, _COUNT.size, raw, "recipient count"))
    if count > MAX_RECIPIENTS:
        raise HeaderError(f"too many recipients ({count} > {MAX_RECIPIENTS})")
    recipients: list[RecipientEntry] = []
    for i in range(count):
        kem, fingerprint, sealed_len = _STANZA.unpack(
            _read_exact(source, _STANZA.size, raw, f"recipient {i}")
        )
        if kem not in KEM_NAMES:
            raise HeaderError(f"recipient {i} has unsupported KEM {kem}")
        if sealed_len != hpke.sealed_size(kem, DATA_KEY_SIZE):
            raise HeaderError(f"recipient {i} has a wrapped key of the wrong size")
        sealed = _read_exact(source, sealed_len, raw, f"recipient {i}")
        recipients.append(RecipientEntry(kem, fingerprint.hex(), sealed))
    mac = _read_exact(source, MAC_SIZE, raw, "MAC")
    return Header(
        version=version,
        aead=aead,
        kdf=kdf,
        chunk_size=chunk_size,
        salt=salt,
        key_check=key_check,
        key_id=key_id,
        recipients=tuple(recipients),
        mac=mac,
        raw=bytes(raw),
    )


def _build_header(
    *,
    data_key: bytes,
    key_id: bytes,
    recipients: Sequence[RecipientPublicKey],
    chunk_size: int,
    salt: bytes,
) -> tuple[bytes, bytes]:
    """(header bytes, segment key)."""
    key_check = _key_check(data_key)
    prefix = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        AEAD_AES_256_GCM,
        KDF_HKDF_SHA256,
        0,
        chunk_size,
        salt,
        key_check,
        len(key_id),
    ) + bytes(key_id)
    info = _recipient_info(prefix)
    parts = [prefix, _COUNT.pack(len(recipients))]
    for r in recipients:
        sealed = hpke.seal(r, data_key, info=info)
        parts.append(_STANZA.pack(r.kem, r.fingerprint_bytes(), len(sealed)))
        parts.append(sealed)
    body = b"".join(parts)
    mac_key, segment_key = _stream_keys(data_key, salt)
    return body + _header_mac(mac_key, body).finalize(), segment_key


# --- segments -------------------------------------------------------------------------------


class _SegmentCipher:
    """AES-256-GCM with the per-segment nonce and AAD of the format."""

    __slots__ = ("_aad", "_aead", "_nonce")

    def __init__(self, segment_key: bytes, header_digest: bytes) -> None:
        self._aead: AESGCM | None = AESGCM(segment_key)
        self._nonce = bytearray(NONCE_SIZE)
        self._aad = bytearray(header_digest + bytes(_AAD_TAIL.size))

    def _set(self, index: int, final: bool) -> None:
        if index >= _MAX_SEGMENTS:
            raise ParameterError("too many segments for one stream")
        # nonce = u64 index || 00 00 00 || final flag; the key is unique to this stream, so a
        # nonce never repeats under one key.
        _NONCE_INDEX.pack_into(self._nonce, 0, index)
        self._nonce[NONCE_SIZE - 1] = 1 if final else 0
        _AAD_TAIL.pack_into(self._aad, 32, index, 1 if final else 0)

    def encrypt_into(self, index: int, final: bool, plain: memoryview, out: memoryview) -> None:
        if self._aead is None:
            raise ParameterError("the stream has been closed")
        self._set(index, final)
        self._aead.encrypt_into(self._nonce, plain, self._aad, out)

    def decrypt_into(self, index: int, final: bool, sealed: memoryview, out: memoryview) -> None:
        if self._aead is None:
            raise ParameterError("the stream has been closed")
        self._set(index, final)
        self._aead.decrypt_into(self._nonce, sealed, self._aad, out)

    def decrypt(self, index: int, final: bool, sealed: memoryview) -> bytes:
        if self._aead is None:
            raise ParameterError("the stream has been closed")
        self._set(index, final)
        return self._aead.decrypt(self._nonce, sealed, self._aad)

    def close(self) -> None:
        self._aead = None


def _segment_error(i: int) -> SegmentAuthenticationError:
    return SegmentAuthenticationError(
        f"segment {i} failed authentication (modified, reordered, or from another stream)"
    )


def _write_all(sink: _Sink, view: memoryview) -> None:
    """Writes all of ``view``, looping when a raw sink takes less than offered."""
    while view:
        n = sink.write(view)
        if n is None:
            raise ParameterError("the sink is non-blocking and would block; use a blocking stream")
        if n >= len(view):
            return
        view = view[n:]


def _readinto_full(source: _Source, view: memoryview) -> int:
    """Fills ``view`` from ``source``; returns fewer bytes than ``len(view)`` only at EOF."""
    readinto = getattr(source, "readinto", None)
    got = 0
    total = len(view)
    while got < total:
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = source.read(total - got)
            n = None if data is None else len(data)
            if data:
                view[got : got + len(data)] = data
        if n is None:
            raise ParameterError(
                "the source is non-blocking and has no data; use a blocking stream"
            )
        if n == 0:
            break
        got += n
    return got


class SealWriter(AbortOnError, Closeable):
    """Seals a stream of plaintext to ``sink``: a context manager and a binary writer.

    The header is written at construction. :meth:`write` encrypts each full chunk as soon as it
    has one; :meth:`close` writes the final segment (with the remaining, possibly zero, bytes).
    When the ``with`` block raises, no final segment is written, so the partial output fails
    to open with :class:`~sealing.errors.TruncatedError`. The writer never closes ``sink``.

    Args:
        sink: where the sealed stream goes (anything with ``write``).
        data_key: the :data:`DATA_KEY_SIZE`-byte data key.
        key_id: the id under which the data key is registered (printable, up to 255 bytes).
        recipients: public keys that may open the stream with their private key; with none,
            only the data key opens it.
        chunk_size: plaintext bytes per segment.

    Raises:
        ParameterError: bad data key, key id, chunk size or too many recipients.
        InvalidKeyError, HpkeError: a recipient key is rejected.
        OSError: writing the header to ``sink`` failed.
    """

    def __init__(
        self,
        sink: BinaryIO | _Sink,
        *,
        data_key: bytes,
        key_id: str,
        recipients: Sequence[RecipientPublicKey] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        key = _check_data_key(data_key)
        key_id_bytes = _check_key_id(key_id)
        _check_chunk_size(chunk_size)
        if len(recipients) > MAX_RECIPIENTS:
            raise ParameterError(f"at most {MAX_RECIPIENTS} recipients")
        for r in recipients:
            if not isinstance(r, RecipientPublicKey):
                raise ParameterError("recipients must be RecipientPublicKey objects")
        header, segment_key = _build_header(
            data_key=key,
            key_id=key_id_bytes,
            recipients=recipients,
            chunk_size=chunk_size,
            salt=os.urandom(SALT_SIZE),
        )
        self._sink = sink
        self._chunk_size = chunk_size
        self._cipher = _SegmentCipher(segment_key, hashlib.sha256(header).digest())
        self._pending = bytearray(chunk_size)
        self._pending_view = memoryview(self._pending)
        self._pending_len = 0
        # 4-byte length prefix, then ciphertext and tag: one write per segment.
        self._out = bytearray(_SEGMENT_LENGTH.size + chunk_size + TAG_SIZE)
        self._out_view = memoryview(self._out)
        self._index = 0
        self._size = 0
        self._header_size = len(header)
        self._closed = False
        self._broken = False
        try:
            _write_all(sink, memoryview(header))
        except BaseException:
            self._abort()
            raise

    @property
    def chunk_size(self) -> int:
        """Plaintext bytes per segment."""
        return self._chunk_size

    @property
    def header_size(self) -> int:
        """The length of the header written at construction."""
        return self._header_size

    @property
    def plaintext_size(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._size

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`."""
        return self._closed

    def _seal_segment(self, plain: memoryview, final: bool) -> None:
        n = len(plain)
        _SEGMENT_LENGTH.pack_into(self._out, 0, n)
        end = _SEGMENT_LENGTH.size + n + TAG_SIZE
        self._cipher.encrypt_into(self._index, final, plain, self._out_view[4:end])
        self._index += 1
        _write_all(self._sink, self._out_view[:end])

    def _check_open(self) -> None:
        if self._closed:
            raise ParameterError("write to a closed SealWriter")
        if self._broken:
            raise SealingError("an earlier write failed; the sealed stream is incomplete")

    def write(self, data: ReadableBuffer) -> int:
        """Encrypts ``data`` (buffered up to one chunk) and returns ``len(data)``.

        Raises:
            ParameterError: the writer is closed.
            SealingError: an earlier write failed.
            OSError: writing to the sink failed (the writer is then unusable).
        """
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        chunk = self._chunk_size
        try:
            if self._pending_len:
                take = min(chunk - self._pending_len, len(view))
                self._pending_view[self._pending_len : self._pending_len + take] = view[:take]
                self._pending_len += take
                view = view[take:]
                if self._pending_len == chunk:
                    self._seal_segment(self._pending_view, final=False)
                    self._pending_len = 0
            # Full chunks are encrypted straight from the caller's buffer, without a copy.
            while len(view) >= chunk:
                self._seal_segment(view[:chunk], final=False)
                view = view[chunk:]
            if view:
                self._pending_view[: len(view)] = view
                self._pending_len = len(view)
        except BaseException:
            self._broken = True
            raise
        self._size += total
        return total

    def copy_from(self, source: BinaryIO | _Source) -> int:
        """Reads ``source`` to its end and seals everything read; returns the byte count.

        Reads straight into the writer's chunk buffer, so no intermediate copy is made.

        Raises:
            ParameterError: the writer is closed or ``source`` is non-blocking.
            SealingError: an earlier write failed.
            OSError: reading ``source`` or writing the sink failed.
        """
        self._check_open()
        chunk = self._chunk_size
        total = 0
        try:
            while True:
                n = _readinto_full(source, self._pending_view[self._pending_len :])
                self._pending_len += n
                total += n
                self._size += n
                if self._pending_len < chunk:
                    break
                self._seal_segment(self._pending_view, final=False)
                self._pending_len = 0
        except BaseException:
            self._broken = True
            raise
        return total

    def close(self) -> None:
        """Writes the final segment and wipes the writer's buffers. Idempotent.

        Does not close the sink; flushes it when it has ``flush``.

        Raises:
            SealingError: an earlier write failed (nothing more is written).
            OSError: writing to the sink failed.
        """
        if self._closed:
            return
        if self._broken:
            self._abort()
            raise SealingError("an earlier write failed; the sealed stream is incomplete")
        try:
            self._seal_segment(self._pending_view[: self._pending_len], final=True)
            flush = getattr(self._sink, "flush", None)
            if flush is not None:
                flush()
        finally:
            self._abort()

    def abort(self) -> None:
        """Stops without writing the final segment, so the output cannot open as complete."""
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._cipher.close()
        # The chunk buffer held plaintext; wipe all of it, not only the pending part.
        self._pending_view[:] = bytes(len(self._pending))
        self._pending_len = 0


class OpenReader(io.RawIOBase):
    """Opens a sealed stream: a context manager and a read-only binary file object.

    The header is read and authenticated at construction, with either the raw ``data_key`` or a
    recipient's ``private_key``. Reading then yields plaintext segment by segment, each only
    after its authentication succeeded. Errors are raised at the segment where the problem is;
    at the end of the stream a missing final segment raises :class:`TruncatedError`, so a
    truncated stream never reads as complete. After an error every read raises it again.

    Pass ``header`` when :func:`read_header` was already called on ``source``.

    Raises:
        ParameterError: neither or both of ``data_key`` and ``private_key``.
        HeaderError, TruncatedError: not a sealed stream, or a malformed or truncated header.
        WrongKeyError: ``data_key`` is not this stream's key.
        NoMatchingRecipientError: ``private_key`` is not a recipient.
        HeaderAuthenticationError: the header was modified.
        OSError: reading ``source`` failed.
    """

    def __init__(
        self,
        source: BinaryIO | _Source,
        *,
        data_key: bytes | None = None,
        private_key: RecipientPrivateKey | None = None,
        header: Header | None = None,
    ) -> None:
        super().__init__()
        self._cipher: _SegmentCipher | None = None
        self._out = bytearray()
        self._error: SealingError | None = None
        if (data_key is None) == (private_key is None):
            raise ParameterError("give exactly one of data_key and private_key")
        hdr = header if header is not None else read_header(source)
        if data_key is not None:
            segment_key = hdr._verify(_check_data_key(data_key), from_recipient=False)
        else:
            assert private_key is not None
            segment_key = hdr._verify(hdr._unwrap(private_key), from_recipient=True)
        self._header = hdr
        self._source = source
        self._chunk_size = hdr.chunk_size
        self._cipher = _SegmentCipher(segment_key, hdr.digest)
        self._in = bytearray(hdr.chunk_size + TAG_SIZE)
        self._in_view = memoryview(self._in)
        self._out = bytearray(hdr.chunk_size)
        self._out_view = memoryview(self._out)
        self._pos = 0
        self._end = 0
        self._index = 0
        self._final_seen = False
        self._size = 0

    @property
    def header(self) -> Header:
        """The stream's authenticated header."""
        return self._header

    @property
    def key_id(self) -> str:
        """The header's key id."""
        return self._header.key_id

    @property
    def plaintext_read(self) -> int:
        """Authenticated plaintext bytes decrypted so far."""
        return self._size

    @property
    def complete(self) -> bool:
        """True once the final segment was authenticated and no data follows it."""
        return self._final_seen

    def readable(self) -> bool:
        return True

    def _live_cipher(self) -> _SegmentCipher | None:
        """The cipher, or None at the clean end of the stream; re-raises an earlier error."""
        if self._error is not None:
            raise self._error
        if self._cipher is None:
            raise ValueError("I/O operation on closed file")
        return None if self._final_seen else self._cipher

    def _read_length(self) -> tuple[int, int, bool]:
        """Reads the next segment's length prefix: (index, plaintext length, final flag)."""
        i = self._index
        prefix = _read_upto(self._source, _SEGMENT_LENGTH.size)
        if not prefix:
            raise TruncatedError(
                f"the stream ends after {i} segment(s) without a final segment (truncated)"
            )
        if len(prefix) < _SEGMENT_LENGTH.size:
            raise TruncatedError(f"the stream ends inside segment {i} (truncated)")
        (n,) = _SEGMENT_LENGTH.unpack(prefix)
        if n > self._chunk_size:
            raise SegmentAuthenticationError(
                f"segment {i} is malformed (length {n} exceeds the chunk size)"
            )
        # Every non-final segment is exactly one chunk, so a shorter one must be the last.
        return i, n, n < self._chunk_size

    def _read_sealed(self, i: int, n: int) -> memoryview:
        """Reads segment ``i``'s ciphertext (``n`` bytes) and tag into the input buffer."""
        sealed = self._in_view[: n + TAG_SIZE]
        if _readinto_full(self._source, sealed) < len(sealed):
            raise TruncatedError(f"the stream ends inside segment {i} (truncated)")
        return sealed

    def _check_end(self, i: int, final: bool) -> None:
        if final and _read_upto(self._source, 1):
            raise TrailingDataError(f"data follows the final segment (segment {i})")

    def _next_into(self, target: memoryview | None) -> int | None:
        """Authenticates the next segment into ``target`` (at least one chunk long) or, when
        None, into the reader's buffer; returns its length, or None at the clean end."""
        cipher = self._live_cipher()
        if cipher is None:
            return None
        out: memoryview | None = None
        try:
            i, n, final = self._read_length()
            sealed = self._read_sealed(i, n)
            out = (self._out_view if target is None else target)[:n]
            try:
                cipher.decrypt_into(i, final, sealed, out)
            except InvalidTag as e:
                raise _segment_error(i) from e
            self._check_end(i, final)
        except BaseException as e:
            if out is not None:
                # decrypt_into leaves unauthenticated plaintext behind on failure; wipe it.
                out[:] = bytes(len(out))
            self._record_failure(e)
            raise
        self._advance(i, n, final)
        if target is None:
            self._pos, self._end = 0, n
        return n

    def _next_owned(self) -> bytes | None:
        """Authenticates the next segment into a new bytes object; None at the clean end.

        Decrypting into a fresh object saves the copy out of the reader's buffer.
        """
        cipher = self._live_cipher()
        if cipher is None:
            return None
        try:
            i, n, final = self._read_length()
            sealed = self._read_sealed(i, n)
            try:
                plain = cipher.decrypt(i, final, sealed)
            except InvalidTag as e:
                raise _segment_error(i) from e
            self._check_end(i, final)
        except BaseException as e:
            self._record_failure(e)
            raise
        self._advance(i, n, final)
        return plain

    def _record_failure(self, e: BaseException) -> None:
        if isinstance(e, SealingError):
            self._error = e
        else:
            # An I/O error or an interrupt left the stream position unknown; later reads must
            # not go on from it.
            detail = str(e) if isinstance(e, OSError) else f"interrupted ({type(e).__name__})"
            self._error = SealingIOError(f"reading the sealed stream failed: {detail}")

    def _advance(self, i: int, n: int, final: bool) -> None:
        self._index = i + 1
        self._final_seen = final
        self._size += n

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fills ``buffer`` with plaintext; returns fewer bytes than its size only at the end.

        Raises:
            SegmentAuthenticationError, TruncatedError, TrailingDataError: see the class.
            OSError: reading the source failed.
        """
        dest = memoryview(buffer).cast("B")
        got = 0
        while got < len(dest):
            if self._pos < self._end:
                n = min(self._end - self._pos, len(dest) - got)
                dest[got : got + n] = self._out_view[self._pos : self._pos + n]
                self._pos += n
                got += n
            elif len(dest) - got >= self._chunk_size:
                # Room for a whole segment: decrypt straight into the caller's buffer.
                m = self._next_into(dest[got:])
                if m is None:
                    break
                got += m
            elif self._next_into(None) is None:
                break
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Reads up to ``size`` bytes (all the rest when negative or None); fewer only at the end.

        Raises:
            SegmentAuthenticationError, TruncatedError, TrailingDataError: see the class.
            OSError: reading the source failed.
        """
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        while self._pos >= self._end:
            if self._next_into(None) is None:
                return b""
        if self._end - self._pos >= size:
            # The common case: one copy out of the segment buffer.
            data = bytes(self._out_view[self._pos : self._pos + size])
            self._pos += size
            return data
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        """Reads to the end (memory grows with the stream; prefer :meth:`chunks`).

        Raises:
            SegmentAuthenticationError, TruncatedError, TrailingDataError: see the class.
            OSError: reading the source failed.
        """
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """Yields the remaining plaintext, one authenticated segment at a time (never empty).

        Raises:
            SegmentAuthenticationError, TruncatedError, TrailingDataError: see the class.
            OSError: reading the source failed.
        """
        if self._pos < self._end:
            rest = bytes(self._out_view[self._pos : self._end])
            self._pos = self._end
            yield rest
        while (plain := self._next_owned()) is not None:
            if plain:
                yield plain

    def copy_to(self, sink: BinaryIO | _Sink) -> int:
        """Writes the remaining plaintext to ``sink`` straight from the segment buffer.

        Returns the byte count. ``sink`` must not keep a reference to the data it is given.

        Raises:
            SegmentAuthenticationError, TruncatedError, TrailingDataError: see the class.
            OSError: reading the source or writing ``sink`` failed.
        """
        total = 0
        if self._pos < self._end:
            _write_all(sink, self._out_view[self._pos : self._end])
            total += self._end - self._pos
            self._pos = self._end
        while (n := self._next_into(None)) is not None:
            self._pos = self._end
            if n:
                _write_all(sink, self._out_view[:n])
                total += n
        return total

    def close(self) -> None:
        """Wipes the plaintext buffer and forgets the key. Does not close ``source``."""
        if self._cipher is not None:
            self._cipher.close()
            self._cipher = None
            self._out[:] = bytes(len(self._out))
        super().close()


# --- convenience ----------------------------------------------------------------------------


def seal_bytes(
    plaintext: ReadableBuffer,
    *,
    data_key: bytes,
    key_id: str,
    recipients: Sequence[RecipientPublicKey] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Seals ``plaintext`` in memory and returns the sealed stream.

    Raises:
        ParameterError, InvalidKeyError, HpkeError: as :class:`SealWriter`.
    """
    out = io.BytesIO()
    with SealWriter(
        out, data_key=data_key, key_id=key_id, recipients=recipients, chunk_size=chunk_size
    ) as w:
        w.write(plaintext)
    return out.getvalue()


def open_bytes(
    sealed: bytes,
    *,
    data_key: bytes | None = None,
    private_key: RecipientPrivateKey | None = None,
) -> bytes:
    """Opens a sealed stream held in memory and returns the plaintext.

    Raises:
        EnvelopeError: any of the :class:`OpenReader` errors.
        ParameterError: neither or both keys given.
    """
    with OpenReader(io.BytesIO(sealed), data_key=data_key, private_key=private_key) as r:
        return r.readall()


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` only if the ``with`` block completes.

    It is written as a mode-0600 temporary file next to ``path``, flushed to disk and renamed
    over ``path`` at the end; on any exception the temporary file is removed.

    Raises:
        OSError: the file cannot be created, written or renamed.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seal_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    data_key: bytes,
    key_id: str,
    recipients: Sequence[RecipientPublicKey] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Seals the file ``src`` to ``dst`` (written atomically); returns the plaintext size.

    Raises:
        ParameterError, InvalidKeyError, HpkeError: as :class:`SealWriter`.
        OSError: reading ``src`` or writing ``dst`` failed.
    """
    with open(src, "rb") as f_in, atomic_output(dst) as f_out:
        with SealWriter(
            f_out, data_key=data_key, key_id=key_id, recipients=recipients, chunk_size=chunk_size
        ) as w:
            return w.copy_from(f_in)


def open_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    data_key: bytes | None = None,
    private_key: RecipientPrivateKey | None = None,
) -> int:
    """Opens the sealed file ``src`` into ``dst``; returns the plaintext size.

    ``dst`` appears only after the whole stream authenticated, so a failure leaves no output.

    Raises:
        EnvelopeError: any of the :class:`OpenReader` errors.
        OSError: reading ``src`` or writing ``dst`` failed.
    """
    with (
        open(src, "rb") as f_in,
        OpenReader(f_in, data_key=data_key, private_key=private_key) as r,
        atomic_output(dst) as f_out,
    ):
        return r.copy_to(f_out)
