"""Choosing and changing the KEKs that wrap data keys, inside the broker process.

The work is :class:`broker.core.custody.KeyCustody`'s; these functions take the whole broker
and call its custody use case, for in-process tools and tests that hold a
:class:`~broker.core.compose.Broker`:

* :func:`rotate_data_key` rewraps one data key under another KEK (checked by unwrapping the new
  wrapping), :func:`rotate_kek` every data key of one KEK ref;
* :func:`set_party_kek` records a KEK for a party's new data keys after :func:`check_kek` proved
  that the broker can wrap and unwrap with it; :func:`party_keks` says which KEK each party's
  new keys get and why.

Each rotation, check and choice, done or refused, is written to the audit log.
"""

from __future__ import annotations

from broker.core.compose import Broker
from broker.core.custody import (
    KEK_CHECK_ACTION,
    PARTY_KEK_ACTION,
    ROTATION_ACTION,
    PartyKekChoice,
)
from broker.model import DataKeyRecord, PartyKek
from pki.identity import SpiffeId

__all__ = [
    "KEK_CHECK_ACTION",
    "PARTY_KEK_ACTION",
    "ROTATION_ACTION",
    "PartyKekChoice",
    "check_kek",
    "current_kek_ref",
    "party_keks",
    "rotate_data_key",
    "rotate_kek",
    "set_party_kek",
]


def current_kek_ref(broker: Broker, key_id: str) -> str:
    """The ref of the KEK that wraps data key ``key_id`` now.

    Raises:
        UnknownPolicyObjectError: no data key has that id.
    """
    return broker.custody.current_kek_ref(key_id)


def rotate_data_key(
    broker: Broker, key_id: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
) -> DataKeyRecord:
    """Rewraps data key ``key_id`` under the KEK ``new_kek_ref`` and stores the new wrapping
    (:meth:`broker.core.custody.KeyCustody.rotate_data_key`).

    Raises:
        UnknownPolicyObjectError: no such data key.
        KekError: the old KEK cannot unwrap it, the new KEK cannot wrap it, or the new wrapping
            does not unwrap to the same key (nothing is stored then).
        StorageError: the database failed.
    """
    return broker.custody.rotate_data_key(key_id, new_kek_ref, actor=actor)


def rotate_kek(
    broker: Broker, old_kek_ref: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
) -> list[DataKeyRecord]:
    """Rewraps every data key wrapped by ``old_kek_ref`` under ``new_kek_ref``
    (:meth:`broker.core.custody.KeyCustody.rotate_kek`).

    Raises:
        KekError, StorageError: as :func:`rotate_data_key`.
    """
    return broker.custody.rotate_kek(old_kek_ref, new_kek_ref, actor=actor)


def check_kek(broker: Broker, kek_ref: str, *, actor: SpiffeId | str = "broker") -> str:
    """Proves that the broker can wrap and unwrap with ``kek_ref``; audited either way
    (:meth:`broker.core.custody.KeyCustody.check_kek`).

    Raises:
        KekError: the ref is malformed or unserved, or the KEK cannot wrap or unwrap.
    """
    return broker.custody.check_kek(kek_ref, actor=actor)


def set_party_kek(
    broker: Broker, party: str, kek_ref: str, *, actor: SpiffeId | str = "broker"
) -> PartyKek:
    """Records ``kek_ref`` as the KEK of ``party``'s new data keys after checking it
    (:meth:`broker.core.custody.KeyCustody.set_party_kek`).

    Raises:
        UnknownPolicyObjectError: no such party.
        KekError: the KEK is unusable; nothing is recorded then.
        StorageError: the database failed.
    """
    return broker.custody.set_party_kek(party, kek_ref, actor=actor)


def party_keks(broker: Broker) -> list[PartyKekChoice]:
    """The KEK of every party's new data keys, by party.

    Raises:
        StorageError: the database failed.
    """
    return broker.custody.party_keks()
