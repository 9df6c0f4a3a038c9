"""Recipient key pairs for HPKE, and the files that hold them and raw data keys.

A recipient key is an HPKE KEM key pair. Two KEMs are supported, numbered as the
``cleanroom.v1.KemAlgorithm`` enum numbers them:

- :data:`KEM_X25519` (1): DHKEM(X25519, HKDF-SHA256). The raw public key is the 32-byte
  X25519 public value; the raw private key is the 32-byte X25519 scalar.
- :data:`KEM_MLKEM768_X25519` (2): the ML-KEM-768 + X25519 hybrid. The raw public key is the
  1,184-byte ML-KEM-768 encapsulation key followed by the 32-byte X25519 public value (1,216
  bytes, the X-Wing order); the raw private key is the 64-byte ML-KEM-768 seed (d || z)
  followed by the 32-byte X25519 scalar (96 bytes).

Key files are PEM text. X25519 keys use the standard ``PRIVATE KEY`` (PKCS #8) and
``PUBLIC KEY`` (SubjectPublicKeyInfo) PEM forms, so OpenSSL reads them too. Hybrid keys use
``CLEANROOM MLKEM768-X25519 PRIVATE KEY`` and ``CLEANROOM MLKEM768-X25519 PUBLIC KEY`` blocks
whose body is the base64 of the raw bytes above. Private key files are created with mode 0600.
A raw data key file holds exactly :data:`DATA_KEY_SIZE` bytes, also mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PrivateKey, MLKEM768X25519PublicKey

from cleanroom.closing import Closeable
from sealing.errors import InvalidKeyError, KeyFileError, ParameterError

__all__ = [
    "DATA_KEY_SIZE",
    "KEM_MLKEM768_X25519",
    "KEM_NAMES",
    "KEM_X25519",
    "PUBLIC_KEY_SIZES",
    "RecipientPrivateKey",
    "RecipientPublicKey",
    "decode_private_key",
    "decode_public_key",
    "encode_private_key",
    "encode_public_key",
    "generate_recipient_key",
    "kem_from_name",
    "load_data_key",
    "load_private_key",
    "load_public_key",
    "write_data_key",
    "write_private_key",
    "write_public_key",
]

_log = logging.getLogger(__name__)

KEM_X25519: Final = 1
KEM_MLKEM768_X25519: Final = 2

KEM_NAMES: Final[dict[int, str]] = {KEM_X25519: "x25519", KEM_MLKEM768_X25519: "mlkem768-x25519"}

_X25519_SIZE: Final = 32
_MLKEM768_PUBLIC_SIZE: Final = 1184
_MLKEM768_SEED_SIZE: Final = 64

PUBLIC_KEY_SIZES: Final[dict[int, int]] = {
    KEM_X25519: _X25519_SIZE,
    KEM_MLKEM768_X25519: _MLKEM768_PUBLIC_SIZE + _X25519_SIZE,
}
_PRIVATE_KEY_SIZES: Final[dict[int, int]] = {
    KEM_X25519: _X25519_SIZE,
    KEM_MLKEM768_X25519: _MLKEM768_SEED_SIZE + _X25519_SIZE,
}

#: Size in bytes of a data key (an AES-256 key's worth of input keying material).
DATA_KEY_SIZE: Final = 32

#: The fingerprint is this many leading bytes of SHA-256(kem || raw).
FINGERPRINT_SIZE: Final = 8

_HYBRID_PRIVATE_LABEL: Final = "CLEANROOM MLKEM768-X25519 PRIVATE KEY"
_HYBRID_PUBLIC_LABEL: Final = "CLEANROOM MLKEM768-X25519 PUBLIC KEY"
_PKCS8_LABEL: Final = "PRIVATE KEY"
_SPKI_LABEL: Final = "PUBLIC KEY"

# Key files are tiny; refusing larger ones keeps a wrong path (a dataset, a device) from being
# read into memory whole.
_MAX_KEY_FILE_SIZE: Final = 64 * 1024


def kem_from_name(name: str) -> int:
    """Returns the KEM number for a name in :data:`KEM_NAMES` (``x25519``, ``mlkem768-x25519``).

    Raises:
        ParameterError: the name is not a supported KEM.
    """
    for kem, kem_name in KEM_NAMES.items():
        if kem_name == name.lower():
            return kem
    raise ParameterError(f"unknown KEM {name!r}; expected one of {', '.join(KEM_NAMES.values())}")


def _check_kem(kem: int) -> None:
    if kem not in KEM_NAMES:
        raise InvalidKeyError(f"unsupported KEM {kem}")


@dataclass(frozen=True, repr=False)
class RecipientPublicKey:
    """An HPKE recipient public key: the KEM number and the raw public key bytes.

    Raises:
        InvalidKeyError: the KEM is unknown or ``raw`` has the wrong length for it.
    """

    kem: int
    raw: bytes

    def __post_init__(self) -> None:
        _check_kem(self.kem)
        if not isinstance(self.raw, bytes):
            # A bytearray or memoryview would make the frozen key mutable behind our back.
            object.__setattr__(self, "raw", bytes(self.raw))
        expected = PUBLIC_KEY_SIZES[self.kem]
        if len(self.raw) != expected:
            raise InvalidKeyError(
                f"{KEM_NAMES[self.kem]} public key must be {expected} bytes, got {len(self.raw)}"
            )

    def fingerprint_bytes(self) -> bytes:
        """The first 8 bytes of SHA-256 over the KEM number (one byte) and the raw key."""
        return hashlib.sha256(bytes([self.kem]) + self.raw).digest()[:FINGERPRINT_SIZE]

    def fingerprint(self) -> str:
        """A short hex identifier of this key (16 hex digits), as stored in sealed headers."""
        return self.fingerprint_bytes().hex()

    def __repr__(self) -> str:
        return f"RecipientPublicKey({KEM_NAMES[self.kem]}, {self.fingerprint()})"

    def _hpke_key(self) -> x25519.X25519PublicKey | MLKEM768X25519PublicKey:
        """The key as the object ``cryptography``'s HPKE takes.

        Raises:
            InvalidKeyError: the KEM rejects the raw bytes.
        """
        try:
            if self.kem == KEM_X25519:
                return x25519.X25519PublicKey.from_public_bytes(self.raw)
            pq = mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM768_PUBLIC_SIZE])
            classic = x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM768_PUBLIC_SIZE:])
            return MLKEM768X25519PublicKey(pq, classic)
        except ValueError as e:
            raise InvalidKeyError(f"{KEM_NAMES[self.kem]} public key is not valid") from e


class RecipientPrivateKey(Closeable):
    """An HPKE recipient private key (X25519, or ML-KEM-768 + X25519 when ``mlkem_key`` is set).

    Use it as a context manager (or call :meth:`close`) to drop the key objects when done;
    OpenSSL wipes freed key memory.
    """

    __slots__ = ("_hpke", "_kem", "_mlkem", "_public", "_x25519")

    def __init__(
        self,
        *,
        x25519_key: x25519.X25519PrivateKey,
        mlkem_key: mlkem.MLKEM768PrivateKey | None = None,
    ) -> None:
        self._x25519: x25519.X25519PrivateKey | None = x25519_key
        self._mlkem: mlkem.MLKEM768PrivateKey | None = mlkem_key
        self._kem: int = KEM_X25519 if mlkem_key is None else KEM_MLKEM768_X25519
        # The hybrid key object hides its halves, so the halves are kept for serialisation and
        # the combined object is built once for HPKE.
        self._hpke: x25519.X25519PrivateKey | MLKEM768X25519PrivateKey | None = (
            x25519_key if mlkem_key is None else MLKEM768X25519PrivateKey(mlkem_key, x25519_key)
        )
        classic = x25519_key.public_key().public_bytes_raw()
        raw = classic if mlkem_key is None else mlkem_key.public_key().public_bytes_raw() + classic
        self._public = RecipientPublicKey(self._kem, raw)

    @classmethod
    def from_raw(cls, kem: int, raw: bytes) -> RecipientPrivateKey:
        """Builds a key from its raw private bytes (see the module docstring for the layout).

        Raises:
            InvalidKeyError: unknown KEM, wrong length, or bytes the KEM rejects.
        """
        _check_kem(kem)
        expected = _PRIVATE_KEY_SIZES[kem]
        if len(raw) != expected:
            raise InvalidKeyError(
                f"{KEM_NAMES[kem]} private key must be {expected} bytes, got {len(raw)}"
            )
        try:
            if kem == KEM_X25519:
                return cls(x25519_key=x25519.X25519PrivateKey.from_private_bytes(raw))
            return cls(
                mlkem_key=mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM768_SEED_SIZE]),
                x25519_key=x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM768_SEED_SIZE:]),
            )
        except ValueError as e:
            raise InvalidKeyError(f"{KEM_NAMES[kem]} private key is not valid") from e

    @property
    def kem(self) -> int:
        """The KEM number (:data:`KEM_X25519` or :data:`KEM_MLKEM768_X25519`)."""
        return self._kem

    def public_key(self) -> RecipientPublicKey:
        """The matching public key (available even after :meth:`close`)."""
        return self._public

    def fingerprint(self) -> str:
        """The public key's fingerprint."""
        return self._public.fingerprint()

    def private_bytes_raw(self) -> bytes:
        """The raw private key bytes (see the module docstring). Handle with care.

        Raises:
            ParameterError: the key was closed.
        """
        if self._x25519 is None:
            raise ParameterError("the private key has been closed")
        classic = self._x25519.private_bytes_raw()
        if self._mlkem is None:
            return classic
        return self._mlkem.private_bytes_raw() + classic

    def _hpke_key(self) -> x25519.X25519PrivateKey | MLKEM768X25519PrivateKey:
        if self._hpke is None:
            raise ParameterError("the private key has been closed")
        return self._hpke

    def close(self) -> None:
        """Drops the references to the key objects; the key cannot be used afterwards."""
        self._x25519 = None
        self._mlkem = None
        self._hpke = None

    def __repr__(self) -> str:
        return f"RecipientPrivateKey({KEM_NAMES[self._kem]}, {self.fingerprint()})"


def generate_recipient_key(kem: int = KEM_X25519) -> RecipientPrivateKey:
    """Generates a fresh recipient key pair for ``kem``.

    Raises:
        InvalidKeyError: the KEM is not supported.
    """
    _check_kem(kem)
    classic = x25519.X25519PrivateKey.generate()
    if kem == KEM_X25519:
        return RecipientPrivateKey(x25519_key=classic)
    return RecipientPrivateKey(x25519_key=classic, mlkem_key=mlkem.MLKEM768PrivateKey.generate())


# --- PEM encoding -----------------------------------------------------------------------------


def _pem_block(label: str, raw: bytes) -> bytes:
    body = base64.b64encode(raw).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode("ascii")


def _pem_label(text: str) -> str:
    """The label of the first PEM block in ``text``.

    Raises:
        KeyFileError: no PEM block.
    """
    begin = text.find("-----BEGIN ")
    end = text.find("-----", begin + 11) if begin >= 0 else -1
    if begin < 0 or end < 0:
        raise KeyFileError("not a PEM key file (no BEGIN line)")
    return text[begin + 11 : end]


def _pem_body(text: str, label: str) -> bytes:
    begin_line = f"-----BEGIN {label}-----"
    end_line = f"-----END {label}-----"
    start = text.find(begin_line)
    stop = text.find(end_line, start)
    if start < 0 or stop < 0:
        raise KeyFileError(f"malformed PEM block {label!r} (missing BEGIN or END line)")
    body = "".join(text[start + len(begin_line) : stop].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyFileError(f"malformed PEM block {label!r} (bad base64)") from e


def encode_private_key(key: RecipientPrivateKey) -> bytes:
    """The PEM text of a private key (PKCS #8 for X25519, a CLEANROOM block for the hybrid).

    Raises:
        ParameterError: the key was closed.
    """
    if key.kem == KEM_X25519:
        return x25519.X25519PrivateKey.from_private_bytes(key.private_bytes_raw()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return _pem_block(_HYBRID_PRIVATE_LABEL, key.private_bytes_raw())


def decode_private_key(data: bytes) -> RecipientPrivateKey:
    """Parses the PEM text :func:`encode_private_key` writes.

    Raises:
        KeyFileError: not a PEM private key of a supported kind, or malformed.
    """
    text = _ascii(data)
    label = _pem_label(text)
    if label == _HYBRID_PRIVATE_LABEL:
        try:
            return RecipientPrivateKey.from_raw(KEM_MLKEM768_X25519, _pem_body(text, label))
        except KeyFileError:
            raise
        except InvalidKeyError as e:
            raise KeyFileError(
                f"malformed {KEM_NAMES[KEM_MLKEM768_X25519]} private key: {e}"
            ) from e
    if label == _PKCS8_LABEL:
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyFileError("malformed PKCS #8 private key") from e
        if not isinstance(loaded, x25519.X25519PrivateKey):
            raise KeyFileError(f"unsupported private key type {type(loaded).__name__}; need X25519")
        return RecipientPrivateKey(x25519_key=loaded)
    if label.endswith("PUBLIC KEY"):
        raise KeyFileError("this is a public key file; a private key is needed")
    raise KeyFileError(f"unsupported PEM block {label!r}")


def encode_public_key(key: RecipientPublicKey) -> bytes:
    """The PEM text of a public key (SPKI for X25519, a CLEANROOM block for the hybrid)."""
    if key.kem == KEM_X25519:
        return x25519.X25519PublicKey.from_public_bytes(key.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return _pem_block(_HYBRID_PUBLIC_LABEL, key.raw)


def decode_public_key(data: bytes) -> RecipientPublicKey:
    """Parses the PEM text :func:`encode_public_key` writes.

    Raises:
        KeyFileError: not a PEM public key of a supported kind, or malformed.
    """
    text = _ascii(data)
    label = _pem_label(text)
    if label == _HYBRID_PUBLIC_LABEL:
        raw = _pem_body(text, label)
        try:
            key = RecipientPublicKey(KEM_MLKEM768_X25519, raw)
            key._hpke_key()  # The ML-KEM half must be a valid encapsulation key.
        except KeyFileError:
            raise
        except InvalidKeyError as e:
            raise KeyFileError(f"malformed {KEM_NAMES[KEM_MLKEM768_X25519]} public key: {e}") from e
        return key
    if label == _SPKI_LABEL:
        try:
            loaded = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise KeyFileError("malformed SubjectPublicKeyInfo public key") from e
        if not isinstance(loaded, x25519.X25519PublicKey):
            raise KeyFileError(f"unsupported public key type {type(loaded).__name__}; need X25519")
        return RecipientPublicKey(KEM_X25519, loaded.public_bytes_raw())
    if label.endswith("PRIVATE KEY"):
        raise KeyFileError("this is a private key file; pass the public key (.pub)")
    raise KeyFileError(f"unsupported PEM block {label!r}")


def _ascii(data: bytes) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        raise KeyFileError("not a PEM key file (not ASCII text)") from e


# --- files ------------------------------------------------------------------------------------


def _read_small(path: str | os.PathLike[str], what: str) -> tuple[bytes, int]:
    """(contents, mode) of a small regular file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{what} {p} is not a regular file")
            if st.st_size > _MAX_KEY_FILE_SIZE:
                raise KeyFileError(f"{what} {p} is too large to be a key file")
            return f.read(_MAX_KEY_FILE_SIZE + 1), st.st_mode
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {p}: {e.strerror or e}") from e


def _warn_if_exposed(path: str | os.PathLike[str], mode: int, what: str) -> None:
    if mode & 0o077:
        _log.warning("%s %s is accessible by group or others; use mode 0600", what, path)


def _write_secret(path: str | os.PathLike[str], data: bytes, *, overwrite: bool, what: str) -> None:
    """Writes ``data`` to a file that is mode 0600 from the moment it exists."""
    p = Path(path)
    try:
        if not overwrite:
            # O_EXCL creates the file with mode 0600 (less under a strict umask) atomically, so
            # it is never readable by others, and never follows a planted symlink.
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            tmp: Path | None = None
        else:
            # mkstemp creates its file 0600; the rename makes the replacement atomic.
            fd, tmp_name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            tmp = Path(tmp_name)
    except FileExistsError as e:
        raise KeyFileError(f"{what} {p} already exists; not overwriting it") from e
    except OSError as e:
        raise KeyFileError(f"cannot create {what} {p}: {e.strerror or e}") from e
    done = False
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if tmp is not None:
            os.replace(tmp, p)
        done = True
    except OSError as e:
        raise KeyFileError(f"cannot write {what} {p}: {e.strerror or e}") from e
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            (tmp if tmp is not None else p).unlink(missing_ok=True)


def write_private_key(
    key: RecipientPrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Writes ``key`` as PEM to ``path``, created with mode 0600.

    Raises:
        KeyFileError: the file exists (unless ``overwrite``) or cannot be written.
    """
    _write_secret(path, encode_private_key(key), overwrite=overwrite, what="private key file")


def load_private_key(path: str | os.PathLike[str]) -> RecipientPrivateKey:
    """Reads a private key file written by :func:`write_private_key`.

    Logs a warning when the file is readable by group or others.

    Raises:
        KeyFileError: the file cannot be read or is not a supported private key.
    """
    data, mode = _read_small(path, "private key file")
    try:
        key = decode_private_key(data)
    except KeyFileError as e:
        raise KeyFileError(f"{path}: {e}") from e
    _warn_if_exposed(path, mode, "private key file")
    return key


def write_public_key(
    key: RecipientPublicKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Writes ``key`` as PEM to ``path``.

    Raises:
        KeyFileError: the file exists (unless ``overwrite``) or cannot be written.
    """
    p = Path(path)
    try:
        with p.open("wb" if overwrite else "xb") as f:
            f.write(encode_public_key(key))
    except FileExistsError as e:
        raise KeyFileError(f"public key file {p} already exists; not overwriting it") from e
    except OSError as e:
        raise KeyFileError(f"cannot write public key file {p}: {e.strerror or e}") from e


def load_public_key(path: str | os.PathLike[str]) -> RecipientPublicKey:
    """Reads a public key file written by :func:`write_public_key`.

    Raises:
        KeyFileError: the file cannot be read or is not a supported public key.
    """
    data, _ = _read_small(path, "public key file")
    try:
        return decode_public_key(data)
    except KeyFileError as e:
        raise KeyFileError(f"{path}: {e}") from e


def write_data_key(key: bytes, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Writes a raw data key (exactly :data:`DATA_KEY_SIZE` bytes) to ``path`` with mode 0600.

    Raises:
        ParameterError: the key is not :data:`DATA_KEY_SIZE` bytes.
        KeyFileError: the file exists (unless ``overwrite``) or cannot be written.
    """
    if len(key) != DATA_KEY_SIZE:
        raise ParameterError(f"a data key must be {DATA_KEY_SIZE} bytes")
    _write_secret(path, bytes(key), overwrite=overwrite, what="data key file")


def load_data_key(path: str | os.PathLike[str]) -> bytes:
    """Reads a raw data key file (exactly :data:`DATA_KEY_SIZE` bytes).

    Raises:
        KeyFileError: the file cannot be read or does not hold exactly one data key.
    """
    data, mode = _read_small(path, "data key file")
    if len(data) != DATA_KEY_SIZE:
        raise KeyFileError(
            f"data key file {path} must hold exactly {DATA_KEY_SIZE} raw bytes, has {len(data)}"
        )
    _warn_if_exposed(path, mode, "data key file")
    return data
