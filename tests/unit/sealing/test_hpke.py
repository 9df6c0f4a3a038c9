"""Single-shot HPKE to recipient keys."""

from __future__ import annotations

import os

import pytest

from sealing import hpke, keys
from sealing.errors import HpkeError, InvalidKeyError

KEMS = [keys.KEM_X25519, keys.KEM_MLKEM768_X25519]


@pytest.mark.parametrize("kem", KEMS)
def test_round_trip(kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    message = os.urandom(32)
    sealed = hpke.seal(key.public_key(), message, info=b"ctx")
    assert len(sealed) == hpke.sealed_size(kem, len(message))
    assert message not in sealed
    assert hpke.open_sealed(key, sealed, info=b"ctx") == message


@pytest.mark.parametrize("kem", KEMS)
def test_each_seal_is_fresh(kem: int) -> None:
    pub = keys.generate_recipient_key(kem).public_key()
    assert hpke.seal(pub, b"k" * 32, info=b"i") != hpke.seal(pub, b"k" * 32, info=b"i")


@pytest.mark.parametrize("kem", KEMS)
def test_wrong_info_fails(kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    sealed = hpke.seal(key.public_key(), b"secret", info=b"release:key-1")
    with pytest.raises(HpkeError, match="wrong key, wrong context"):
        hpke.open_sealed(key, sealed, info=b"release:key-2")


@pytest.mark.parametrize("kem", KEMS)
def test_wrong_key_fails(kem: int) -> None:
    sealed = hpke.seal(keys.generate_recipient_key(kem).public_key(), b"secret", info=b"i")
    with pytest.raises(HpkeError):
        hpke.open_sealed(keys.generate_recipient_key(kem), sealed, info=b"i")


def test_key_of_other_kem_fails() -> None:
    sealed = hpke.seal(
        keys.generate_recipient_key(keys.KEM_MLKEM768_X25519).public_key(), b"s", info=b"i"
    )
    with pytest.raises(HpkeError):
        hpke.open_sealed(keys.generate_recipient_key(keys.KEM_X25519), sealed, info=b"i")


@pytest.mark.parametrize("kem", KEMS)
def test_modified_or_short_message_fails(kem: int) -> None:
    key = keys.generate_recipient_key(kem)
    sealed = bytearray(hpke.seal(key.public_key(), b"secret", info=b"i"))
    for pos in (0, len(sealed) // 2, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(HpkeError):
            hpke.open_sealed(key, bytes(bad), info=b"i")
    with pytest.raises(HpkeError, match="too short"):
        hpke.open_sealed(key, bytes(sealed[:10]), info=b"i")


def test_low_order_x25519_point_is_refused() -> None:
    with pytest.raises(HpkeError):
        hpke.seal(keys.RecipientPublicKey(keys.KEM_X25519, bytes(32)), b"s", info=b"i")


def test_sealed_size_of_unknown_kem() -> None:
    with pytest.raises(InvalidKeyError):
        hpke.sealed_size(9, 32)
