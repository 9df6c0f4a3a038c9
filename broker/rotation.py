"""Changing the KEK that wraps data keys, inside the broker process.

:func:`rotate_data_key` unwraps one data key with the KEK that wraps it now, wraps it with
another (a Key Vault key replacing the local KEK, or the current version of a Key Vault key after
a rotation in the vault), checks that the new wrapping unwraps to the same key, and stores it.
The plain key exists only in broker memory, in a buffer zeroed afterwards. Each rotation, done or
refused, is written to the audit log.

:func:`rotate_kek` does the same for every data key wrapped by one KEK ref.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from broker.custody import plain_data_key
from broker.errors import BrokerError, KekError
from broker.model import AuditEntry, DataKeyRecord
from broker.service import Broker
from pki.identity import SpiffeId

__all__ = ["ROTATION_ACTION", "rotate_data_key", "rotate_kek"]

#: The audit action of a rewrap.
ROTATION_ACTION = "key.rewrap"


def _audit(
    broker: Broker,
    actor: SpiffeId | str,
    record: DataKeyRecord | None,
    key_id: str,
    decision: str,
    reason: str,
) -> None:
    broker.audit.append(
        AuditEntry(
            actor=str(actor),
            action=ROTATION_ACTION,
            subject=key_id,
            decision=decision,
            reason=reason,
            parties=(record.owner,) if record is not None else (),
        )
    )


def rotate_data_key(
    broker: Broker, key_id: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
) -> DataKeyRecord:
    """Rewraps data key ``key_id`` under the KEK ``new_kek_ref`` and stores the new wrapping.

    ``new_kek_ref`` may equal the current ref: a Key Vault ref without a version then moves the
    key to the key's current version.

    Raises:
        UnknownPolicyObjectError: no such data key.
        KekError: the old KEK cannot unwrap it, the new KEK cannot wrap it, or the new wrapping
            does not unwrap to the same key (nothing is stored then).
        StorageError: the database failed.
    """
    record: DataKeyRecord | None = None
    try:
        record = broker.store.get_data_key(key_id)
        old = broker.keks.get(record.kek_ref)
        new = broker.keks.get(new_kek_ref)
        with plain_data_key(old, record) as data_key:
            wrapped = new.wrap(data_key, key_id=record.key_id, owner=record.owner)
            back = bytearray(new.unwrap(wrapped, key_id=record.key_id, owner=record.owner))
            try:
                if not hmac.compare_digest(bytes(back), bytes(data_key)):
                    raise KekError(f"the new wrapping of {key_id!r} unwraps to another key")
            finally:
                back[:] = bytes(len(back))
        broker.store.rewrap_data_key(key_id, wrapped, new.ref)
    except BrokerError as e:
        _audit(broker, actor, record, key_id, "deny", f"rewrap to {new_kek_ref} failed: {e}")
        raise
    _audit(broker, actor, record, key_id, "allow", f"rewrapped from {record.kek_ref} to {new.ref}")
    return replace(record, wrapped_key=wrapped, kek_ref=new.ref)


def rotate_kek(
    broker: Broker, old_kek_ref: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
) -> list[DataKeyRecord]:
    """Rewraps every data key wrapped by ``old_kek_ref`` under ``new_kek_ref``.

    Stops at the first failure; keys rewrapped before it stay rewrapped (each rewrap is
    complete on its own), so running it again finishes the job.

    Raises:
        KekError, StorageError: as :func:`rotate_data_key`.
    """
    done = []
    for record in broker.store.list_data_keys():
        if record.kek_ref == old_kek_ref:
            done.append(rotate_data_key(broker, record.key_id, new_kek_ref, actor=actor))
    return done
