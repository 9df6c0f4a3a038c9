"""Policy administration: golden PCR sets, parties, data keys, workload approvals and their
revocation, and the audit log's reading and verification.

The gRPC layer checks roles; what depends on the data is enforced here: a party acts only on its
own keys, approvals and records, and lists only its own keys and approvals. Every decision is
recorded with its exact reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace

from broker import policy
from broker.audit import ChainReport
from broker.config import BrokerConfig
from broker.core.custody import KeyCustody
from broker.core.trail import AuditTrail, Clock, entry, quoted_pcrs, utcnow
from broker.errors import BrokerError, PolicyError
from broker.keyseal import open_registered_key
from broker.model import (
    AkRecord,
    Approval,
    AuditRecord,
    DataKeyRecord,
    EkRecord,
    GoldenPcrSet,
    Party,
)
from broker.storage import Store
from evidence.launch import Launch
from evidence.manifest import ManifestEntry
from pki.identity import SpiffeId
from sealing.keys import RecipientPrivateKey, RecipientPublicKey


def _require_party(actor: SpiffeId) -> str:
    if actor.kind != "party":
        raise PolicyError(f"{actor} is not a party")
    return actor.name


class PolicyAdministration:
    """What the operator and the parties administer, and what they may read.

    Its collaborators: the store, the audit trail, the clock, the registration key (to open the
    data keys parties register), key custody (which KEK wraps them) and the PCRs every quote
    covers (``boot_pcrs`` of the configuration).
    """

    def __init__(
        self,
        *,
        store: Store,
        trail: AuditTrail,
        custody: KeyCustody,
        registration_key: RecipientPrivateKey,
        config: BrokerConfig,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._trail = trail
        self._custody = custody
        self._registration_key = registration_key
        self._clock = clock
        self._quoted = quoted_pcrs(config.boot_pcrs)

    def registration_public_key(self) -> RecipientPublicKey:
        """The public half of the key parties seal their data keys to."""
        return self._registration_key.public_key()

    def set_golden_set(self, actor: SpiffeId, golden: GoldenPcrSet) -> GoldenPcrSet:
        """Creates or replaces a golden PCR set; a refusal is recorded with its reason.

        Raises:
            PolicyError: the set is invalid (see :func:`broker.policy.validate_golden_set`).
            UncoveredPcrError: the set names a PCR that no quote is sure to cover.
            StorageError: the database failed.
        """
        with self._trail.refusal_recorded(actor, "golden.set", golden.name):
            policy.validate_golden_set(golden, quoted_pcrs=self._quoted)
        golden = replace(golden, updated_at=self._clock())
        with self._trail.allowed_change(
            self._store.unit_of_work("set golden set"),
            actor,
            "golden.set",
            golden.name,
            f"{sum(len(v) for v in golden.accepted.values())} accepted values",
        ) as uow:
            self._store.put_golden_set(golden, uow=uow)
        return golden

    def delete_golden_set(self, actor: SpiffeId, name: str) -> None:
        """Deletes a golden PCR set; a refusal is recorded with its reason.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        with (
            self._trail.refusal_recorded(actor, "golden.delete", name),
            self._trail.allowed_change(
                self._store.unit_of_work("delete golden set"), actor, "golden.delete", name
            ) as uow,
        ):
            self._store.delete_golden_set(name, uow=uow)

    def add_party(self, actor: SpiffeId, party: Party) -> Party:
        """Registers a party and its recipient key; a refusal is recorded with its reason.

        The refusal is the operator's record only: a party of that name does not exist (or is
        another one), so no party's view should gain it.

        Raises:
            InvalidKeyError: the recipient key is not a valid key of its KEM.
            DuplicateError: a party of this name exists.
            StorageError: the database failed.
        """
        with self._trail.refusal_recorded(actor, "party.add", party.name):
            RecipientPublicKey(kem=party.kem, raw=party.public_key)  # validates the key
            with self._trail.allowed_change(
                self._store.unit_of_work("add party"),
                actor,
                "party.add",
                party.name,
                parties=(party.name,),
            ) as uow:
                self._store.add_party(party, uow=uow)
        return party

    def register_data_key(
        self, actor: SpiffeId, *, key_id: str, sealed_data_key: bytes, description: str
    ) -> DataKeyRecord:
        """A party registers a data key sealed to the broker's registration key. It is stored
        wrapped by the party's KEK (:meth:`kek_ref_for_party`).

        Raises:
            PolicyError: the caller is not a registered party.
            CustodyError: the sealed key does not open (wrong key id, owner or broker key).
        """
        owner = _require_party(actor)
        try:
            self._store.get_party(owner)
            data_key = open_registered_key(
                self._registration_key, sealed_data_key, key_id=key_id, owner=owner
            )
            kek = self._custody.kek_for_party(owner)
            wrapped = kek.wrap(data_key, key_id=key_id, owner=owner)
        except BrokerError as e:
            self._trail.record(actor, "key.register", key_id, "deny", str(e), parties=(owner,))
            raise
        record = DataKeyRecord(
            key_id=key_id,
            owner=owner,
            wrapped_key=wrapped,
            kek_ref=kek.ref,
            created_at=self._clock(),
            description=description,
        )
        with self._trail.allowed_change(
            self._store.unit_of_work("register data key"),
            actor,
            "key.register",
            key_id,
            f"wrapped by {kek.ref}",
            parties=(owner,),
        ) as uow:
            self._store.add_data_key(record, uow=uow)
        return record

    def approve_workload(
        self,
        actor: SpiffeId,
        *,
        workload_name: str,
        manifest: Sequence[ManifestEntry],
        key_ids: Sequence[str],
        output_recipients: Sequence[str],
        golden_set: str | None,
        require_snp: bool = False,
        launch: Launch | None = None,
    ) -> Approval:
        """A party approves a measured workload (files and launch) for some of its own keys;
        with ``require_snp``, only for an attester that presents verified SEV-SNP evidence.

        Raises:
            PolicyError: not a party, no launch, a key of another party, unknown recipient or
                golden set.
            UncoveredPcrError: the golden set names a PCR that no quote is sure to cover.
        """
        owner = _require_party(actor)
        banks = sorted({b for e in manifest for b in e.digests})
        approval = Approval(
            approval_id=uuid.uuid4().hex,
            party=owner,
            workload_name=workload_name,
            manifest=tuple(manifest),
            launch=launch,
            expected_pcrs=policy.approval_pcr23(manifest, banks, launch),
            key_ids=tuple(key_ids),
            output_recipients=tuple(output_recipients),
            golden_set=golden_set or None,
            created_at=self._clock(),
            require_snp=require_snp,
        )
        try:
            policy.validate_approval(
                approval,
                keys={k: self._store.get_data_key(k) for k in key_ids},
                parties={p: self._store.get_party(p) for p in output_recipients},
                golden_sets={golden_set: self._store.get_golden_set(golden_set)}
                if golden_set
                else {},
                quoted_pcrs=self._quoted,
            )
        except BrokerError as e:
            self._trail.record(
                actor, "workload.approve", workload_name, "deny", str(e), parties=(owner,)
            )
            raise
        with self._trail.allowed_change(
            self._store.unit_of_work("approve workload"),
            actor,
            "workload.approve",
            approval.approval_id,
            f"workload {workload_name!r} for keys {', '.join(key_ids)}"
            + ("; requires AMD SEV-SNP evidence" if require_snp else ""),
            parties=(owner, *output_recipients),
        ) as uow:
            self._store.add_approval(approval, uow=uow)
        return approval

    def revoke_approval(self, actor: SpiffeId, approval_id: str) -> None:
        """Revokes an approval: a party its own, the operator any. Refusals are recorded.

        Raises:
            UnknownPolicyObjectError: no such approval.
            PolicyError: the approval belongs to another party.
            StorageError: the database failed.
        """
        caller = (actor.name,) if actor.kind == "party" else ()
        with self._trail.refusal_recorded(actor, "workload.revoke", approval_id, parties=caller):
            approval = self._store.get_approval(approval_id)
        if actor.kind == "party" and approval.party != actor.name:
            reason = "approval belongs to another party"
            # Two records in one transaction. The caller's is tagged with the caller only: a
            # record's parties are visible to everyone it is tagged with, so tagging the owner
            # there would tell the caller whose approval it probed. The owner gets a record of
            # its own, because an attempt on its approval is a security event about its own
            # object, and the actor it names is the party that made it.
            entries = [
                entry(actor, "workload.revoke", approval_id, "deny", reason, parties=tagged)
                for tagged in ((actor.name,), (approval.party,))
            ]
            self._trail.log.append_many(entries)
            raise PolicyError(reason)
        with self._trail.allowed_change(
            self._store.unit_of_work("revoke approval"),
            actor,
            "workload.revoke",
            approval_id,
            parties=(approval.party,),
        ) as uow:
            self._store.revoke_approval(approval_id, uow=uow)

    def audit_records(self, actor: SpiffeId, *, after: int, limit: int) -> list[AuditRecord]:
        party = actor.name if actor.kind == "party" else None
        return self._trail.log.list_records(after_sequence=after, limit=limit, party=party)

    # --- reading (for the admin service) ----------------------------------------------------
    # The gRPC layer checks roles; what a party may see of the data is decided here: a party
    # lists only its own keys and approvals, the operator everything.

    def list_eks(self) -> list[EkRecord]:
        """Raises: StorageError."""
        return self._store.list_eks()

    def list_aks(self) -> list[AkRecord]:
        """Raises: StorageError."""
        return self._store.list_aks()

    def list_golden_sets(self) -> list[GoldenPcrSet]:
        """Raises: StorageError."""
        return self._store.list_golden_sets()

    def list_parties(self) -> list[Party]:
        """Raises: StorageError."""
        return self._store.list_parties()

    def list_data_keys(self, actor: SpiffeId) -> list[DataKeyRecord]:
        """A party's own keys, or every key for the operator. Raises: StorageError."""
        return self._store.list_data_keys(owner=actor.name if actor.kind == "party" else None)

    def list_approvals(self, actor: SpiffeId) -> list[Approval]:
        """A party's own approvals, or every approval for the operator. Raises: StorageError."""
        return self._store.list_approvals(party=actor.name if actor.kind == "party" else None)

    def verify_audit_log(self, actor: SpiffeId) -> ChainReport:
        """Recomputes the audit chain; the check itself is recorded too.

        Raises:
            StorageError: the database failed.
        """
        report = self._trail.log.verify_chain()
        self._trail.record(
            actor,
            "audit.verify",
            "",
            "allow" if report.valid else "deny",
            f"{report.records_checked} records checked"
            + (
                "" if report.valid else f"; broken at {report.first_bad_sequence}: {report.problem}"
            ),
        )
        return report


__all__ = ["PolicyAdministration"]
