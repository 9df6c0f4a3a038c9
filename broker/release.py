"""Release sealing: a granted data key sealed with HPKE to the attested sidecar's ephemeral key.

The sidecar bound its ephemeral public key into the quote's qualifying data, so only the process
that made the quote can open what the broker seals here. The HPKE info
(:func:`release_info`) binds the session id, the key id and the owner party: a sealed key moved
to another session, or presented under another key id or owner, does not open.

The broker seals (:func:`seal_release`); the sidecar opens (:func:`open_release`). Data keys
never appear in logs or exception messages; the sizes and names around them may.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.custody import KekRegistry, check_data_key, encode_info, plain_data_key
from broker.errors import CustodyError
from sealing.errors import SealingError
from sealing.hpke import open_sealed, seal
from sealing.keys import RecipientPrivateKey, RecipientPublicKey

if TYPE_CHECKING:
    from broker.model import DataKeyRecord

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


@dataclass(frozen=True)
class SealedRelease:
    """One data key sealed for one session."""

    key_id: str
    owner: str
    sealed: bytes


def seal_records(
    keks: KekRegistry,
    records: Iterable[DataKeyRecord],
    ephemeral: RecipientPublicKey,
    *,
    session_id: str,
) -> tuple[SealedRelease, ...]:
    """Unwraps each record with its KEK and seals it for ``session_id``, zeroing each plain key
    as soon as it is sealed.

    Raises:
        KekError: a key's KEK is unknown or refuses to unwrap it.
        CustodyError: sealing failed.
    """
    out = []
    for record in records:
        with plain_data_key(keks.get(record.kek_ref), record) as data_key:
            sealed = seal_release(
                ephemeral,
                data_key,
                session_id=session_id,
                key_id=record.key_id,
                owner=record.owner,
            )
        out.append(SealedRelease(key_id=record.key_id, owner=record.owner, sealed=sealed))
    return tuple(out)
