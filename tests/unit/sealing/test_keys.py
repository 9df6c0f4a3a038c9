"""Recipient key pairs, their PEM files and raw data key files."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from cleanroom.v1 import common_pb2
from sealing import keys
from sealing.errors import InvalidKeyError, KeyFileError, ParameterError

KEMS = [keys.KEM_X25519, keys.KEM_MLKEM768_X25519]


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask, so that only the code under test can make a file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_kem_numbers_equal_the_protocol_enum() -> None:
    assert keys.KEM_X25519 == common_pb2.KEM_ALGORITHM_X25519
    assert keys.KEM_MLKEM768_X25519 == common_pb2.KEM_ALGORITHM_MLKEM768_X25519


@pytest.mark.parametrize("kem", KEMS)
def test_generated_key_has_public_key_of_the_kem_size(kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    pub = key.public_key()
    assert pub.kem == kem == key.kem
    assert len(pub.raw) == keys.PUBLIC_KEY_SIZES[kem]
    assert key.fingerprint() == pub.fingerprint()


def test_fingerprint_is_sha256_of_kem_and_raw() -> None:
    pub = keys.generate_recipient_key().public_key()
    expected = hashlib.sha256(bytes([pub.kem]) + pub.raw).hexdigest()[:16]
    assert pub.fingerprint() == expected
    assert pub.fingerprint_bytes() == bytes.fromhex(expected)


def test_fingerprint_differs_between_keys_and_kems() -> None:
    raw = os.urandom(32)
    a = keys.RecipientPublicKey(keys.KEM_X25519, raw)
    b = keys.RecipientPublicKey(keys.KEM_X25519, os.urandom(32))
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    ("kem", "size"),
    [(keys.KEM_X25519, 31), (keys.KEM_X25519, 33), (keys.KEM_MLKEM768_X25519, 32)],
)
def test_public_key_rejects_wrong_length(kem: int, size: int) -> None:
    with pytest.raises(InvalidKeyError, match="must be"):
        keys.RecipientPublicKey(kem, bytes(size))


def test_public_key_rejects_unknown_kem() -> None:
    with pytest.raises(InvalidKeyError, match="unsupported KEM"):
        keys.RecipientPublicKey(3, bytes(32))


def test_public_key_copies_mutable_raw() -> None:
    raw = bytearray(os.urandom(32))
    pub = keys.RecipientPublicKey(keys.KEM_X25519, raw)  # type: ignore[arg-type]
    raw[0] ^= 1
    assert isinstance(pub.raw, bytes)
    assert pub.raw[0] != raw[0]


def test_repr_shows_no_key_material() -> None:
    key = keys.generate_recipient_key()
    raw_hex = key.private_bytes_raw().hex()
    assert raw_hex not in repr(key)
    assert key.public_key().raw.hex() not in repr(key.public_key())


def test_kem_from_name() -> None:
    assert keys.kem_from_name("x25519") == keys.KEM_X25519
    assert keys.kem_from_name("MLKEM768-X25519") == keys.KEM_MLKEM768_X25519
    with pytest.raises(ParameterError):
        keys.kem_from_name("rsa")


@pytest.mark.parametrize("kem", KEMS)
def test_private_key_raw_round_trip(kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    again = keys.RecipientPrivateKey.from_raw(kem, key.private_bytes_raw())
    assert again.public_key() == key.public_key()


def test_closed_private_key_cannot_be_used() -> None:
    with keys.generate_recipient_key() as key:
        pub = key.public_key()
    assert key.public_key() == pub
    with pytest.raises(ParameterError, match="closed"):
        key.private_bytes_raw()


@pytest.mark.parametrize("kem", KEMS)
def test_key_files_round_trip(tmp_path: Path, kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    keys.write_private_key(key, tmp_path / "k.key")
    keys.write_public_key(key.public_key(), tmp_path / "k.pub")
    assert keys.load_private_key(tmp_path / "k.key").public_key() == key.public_key()
    assert keys.load_public_key(tmp_path / "k.pub") == key.public_key()


@pytest.mark.parametrize("kem", KEMS)
def test_private_key_file_is_0600_even_with_open_umask(
    tmp_path: Path, kem: int, open_umask: None
) -> None:
    path = tmp_path / "k.key"
    keys.write_private_key(keys.generate_recipient_key(kem), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_overwritten_private_key_file_is_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "k.key"
    path.write_text("old")
    path.chmod(0o644)
    key = keys.generate_recipient_key()
    keys.write_private_key(key, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load_private_key(path).public_key() == key.public_key()
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


def test_existing_key_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match="already exists"):
        keys.write_private_key(keys.generate_recipient_key(), path)
    with pytest.raises(KeyFileError, match="already exists"):
        keys.write_public_key(keys.generate_recipient_key().public_key(), path)
    assert path.read_text() == "precious"


def test_x25519_files_are_standard_pem(tmp_path: Path) -> None:
    key = keys.generate_recipient_key()
    keys.write_private_key(key, tmp_path / "k.key")
    keys.write_public_key(key.public_key(), tmp_path / "k.pub")
    loaded = serialization.load_pem_private_key((tmp_path / "k.key").read_bytes(), None)
    assert isinstance(loaded, x25519.X25519PrivateKey)
    assert loaded.private_bytes_raw() == key.private_bytes_raw()
    pub = serialization.load_pem_public_key((tmp_path / "k.pub").read_bytes())
    assert isinstance(pub, x25519.X25519PublicKey)
    assert pub.public_bytes_raw() == key.public_key().raw


def test_hybrid_files_use_cleanroom_labels(tmp_path: Path) -> None:
    key = keys.generate_recipient_key(keys.KEM_MLKEM768_X25519)
    keys.write_private_key(key, tmp_path / "k.key")
    keys.write_public_key(key.public_key(), tmp_path / "k.pub")
    assert (
        (tmp_path / "k.key")
        .read_text()
        .startswith("-----BEGIN CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\n")
    )
    assert (
        (tmp_path / "k.pub")
        .read_text()
        .startswith("-----BEGIN CLEANROOM MLKEM768-X25519 PUBLIC KEY-----\n")
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no BEGIN line"),
        (b"hello world\n", "no BEGIN line"),
        (b"\xff\xfe binary", "not ASCII"),
        (
            b"-----BEGIN CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\n!!!!\n"
            b"-----END CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\n",
            "bad base64",
        ),
        (
            b"-----BEGIN CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\nAAAA\n"
            b"-----END CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\n",
            "must be 96 bytes",
        ),
        (b"-----BEGIN CLEANROOM MLKEM768-X25519 PRIVATE KEY-----\nAAAA\n", "missing BEGIN or END"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "malformed PKCS #8"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "unsupported PEM"),
    ],
)
def test_malformed_private_key_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message):
        keys.load_private_key(path)


def test_public_key_file_given_as_private_key(tmp_path: Path) -> None:
    keys.write_public_key(keys.generate_recipient_key().public_key(), tmp_path / "k.pub")
    with pytest.raises(KeyFileError, match="public key file"):
        keys.load_private_key(tmp_path / "k.pub")


def test_private_key_file_given_as_public_key(tmp_path: Path) -> None:
    keys.write_private_key(keys.generate_recipient_key(), tmp_path / "k.key")
    with pytest.raises(KeyFileError, match="private key file"):
        keys.load_public_key(tmp_path / "k.key")


def test_other_key_types_are_rejected(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.key").write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ed.pub").write_bytes(
        ed.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="need X25519"):
        keys.load_private_key(tmp_path / "ed.key")
    with pytest.raises(KeyFileError, match="need X25519"):
        keys.load_public_key(tmp_path / "ed.pub")


def test_hybrid_public_key_with_invalid_mlkem_half(tmp_path: Path) -> None:
    import base64

    # 0xFF bytes decode to ML-KEM coefficients above the modulus, which the KEM must reject.
    body = base64.b64encode(b"\xff" * 1216).decode()
    (tmp_path / "bad.pub").write_text(
        "-----BEGIN CLEANROOM MLKEM768-X25519 PUBLIC KEY-----\n"
        f"{body}\n-----END CLEANROOM MLKEM768-X25519 PUBLIC KEY-----\n"
    )
    with pytest.raises(KeyFileError, match="not valid"):
        keys.load_public_key(tmp_path / "bad.pub")


def test_missing_and_non_regular_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        keys.load_private_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        keys.load_public_key(tmp_path)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_public_key("/dev/zero")


def test_huge_file_is_not_read_as_key(tmp_path: Path) -> None:
    path = tmp_path / "big.pub"
    path.write_bytes(b"A" * (1 << 20))
    with pytest.raises(KeyFileError, match="too large"):
        keys.load_public_key(path)


def test_exposed_private_key_file_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.key"
    keys.write_private_key(keys.generate_recipient_key(), path)
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="sealing.keys"):
        keys.load_private_key(path)
    assert "accessible by group or others" in caplog.text


def test_data_key_file_round_trip_and_mode(tmp_path: Path, open_umask: None) -> None:
    key = os.urandom(keys.DATA_KEY_SIZE)
    path = tmp_path / "dk"
    keys.write_data_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load_data_key(path) == key


def test_data_key_file_must_hold_one_key(tmp_path: Path) -> None:
    path = tmp_path / "dk"
    path.write_bytes(os.urandom(31))
    with pytest.raises(KeyFileError, match="exactly 32"):
        keys.load_data_key(path)
    with pytest.raises(ParameterError):
        keys.write_data_key(os.urandom(16), tmp_path / "dk2")
    assert not (tmp_path / "dk2").exists()
