"""Single-shot HPKE (RFC 9180 base mode) to a recipient key.

The suite is the recipient key's KEM (DHKEM(X25519, HKDF-SHA256), or the ML-KEM-768 + X25519
hybrid) with KDF HKDF-SHA256 and AEAD AES-256-GCM, as ``cryptography`` implements it. A sealed
message is the KEM's encapsulated key (32 bytes for X25519, 1,120 for the hybrid) followed by the
AEAD ciphertext and its 16-byte tag. ``info`` binds the message to its context: opening with any
other ``info`` fails.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as _hpke

from sealing.errors import HpkeError, InvalidKeyError
from sealing.keys import (
    KEM_MLKEM768_X25519,
    KEM_NAMES,
    KEM_X25519,
    RecipientPrivateKey,
    RecipientPublicKey,
)

__all__ = ["open_sealed", "seal", "sealed_size"]

_TAG_SIZE: Final = 16

_KEMS: Final = {
    KEM_X25519: _hpke.KEM.X25519,
    KEM_MLKEM768_X25519: _hpke.KEM.MLKEM768_X25519,
}
_SUITES: Final = {
    kem: _hpke.Suite(hpke_kem, _hpke.KDF.HKDF_SHA256, _hpke.AEAD.AES_256_GCM)
    for kem, hpke_kem in _KEMS.items()
}


def sealed_size(kem: int, plaintext_size: int) -> int:
    """The size of :func:`seal`'s output for ``plaintext_size`` bytes to a ``kem`` recipient.

    Raises:
        InvalidKeyError: unknown KEM.
    """
    if kem not in _KEMS:
        raise InvalidKeyError(f"unsupported KEM {kem}")
    return _KEMS[kem].enc_length() + plaintext_size + _TAG_SIZE


def seal(public: RecipientPublicKey, plaintext: bytes, *, info: bytes) -> bytes:
    """Encrypts ``plaintext`` to ``public`` with HPKE base mode and context ``info``.

    Returns the encapsulated key followed by the ciphertext and tag.

    Raises:
        InvalidKeyError: the public key is rejected by its KEM.
        HpkeError: encryption failed (for example a low-order X25519 point).
    """
    suite = _SUITES[public.kem]
    key = public._hpke_key()
    try:
        return suite.encrypt(plaintext, key, info=info)
    except (ValueError, TypeError) as e:
        raise HpkeError(f"HPKE sealing to {KEM_NAMES[public.kem]} key failed") from e


def open_sealed(private: RecipientPrivateKey, sealed: bytes, *, info: bytes) -> bytes:
    """Decrypts what :func:`seal` produced for ``private``'s public key with the same ``info``.

    Raises:
        HpkeError: wrong key, wrong ``info``, truncated or modified message.
        ParameterError: the private key was closed.
    """
    suite = _SUITES[private.kem]
    if len(sealed) < sealed_size(private.kem, 0):
        raise HpkeError("HPKE message is too short")
    key = private._hpke_key()
    try:
        return suite.decrypt(sealed, key, info=info)
    except InvalidTag as e:
        raise HpkeError("HPKE open failed: wrong key, wrong context or modified message") from e
    except (ValueError, TypeError) as e:
        raise HpkeError("HPKE open failed: malformed message") from e
