"""The byte layouts a data key travels in: sealed by a party to the broker's registration key,
and sealed by the broker to an attested sidecar's ephemeral key.

This module is the one home of both layouts and their HPKE context strings, so that each side of
an exchange (the party's client and the broker; the broker and the sidecar in the TEE) uses the
same definition. It holds no key material of its own and does no file I/O: the broker's KEKs and
registration key file live in :mod:`broker.custody`, which the sidecar never imports.

Registration: the HPKE info (:func:`registration_info`) binds the key id and the owner, so a
sealed key replayed under another id or by another party does not open.

Release: the sidecar bound its ephemeral public key into the quote's qualifying data, so only
the process that made the quote can open what the broker seals. The HPKE info
(:func:`release_info`) binds the session id, the key id and the owner party: a sealed key moved
to another session, or presented under another key id or owner, does not open.

Data keys never appear in logs or exception messages; the sizes and names around them may.
"""

from __future__ import annotations

import struct

from broker.errors import CustodyError
from sealing.errors import SealingError
from sealing.hpke import open_sealed, seal
from sealing.keys import RecipientPrivateKey, RecipientPublicKey

#: Every data key in the clean room is an AES-256 key.
DATA_KEY_SIZE = 32

REGISTRATION_LABEL = b"cleanroom/v1 register-data-key"


def encode_info(label: bytes, *fields: str) -> bytes:
    """``label || 0x00 || (u32 len || utf-8 field)*``: an unambiguous context string.

    The label separates uses; the length prefixes make ("ab", "c") and ("a", "bc") differ.

    Raises:
        CustodyError: a field is empty.
    """
    out = [label, b"\x00"]
    for field in fields:
        raw = field.encode("utf-8")
        if not raw:
            raise CustodyError(f"{label.decode()}: empty field in the context string")
        out.append(struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


def check_data_key(data_key: bytes | bytearray) -> None:
    """Raises:
    CustodyError: ``data_key`` is not 32 bytes (the size only is reported, never the key).
    """
    if len(data_key) != DATA_KEY_SIZE:
        raise CustodyError(f"a data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")


def zero(buffer: bytearray) -> None:
    """Overwrites ``buffer`` with zeros in place (best effort; see the module docstring)."""
    buffer[:] = bytes(len(buffer))


# --- registration ---------------------------------------------------------------------------


def registration_info(key_id: str, owner: str) -> bytes:
    """The HPKE info for a data key sealed to the broker's registration key.

    ``"cleanroom/v1 register-data-key" || 0x00 || u32 len || key_id || u32 len || owner``.

    Raises:
        CustodyError: the key id or owner is empty.
    """
    return encode_info(REGISTRATION_LABEL, key_id, owner)


def seal_for_registration(
    broker_public: RecipientPublicKey,
    data_key: bytes | bytearray,
    *,
    key_id: str,
    owner: str,
) -> bytes:
    """The party side: seals a data key to the broker's registration key for RegisterDataKey.

    Raises:
        CustodyError: the data key is not 32 bytes, the key id or owner is empty, or sealing
            failed.
    """
    check_data_key(data_key)
    info = registration_info(key_id, owner)
    try:
        return seal(broker_public, bytes(data_key), info=info)
    except SealingError as e:
        raise CustodyError(f"cannot seal data key {key_id!r} for registration: {e}") from e


def open_registered_key(
    private: RecipientPrivateKey, sealed: bytes, *, key_id: str, owner: str
) -> bytes:
    """The broker side: opens a data key a party sealed with :func:`seal_for_registration`.

    Raises:
        CustodyError: it does not open (another broker key, key id or owner, or altered), or
            what it holds is not a 32-byte key.
    """
    info = registration_info(key_id, owner)
    try:
        data_key = open_sealed(private, sealed, info=info)
    except SealingError as e:
        raise CustodyError(
            f"sealed data key {key_id!r} of {owner!r} does not open: it was sealed to another "
            "broker key or for another key id or owner, or it was altered"
        ) from e
    check_data_key(data_key)
    return data_key


# --- release --------------------------------------------------------------------------------


RELEASE_LABEL = b"cleanroom/v1 release"


def release_info(*, session_id: str, key_id: str, owner: str) -> bytes:
    """The HPKE info of a released key.

    ``"cleanroom/v1 release" || 0x00 || (u32 len || utf-8)`` of session id, key id and owner.

    Raises:
        CustodyError: a field is empty.
    """
    return encode_info(RELEASE_LABEL, session_id, key_id, owner)


def seal_release(
    ephemeral: RecipientPublicKey,
    data_key: bytes | bytearray,
    *,
    session_id: str,
    key_id: str,
    owner: str,
) -> bytes:
    """Seals a plain data key to the sidecar's ephemeral key (HPKE ``enc || ciphertext``).

    The caller owns ``data_key`` and should zero it afterwards when it is a ``bytearray``
    (:func:`seal_records` does).

    Raises:
        CustodyError: the data key is not 32 bytes, a field is empty, or sealing failed.
    """
    check_data_key(data_key)
    info = release_info(session_id=session_id, key_id=key_id, owner=owner)
    try:
        return seal(ephemeral, bytes(data_key), info=info)
    except SealingError as e:
        raise CustodyError(f"cannot seal data key {key_id!r} for session {session_id}: {e}") from e


def open_release(
    ephemeral_private: RecipientPrivateKey,
    sealed: bytes,
    *,
    session_id: str,
    key_id: str,
    owner: str,
) -> bytes:
    """The sidecar side: opens a key sealed by :func:`seal_release` with the ephemeral key.

    Raises:
        CustodyError: it does not open (another ephemeral key, session, key id or owner, or
            altered), or what it holds is not a 32-byte key.
    """
    info = release_info(session_id=session_id, key_id=key_id, owner=owner)
    try:
        data_key = open_sealed(ephemeral_private, sealed, info=info)
    except SealingError as e:
        raise CustodyError(
            f"released key {key_id!r} of {owner!r} does not open for session {session_id}: "
            "sealed to another key or for another session, key id or owner, or altered"
        ) from e
    check_data_key(data_key)
    return data_key
