"""Key custody and rotation: which KEK wraps a party's data keys, and changing it.

:meth:`KeyCustody.rotate_data_key` unwraps one data key with the KEK that wraps it now, wraps
it with another (a Key Vault key replacing the local KEK, or the current version of a Key Vault
key after a rotation in the vault), checks that the new wrapping unwraps to the same key, and
stores it. The plain key exists only in broker memory, in a buffer zeroed afterwards. Each
rotation, done or refused, is written to the audit log. :meth:`KeyCustody.rotate_kek` does the
same for every data key wrapped by one KEK ref.

:meth:`KeyCustody.set_party_kek` records a KEK (typically a party's own Key Vault key) for a
party's new data keys, after :meth:`KeyCustody.check_kek` proved that the broker can wrap and
unwrap with it; :meth:`KeyCustody.party_keks` says which KEK each party's new keys get and why.

:class:`LocalKekRotator` replaces the local KEK under every data key it wraps, in one unit of
work with the database's record of its fingerprint and the audit record: it is what
``cleanroom broker kek rotate`` (:mod:`broker.kek_rotate`, which handles the key files, with the
broker stopped) decides.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from broker.config import BrokerConfig
from broker.core.trail import AuditTrail, Clock, entry, utcnow
from broker.custody import LOCAL_KEK_REF, Kek, KekRegistry, LocalKek, plain_data_key
from broker.custody import check_kek as _check_kek
from broker.errors import BrokerError, KekError
from broker.model import AuditEntry, DataKeyRecord, PartyKek
from broker.storage import Store
from pki.identity import SpiffeId

#: The audit action of a rewrap.
ROTATION_ACTION = "key.rewrap"
#: The audit action of recording a party's KEK.
PARTY_KEK_ACTION = "party.kek"
#: The audit action of an operator's check of a KEK.
KEK_CHECK_ACTION = "kek.check"
#: The audit action of a local KEK rotation.
KEK_ROTATE_ACTION = "kek.rotate"
#: The audit action of ``cleanroom broker init`` recording a KEK's first fingerprint.
KEK_FINGERPRINT_ACTION = "kek.fingerprint"


@dataclass(frozen=True)
class PartyKekChoice:
    """Which KEK a party's new data keys get, and why."""

    party: str
    kek_ref: str
    #: ``"imported"`` (:meth:`KeyCustody.set_party_kek`), ``"config"`` (``party_keks``) or
    #: ``"default"``.
    source: str
    #: For an imported KEK: what its check found, and when it was recorded.
    checked_key: str = ""
    updated_at: datetime | None = None


def _rewrap_entry(
    actor: SpiffeId | str,
    record: DataKeyRecord | None,
    key_id: str,
    decision: str,
    reason: str,
) -> AuditEntry:
    return entry(
        actor,
        ROTATION_ACTION,
        key_id,
        decision,
        reason,
        parties=(record.owner,) if record is not None else (),
    )


class KeyCustody:
    """The KEKs of data keys: choosing them, checking them, rewrapping under them.

    Its collaborators: the store, the audit trail, the KEK registry, the clock, and the KEK
    settings of the configuration (``default_kek``, ``party_keks``).
    """

    def __init__(
        self,
        *,
        store: Store,
        trail: AuditTrail,
        keks: KekRegistry,
        config: BrokerConfig,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._trail = trail
        self._keks = keks
        self._config = config
        self._clock = clock

    @property
    def default_kek_ref(self) -> str:
        """The KEK of new data keys when neither an imported nor a configured one applies."""
        return self._config.default_kek

    def kek_ref_for_party(self, party: str) -> str:
        """The KEK that wraps ``party``'s new data keys: the one the operator imported for it
        (:meth:`set_party_kek`), else the configuration's ``party_keks`` entry, else
        ``default_kek``.

        Raises:
            StorageError: the database failed.
        """
        imported = self._store.get_party_kek(party)
        if imported is not None:
            return imported.kek_ref
        return self._config.kek_for_party(party)

    def kek_for_party(self, party: str) -> Kek:
        """The KEK that wraps ``party``'s new data keys (:meth:`kek_ref_for_party`).

        Raises:
            KekError: the ref is malformed or no KEK serves it.
            StorageError: the database failed.
        """
        return self._keks.get(self.kek_ref_for_party(party))

    def current_kek_ref(self, key_id: str) -> str:
        """The ref of the KEK that wraps data key ``key_id`` now.

        Raises:
            UnknownPolicyObjectError: no data key has that id.
        """
        return self._store.get_data_key(key_id).kek_ref

    def check_default_kek(self) -> str:
        """Proves that the default KEK wraps and unwraps (unaudited: readiness probes call it).

        Raises:
            KekError: it cannot.
        """
        return _check_kek(self._keks.get(self._config.default_kek))

    def rotate_data_key(
        self, key_id: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
    ) -> DataKeyRecord:
        """Rewraps data key ``key_id`` under the KEK ``new_kek_ref`` and stores the new wrapping.

        ``new_kek_ref`` may equal the current ref: a Key Vault ref without a version then moves
        the key to the key's current version.

        Raises:
            UnknownPolicyObjectError: no such data key.
            KekError: the old KEK cannot unwrap it, the new KEK cannot wrap it, or the new
                wrapping does not unwrap to the same key (nothing is stored then).
            StorageError: the database failed.
        """
        record: DataKeyRecord | None = None
        try:
            record = self._store.get_data_key(key_id)
            old = self._keks.get(record.kek_ref)
            new = self._keks.get(new_kek_ref)
            with plain_data_key(old, record) as data_key:
                wrapped = new.wrap(data_key, key_id=record.key_id, owner=record.owner)
                back = bytearray(new.unwrap(wrapped, key_id=record.key_id, owner=record.owner))
                try:
                    if not hmac.compare_digest(bytes(back), bytes(data_key)):
                        raise KekError(f"the new wrapping of {key_id!r} unwraps to another key")
                finally:
                    back[:] = bytes(len(back))
            # The new wrapping and its record commit together (one unit of work).
            with self._store.unit_of_work("rewrap data key") as uow:
                self._store.rewrap_data_key(key_id, wrapped, new.ref, uow=uow)
                self._trail.log.append_in(
                    uow,
                    [
                        _rewrap_entry(
                            actor,
                            record,
                            key_id,
                            "allow",
                            f"rewrapped from {record.kek_ref} to {new.ref}",
                        )
                    ],
                )
        except BrokerError as e:
            self._trail.log.append(
                _rewrap_entry(actor, record, key_id, "deny", f"rewrap to {new_kek_ref} failed: {e}")
            )
            raise
        return replace(record, wrapped_key=wrapped, kek_ref=new.ref)

    def rotate_kek(
        self, old_kek_ref: str, new_kek_ref: str, *, actor: SpiffeId | str = "broker"
    ) -> list[DataKeyRecord]:
        """Rewraps every data key wrapped by ``old_kek_ref`` under ``new_kek_ref``.

        Stops at the first failure; keys rewrapped before it stay rewrapped (each rewrap is
        complete on its own), so running it again finishes the job.

        Raises:
            KekError, StorageError: as :meth:`rotate_data_key`.
        """
        done = []
        for record in self._store.list_data_keys():
            if record.kek_ref == old_kek_ref:
                done.append(self.rotate_data_key(record.key_id, new_kek_ref, actor=actor))
        return done

    def check_kek(self, kek_ref: str, *, actor: SpiffeId | str = "broker") -> str:
        """Proves that the broker can wrap and unwrap with ``kek_ref`` (a random key's round
        trip; for Key Vault: read the key, wrap, unwrap through Key Vault). Audited either way.

        Returns:
            What is in use: the versioned Key Vault key id, or the ref of a local KEK.

        Raises:
            KekError: the ref is malformed or unserved, or the KEK cannot wrap or unwrap (for
                Key Vault the message starts with the reason: ``key not found``, ...).
        """
        try:
            checked = _check_kek(self._keks.get(kek_ref))
        except BrokerError as e:
            self._trail.record(actor, KEK_CHECK_ACTION, kek_ref, "deny", str(e))
            raise
        self._trail.record(
            actor, KEK_CHECK_ACTION, kek_ref, "allow", f"wraps and unwraps: {checked}"
        )
        return checked

    def set_party_kek(
        self, party: str, kek_ref: str, *, actor: SpiffeId | str = "broker"
    ) -> PartyKek:
        """Records ``kek_ref`` as the KEK of ``party``'s new data keys, after checking that the
        broker can use it (:meth:`check_kek`). It takes precedence over the configuration; keys
        registered before keep their wrapping (rewrap them with :meth:`rotate_data_key`).

        Raises:
            UnknownPolicyObjectError: no such party.
            KekError: the ref is malformed or unserved, or the KEK cannot wrap or unwrap;
                nothing is recorded then.
            StorageError: the database failed.
        """
        try:
            self._store.get_party(party)
            kek = self._keks.get(kek_ref)
            checked = _check_kek(kek)
            record = PartyKek(
                party=party, kek_ref=kek.ref, checked_key=checked, updated_at=self._clock()
            )
            # The party's KEK and its record commit together (one unit of work).
            with self._store.unit_of_work("set party KEK") as uow:
                self._store.set_party_kek(
                    party,
                    record.kek_ref,
                    checked_key=checked,
                    updated_at=record.updated_at,
                    uow=uow,
                )
                self._trail.record_in(
                    uow,
                    actor,
                    PARTY_KEK_ACTION,
                    party,
                    "allow",
                    f"new data keys wrapped by {record.kek_ref} (checked: {checked})",
                    parties=(party,),
                )
        except BrokerError as e:
            self._trail.record(
                actor,
                PARTY_KEK_ACTION,
                party,
                "deny",
                f"KEK {kek_ref} refused: {e}",
                parties=(party,),
            )
            raise
        return record

    def party_keks(self) -> list[PartyKekChoice]:
        """The KEK of every party's new data keys, by party.

        Raises:
            StorageError: the database failed.
        """
        imported = {k.party: k for k in self._store.list_party_keks()}
        out: list[PartyKekChoice] = []
        for party in self._store.list_parties():
            record = imported.get(party.name)
            if record is not None:
                out.append(
                    PartyKekChoice(
                        party=party.name,
                        kek_ref=record.kek_ref,
                        source="imported",
                        checked_key=record.checked_key,
                        updated_at=record.updated_at,
                    )
                )
            elif party.name in self._config.party_keks:
                out.append(
                    PartyKekChoice(party.name, self._config.party_keks[party.name], "config")
                )
            else:
                out.append(PartyKekChoice(party.name, self._config.default_kek, "default"))
        return out


class LocalKekRotator:
    """Rewrapping every locally wrapped data key from one local KEK to the next.

    Its collaborators: the store, the audit trail and the clock (no KEK registry: the broker is
    stopped, and the caller holds both key files open).
    """

    def __init__(self, *, store: Store, trail: AuditTrail, clock: Clock = utcnow) -> None:
        self._store = store
        self._trail = trail
        self._clock = clock

    def rewrap_all(self, old: LocalKek, new: LocalKek, *, actor: str) -> int:
        """Rewraps every data key wrapped by the local KEK from ``old`` to ``new`` and records
        ``new``'s fingerprint, with the audit record (``kek.rotate``), in one unit of work.
        Returns the number of keys.

        Raises:
            KekError: a key does not unwrap with ``old``, or its new wrapping does not unwrap
                (nothing committed).
            StorageError: the database failed (nothing committed).
        """
        store = self._store
        records = [r for r in store.list_data_keys() if r.kek_ref == LOCAL_KEK_REF]
        with store.unit_of_work("rotate the local KEK") as uow:
            for record in records:
                with plain_data_key(old, record) as key:
                    wrapped = new.wrap(key, key_id=record.key_id, owner=record.owner)
                    # Nothing is stored under a wrapping that does not give the key back.
                    if not hmac.compare_digest(
                        new.unwrap(wrapped, key_id=record.key_id, owner=record.owner), key
                    ):
                        raise KekError(f"the new KEK did not round-trip data key {record.key_id}")
                store.rewrap_data_key(record.key_id, wrapped, LOCAL_KEK_REF, uow=uow)
            # The store records a KEK's first fingerprint and keeps it (init must never replace
            # it); a rotation is the one change of it, made here in the rotation's unit.
            store.replace_kek_fingerprint(LOCAL_KEK_REF, new.fingerprint, at=self._clock(), uow=uow)
            self._trail.log.append_in(
                uow,
                [
                    AuditEntry(
                        actor=actor,
                        action=KEK_ROTATE_ACTION,
                        subject=LOCAL_KEK_REF,
                        decision="allow",
                        reason=(
                            f"local KEK {old.fingerprint} replaced by {new.fingerprint}; "
                            f"{len(records)} data key(s) rewrapped"
                        ),
                    )
                ],
            )
        return len(records)


class KekFingerprintRecorder:
    """Recording the fingerprint of each KEK the broker's state uses (``cleanroom broker
    init``), each first recording with its audit record (``kek.fingerprint``).

    Its collaborators: the store, the audit trail and the clock (the broker is not running).
    """

    def __init__(self, *, store: Store, trail: AuditTrail, clock: Clock = utcnow) -> None:
        self._store = store
        self._trail = trail
        self._clock = clock

    def record(
        self, fingerprints: Mapping[str, str], *, known: Mapping[str, str], actor: str
    ) -> dict[str, str]:
        """Records each KEK ref's fingerprint of ``fingerprints`` unless one is recorded
        already, in one unit of work with an audit record for each ref recorded now (not in
        ``known``, the fingerprints the database recorded before). Returns the fingerprint
        recorded for each ref, which the caller compares with ``fingerprints``: a recorded
        fingerprint is never replaced here.

        Raises:
            StorageError, AuditChainError: the database failed (nothing committed).
        """
        store = self._store
        now = self._clock()
        kept: dict[str, str] = {}
        with store.unit_of_work("record KEK fingerprints") as uow:
            entries = []
            for ref, fingerprint in fingerprints.items():
                kept[ref] = store.record_kek_fingerprint(ref, fingerprint, at=now, uow=uow)
                if kept[ref] == fingerprint and ref not in known:
                    entries.append(
                        AuditEntry(
                            actor=actor,
                            action=KEK_FINGERPRINT_ACTION,
                            subject=ref,
                            decision="allow",
                            reason=f"recorded {fingerprint}",
                        )
                    )
            self._trail.log.append_in(uow, entries)
        return kept


__all__ = [
    "KEK_CHECK_ACTION",
    "KEK_FINGERPRINT_ACTION",
    "KEK_ROTATE_ACTION",
    "PARTY_KEK_ACTION",
    "ROTATION_ACTION",
    "KekFingerprintRecorder",
    "KeyCustody",
    "LocalKekRotator",
    "PartyKekChoice",
]
