"""Release sealing: granted data keys unwrapped with their KEK and sealed with HPKE to the
attested sidecar's ephemeral key.

The layout of one sealed release (:func:`release_info`, :func:`seal_release`,
:func:`open_release`) lives in :mod:`broker.keyseal`, the module the sidecar imports; this
module adds the broker's side that needs the KEKs (:func:`seal_records`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.custody import KekRegistry, plain_data_key
from broker.keyseal import seal_release
from sealing.keys import RecipientPublicKey

if TYPE_CHECKING:
    from broker.model import DataKeyRecord


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
