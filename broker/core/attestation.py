"""Attestation: challenges, evidence verification, policy and key release, and session end.

A sidecar asks for a challenge (a single-use nonce bound to its AK), presents a quote over it
with its event log and an ephemeral key, and receives the data keys that the parties' approvals
grant, each sealed to that key. The nonce is burned, and the verdict recorded, in one unit of
work; the caller of a denied release learns only coarse codes and the audit records that hold
the exact reasons.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NoReturn

from broker import policy, quote, release, tpmkeys
from broker.azure_snp import SnpGate
from broker.config import BrokerConfig
from broker.core.trail import AuditTrail, Clock, digest_evidence, entry, utcnow
from broker.custody import KekRegistry
from broker.errors import (
    AttestationRefusedError,
    AttesterRevokedError,
    BrokerError,
    CustodyError,
    NonceError,
    PolicyError,
    RevokedKeyError,
    SnpError,
    UnknownKeyError,
    UnknownPolicyObjectError,
    VerificationError,
)
from broker.model import (
    AuditEntry,
    AuditRecord,
    DataKeyRecord,
    DenialCode,
    Party,
    Session,
    WithheldKey,
)
from broker.nonces import NonceService
from broker.policy import Denial
from broker.release import SealedRelease
from broker.snp import SnpClaims
from broker.storage import Store
from broker.storage.unit import UnitOfWork
from evidence.binding import qualifying_data
from evidence.manifest import ManifestEntry, files_pcr23
from evidence.pcr import WORKLOAD_PCR, MeasurementEvent
from pki.identity import SpiffeId
from sealing.keys import RecipientPublicKey

log = logging.getLogger("cleanroom.broker")

#: Parties kept in memory for releases; a clean room has a handful, so this is only a bound.
_MAX_CACHED_PARTIES = 4096


@dataclass(frozen=True)
class Challenge:
    """A single-use nonce for one AK, when it expires, and the PCRs the quote must cover."""

    nonce: bytes
    expires_at: datetime
    #: bank -> PCR indices the quote must cover
    pcr_selection: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class AttestOutcome:
    """An attestation that released at least one key: the session, the released keys (each
    sealed to the ephemeral key), the withheld ones, and the parties outputs are sealed to."""

    session_id: str
    released: tuple[SealedRelease, ...]
    denied: tuple[WithheldKey, ...]
    output_recipients: tuple[Party, ...]
    expires_at: datetime


@dataclass(frozen=True)
class Evidence:
    """What a sidecar presents in Attest."""

    ak_name: str
    nonce: bytes
    attest: bytes
    signature: bytes
    pcr_values: Mapping[tuple[int, str], bytes]
    event_log: tuple[MeasurementEvent, ...]
    ephemeral_key: RecipientPublicKey
    key_ids: tuple[str, ...]
    peer_certificate_der: bytes
    #: On an Azure SEV-SNP confidential VM: the vTPM's HCL report and the chip's VCEK (DER).
    hcl_report: bytes = b""
    vcek: bytes = b""


class Attestation:
    """Challenges, attestations and session ends, for sidecars.

    Its collaborators: the store, the nonces, the audit trail, the KEKs (to unwrap what it
    releases), the SEV-SNP gate, the clock, and the attestation settings of the configuration
    (the banks and PCRs a quote must cover, the event-log bound, the attestation lifetime).
    """

    def __init__(
        self,
        *,
        store: Store,
        nonces: NonceService,
        trail: AuditTrail,
        keks: KekRegistry,
        snp: SnpGate,
        config: BrokerConfig,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._nonces = nonces
        self._trail = trail
        self._keks = keks
        self._snp = snp
        self._clock = clock
        self._required = {bank: (WORKLOAD_PCR, *config.boot_pcrs) for bank in config.required_banks}
        self._max_event_log_entries = config.max_event_log_entries
        self._lifetime_seconds = config.attestation_lifetime_seconds
        # Parties are never changed or removed once added (the store has no such operation),
        # so the records that every release names as output recipients are read once. Whoever
        # adds party updates or removal must drop this cache.
        self._parties: dict[str, Party] = {}

    def _party(self, name: str) -> Party:
        """The party ``name`` (cached: parties are immutable once added).

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        party = self._parties.get(name)
        if party is None:
            party = self._store.get_party(name)
            if len(self._parties) < _MAX_CACHED_PARTIES:
                self._parties[name] = party
        return party

    def challenge(self, actor: SpiffeId, ak_name: str) -> Challenge:
        """Issues a single-use nonce bound to an enrolled, active AK.

        Every challenge is audited: a refusal with its reason, an issued nonce as ``allow``
        with the nonce's SHA-256 as the evidence digest (the same transaction as the nonce).

        Raises:
            UnknownKeyError, RevokedKeyError: the AK cannot attest.
            StorageError: the database failed.
        """
        try:
            ak, ek = self._store.get_attester(ak_name)
        except BrokerError as e:
            self._trail.record(actor, "challenge", ak_name, "deny", str(e))
            raise
        # The AK's own revocation first, then its TPM's (by the EK's canonical identity, which
        # every encoding of the EK shares): the caller learns which; the audit log also says why.
        revoked: tuple[RevokedKeyError, str] | None = None
        if ak.revoked:
            revoked = RevokedKeyError(f"AK {ak_name} is revoked"), ak.revoked_reason
        elif ek is not None and ek.revoked:
            revoked = RevokedKeyError(f"EK {ek.ek_id} is revoked"), ek.revoked_reason
        if revoked is not None:
            error, why = revoked
            self._trail.record(
                actor, "challenge", ak_name, "deny", f"{error}: {why or 'no reason given'}"
            )
            raise error
        # The record keeps the nonce's digest, not the nonce: that matches the challenge to the
        # nonce row and to its attestation, while no one who reads or archives the audit log
        # ever holds a live nonce (to burn it first by presenting it with another AK, say).
        nonce, expires = self._nonces.issue_recorded(
            ak_name,
            audit=self._trail.log,
            entry=lambda digest: entry(
                actor, "challenge", ak_name, "allow", "nonce issued", evidence_digest=digest
            ),
        )
        return Challenge(nonce=nonce, expires_at=expires, pcr_selection=dict(self._required))

    def discard_challenge(self, nonce: bytes, ak_name: str) -> None:
        """Burns an issued nonce that will not be answered (an ``AttestStream`` that ended
        after its challenge and before its evidence), so that it cannot be used later.

        The challenge's own audit record stands; nothing was decided, so nothing more is
        recorded. A nonce already used, expired or unknown is left as it is.

        Raises:
            StorageError: the database failed (the nonce still expires with its TTL).
        """
        try:
            self._nonces.consume(nonce, ak_name)
        except NonceError:
            pass

    def record_malformed_attest(
        self, actor: SpiffeId, *, ak_name: str, attest: bytes, signature: bytes, reason: str
    ) -> None:
        """Records an ``Attest`` that the transport refused as malformed, as the core records
        its own refusals (action ``attest``, decision ``deny``), with the quote's digest.

        Raises:
            StorageError, AuditChainError: the record could not be written.
        """
        self._trail.record(
            actor,
            "attest",
            ak_name,
            "deny",
            reason,
            evidence_digest=digest_evidence(attest, signature),
        )

    def attest(self, actor: SpiffeId, evidence: Evidence) -> AttestOutcome:
        """Verifies evidence, evaluates policy and seals each granted key to the ephemeral key.

        The nonce is burned, and the verdict recorded, in one unit of work at the end: a
        release commits with its nonce, its records and its session, after re-checking inside
        that unit that the AK and every approval it cites are still unrevoked; a denial commits
        with the nonce it burned. A refused nonce outranks every other reason (as if it had been
        checked first), but the evidence is verified before the nonce is burned, so a replayed
        nonce costs the broker one verification.

        Raises:
            AttestationRefusedError: the nonce, the evidence or policy refused everything (reason in
                the audit log).
        """
        evidence_digest = digest_evidence(evidence.attest, evidence.signature)

        def record(
            action: str, subject: str, decision: str, reason: str, parties: tuple[str, ...]
        ) -> AuditEntry:
            return entry(
                actor,
                action,
                subject,
                decision,
                reason,
                evidence_digest=evidence_digest,
                parties=parties,
            )

        def refusal(uow: UnitOfWork, burn: bool) -> NonceError | None:
            """Burns the nonce in ``uow`` (when ``burn``); why it is refused, if it is."""
            return self._nonces.consume_in(uow, evidence.nonce, evidence.ak_name) if burn else None

        def denied(
            reason: str,
            code: DenialCode,
            cause: BaseException | None,
            records: Sequence[AuditRecord],
            withheld: Sequence[tuple[Denial, int]] = (),
        ) -> NoReturn:
            """Raises the denial: the sidecar learns ``code``, the sequence of the verdict's
            record (the last of ``records``) and each withheld key's code and record."""
            log.warning("attestation denied for AK %s: %s", evidence.ak_name, reason)
            # The cause classifies the denial (the metrics' reason label).
            raise AttestationRefusedError(
                reason,
                code=code,
                audit_record=records[-1].sequence,
                withheld=[
                    WithheldKey(d.key_id, d.reason, d.code, records[i].sequence)
                    for d, i in withheld
                ],
            ) from cause

        def deny(
            reason: str,
            code: DenialCode,
            *,
            parties: tuple[str, ...] = (),
            before: Sequence[AuditEntry] = (),
            withheld: Sequence[tuple[Denial, int]] = (),
            burn: bool = True,
            cause: BaseException | None = None,
        ) -> NoReturn:
            """Burns the nonce and records the verdict (after the records ``before``) in one
            unit of work, then raises the denial.

            A record's reason and parties are visible to every party it is tagged with, so a
            verdict is tagged only with parties whose own keys its reason is solely about;
            reasons about several parties' keys go to the operator's view alone, and each
            party gets records of its own (``before``); ``withheld`` pairs each withheld key's
            denial with the index in ``before`` of the record the sidecar is pointed to.

            Raises:
                AttestationRefusedError: always, from the nonce's refusal or else from ``cause``.
            """
            with self._store.fast_unit_of_work("deny attestation") as uow:
                nonce_refused = refusal(uow, burn)
                if nonce_refused is not None:
                    reason, parties, before, withheld = (
                        f"nonce refused: {nonce_refused}",
                        (),
                        (),
                        (),
                    )
                    code, cause = DenialCode.NONCE_INVALID, nonce_refused
                records = self._trail.log.append_in(
                    uow, [*before, record("attest", evidence.ak_name, "deny", reason, parties)]
                )
            denied(reason, code, cause, records, withheld)

        try:
            # The AK and its EK in one read; policy.evaluate refuses either one revoked.
            ak, ek = self._store.get_attester(evidence.ak_name)
        except UnknownKeyError as e:
            # No nonce is burned: a nonce is bound to an enrolled AK, and this one is none.
            deny(str(e), DenialCode.ATTESTER_UNKNOWN, burn=False, cause=e)
        snp_claims: SnpClaims | None = None
        try:
            expected = qualifying_data(
                nonce=evidence.nonce,
                kem=evidence.ephemeral_key.kem,
                ephemeral_public_key=evidence.ephemeral_key.raw,
                tls_certificate_der=evidence.peer_certificate_der,
            )
            ak_public = tpmkeys.load_public(ak.public)
            verified = quote.verify_quote(
                ak=ak_public,
                attest=evidence.attest,
                signature=evidence.signature,
                pcr_values=evidence.pcr_values,
                expected_qualifying_data=expected,
                required_pcrs=self._required,
                event_log=evidence.event_log,
                max_event_log_entries=self._max_event_log_entries,
                # An AK bound to an EK is the EK's child (credential activation, tpm2_createak):
                # the quote must name exactly that object as its signer.
                expected_signer=(
                    tpmkeys.ak_qualified_name(ak_public, tpmkeys.load_public(ek.public))
                    if ek is not None
                    else None
                ),
            )
            # The hardware root after the quote: the report must bind the AK that signed it
            # and be as fresh as its qualifying data.
            snp_claims = self._snp.check(
                hcl_report=evidence.hcl_report,
                vcek=evidence.vcek,
                ak=tpmkeys.load_public(ak.public).key,
                qualifying_data=expected,
            )
        except SnpError as e:
            deny(
                f"SEV-SNP evidence rejected: {type(e).__name__}: {e}",
                DenialCode.EVIDENCE_INVALID,
                cause=e,
            )
        except (VerificationError, BrokerError) as e:
            deny(
                f"evidence rejected: {type(e).__name__}: {e}", DenialCode.EVIDENCE_INVALID, cause=e
            )
        except Exception as e:  # evidence.errors from binding: malformed input
            deny(f"evidence rejected: {e}", DenialCode.EVIDENCE_INVALID, cause=e)

        measured = policy.manifest_from_events(evidence.event_log)
        try:
            measured_launch = policy.launch_from_events(evidence.event_log)
        except PolicyError as e:
            deny(f"evidence rejected: {e}", DenialCode.EVIDENCE_INVALID, cause=e)
        pcr23 = verified.pcr_values.get((WORKLOAD_PCR, "sha256"))
        # Approvals of the same files are candidates too, whatever their launch: when only the
        # launch differs, the audit reason then says what in it differs.
        files_pcr23 = _files_pcr23(measured)
        candidates = (
            self._store.find_active_approvals(pcr23, files_pcr_sha256=files_pcr23) if pcr23 else []
        )
        # An approval that demands the hardware root counts only with verified SNP evidence;
        # its party reads why in its own record.
        snp_withheld = [
            record(
                "key.release",
                key_id,
                "deny",
                f"approval {a.approval_id} requires AMD SEV-SNP evidence; none was verified",
                (a.party,),
            )
            for a in candidates
            if a.require_snp and snp_claims is None
            for key_id in a.key_ids
        ]
        if snp_withheld:
            candidates = [a for a in candidates if not a.require_snp]
        wanted = set(evidence.key_ids)
        for a in candidates:
            if not evidence.key_ids:
                wanted.update(a.key_ids)
        keys: dict[str, DataKeyRecord] = {}
        for key_id in sorted(wanted):
            try:
                keys[key_id] = self._store.get_data_key(key_id)
            except (UnknownPolicyObjectError, UnknownKeyError):
                pass
        golden = {}
        for a in candidates:
            if a.golden_set and a.golden_set not in golden:
                try:
                    golden[a.golden_set] = self._store.get_golden_set(a.golden_set)
                except (UnknownPolicyObjectError, BrokerError):
                    pass
        try:
            decision = policy.evaluate(
                ak=ak,
                ek=ek,
                quoted_pcrs=verified.pcr_values,
                measured_manifest=measured,
                requested_key_ids=tuple(sorted(wanted)),
                keys=keys,
                approvals=candidates,
                golden_sets=golden,
                now=self._clock(),
                measured_launch=measured_launch,
            )
        except PolicyError as e:
            revoked = isinstance(e, AttesterRevokedError)
            code = DenialCode.ATTESTER_REVOKED if revoked else DenialCode.ATTESTER_UNKNOWN
            deny(str(e), code, cause=e)
        owners = sorted({k.owner for k in keys.values()})
        # One record per withheld key, tagged with its owner alone: each party reads why its
        # own keys were withheld, and never another party's key ids or reasons.
        withheld = [
            record(
                "key.release",
                d.key_id,
                "deny",
                d.reason,
                (keys[d.key_id].owner,) if d.key_id in keys else (),
            )
            for d in decision.denied
        ]
        withheld = snp_withheld + withheld
        # A key whose approval was set aside for want of SEV-SNP evidence: what the sidecar is
        # told is that the machine was not accepted, not that nothing was approved.
        snp_record: dict[str, int] = {}
        for i, r in enumerate(snp_withheld):
            snp_record.setdefault(r.subject, i)
        denials = [
            replace(d, code=DenialCode.PLATFORM_NOT_ACCEPTED)
            if d.key_id in snp_record and d.code is DenialCode.NOT_APPROVED
            else d
            for d in decision.denied
        ]
        # The record each withheld key's denial points to (an index into ``withheld``): the
        # SEV-SNP one where that is why, else the key's own.
        pointed = [
            (d, snp_record[d.key_id])
            if d.code is DenialCode.PLATFORM_NOT_ACCEPTED and d.key_id in snp_record
            else (d, len(snp_withheld) + n)
            for n, d in enumerate(denials)
        ]
        if not decision.granted:
            reasons = "; ".join(f"{d.key_id}: {d.reason}" for d in denials)
            codes = {d.code for d in denials}
            code = codes.pop() if len(codes) == 1 else DenialCode.KEYS_WITHHELD
            # The full reason names every party's keys: the operator's record only.
            deny(
                f"no key released: {reasons or 'workload not approved'}",
                code if denials else DenialCode.NOT_APPROVED,
                before=withheld,
                withheld=pointed,
            )

        session_id = uuid.uuid4().hex
        now = self._clock()
        expires = now + timedelta(seconds=self._lifetime_seconds)
        sealed: list[SealedRelease] = []
        for grant in decision.granted:
            key = keys[grant.key_id]
            try:
                # One key at a time, so that a failure is known to be this key's KEK's.
                sealed.extend(
                    release.seal_records(
                        self._keks, (key,), evidence.ephemeral_key, session_id=session_id
                    )
                )
            except CustodyError as e:
                # A KEK that refuses to unwrap is a denial with its reason, not a crash. The
                # reason names this key and its KEK, so its owner (and the operator) reads it;
                # the other owners learn only that nothing was released, and why not in general.
                others = [
                    record(
                        "attest",
                        evidence.ak_name,
                        "deny",
                        "no key released: key custody failed for another party's key",
                        (owner,),
                    )
                    for owner in owners
                    if owner != key.owner
                ]
                deny(
                    f"key custody failed: {e}",
                    DenialCode.KEY_CUSTODY,
                    parties=(key.owner,),
                    before=others,
                    cause=e,
                )
        approval_of = {g.key_id: g.approval_id for g in decision.granted}
        session = Session(
            session_id=session_id,
            ak_name=evidence.ak_name,
            peer=str(actor),
            started_at=now,
            expires_at=expires,
            released_key_ids=(),
        )
        duplicate, missing = self._store.session_errors(session)
        dropped: list[tuple[str, str]] = []
        denied_reason: str | None = None
        denial_cause: BaseException | None = None
        denied_code = DenialCode.NOT_APPROVED
        appended: list[AuditRecord] = []
        # Where the withheld keys' records start among ``appended``.
        first_withheld = 0
        released: tuple[SealedRelease, ...] = ()

        def decide(uow: UnitOfWork) -> None:
            """The nonce, the re-check, the records and the session: one unit, one commit."""
            nonlocal denied_reason, denial_cause, denied_code, dropped, released, appended
            nonlocal first_withheld
            denial_cause = refusal(uow, True)
            if denial_cause is not None:
                denied_reason = f"nonce refused: {denial_cause}"
                denied_code = DenialCode.NONCE_INVALID
            else:
                ak_active, active = self._store.still_active(
                    uow, ak_name=evidence.ak_name, approval_ids=sorted(set(approval_of.values()))
                )
                if not ak_active:
                    denial_cause = RevokedKeyError(f"AK {evidence.ak_name} is revoked")
                    denied_reason = (
                        f"AK {evidence.ak_name} or its EK was revoked during the attestation"
                    )
                    denied_code = DenialCode.ATTESTER_REVOKED
                else:
                    # A key whose approval was revoked while this attestation was in flight is
                    # withheld: the chain never shows a release citing a revoked approval.
                    dropped = [(k, a) for k, a in approval_of.items() if a not in active]
                    kept = [r for r in sealed if approval_of[r.key_id] in active]
                    if not kept:
                        denied_reason = "no key released: every approval was revoked meanwhile"
            withheld.extend(
                record(
                    "key.release",
                    key_id,
                    "deny",
                    f"approval {approval_id} was revoked during the attestation",
                    (keys[key_id].owner,),
                )
                for key_id, approval_id in dropped
            )
            if denied_reason is not None:
                appended = self._trail.log.append_in(
                    uow,
                    [
                        *(withheld if not isinstance(denial_cause, NonceError) else ()),
                        record("attest", evidence.ak_name, "deny", denied_reason, ()),
                    ],
                )
            else:
                withheld_now = {key_id for key_id, _ in dropped}
                released = tuple(r for r in sealed if r.key_id not in withheld_now)
                entries: list[AuditEntry] = [
                    record(
                        "key.release",
                        r.key_id,
                        "allow",
                        f"session {session_id}, approval {approval_of[r.key_id]}",
                        (r.owner,),
                    )
                    for r in released
                ]
                first_withheld = len(entries)
                entries.extend(withheld)
                # The verdict counts every party's keys and names the workloads of the
                # approvals that granted: the operator's record. Each party has its own keys'
                # records above.
                entries.append(
                    record(
                        "attest",
                        evidence.ak_name,
                        "allow",
                        f"session {session_id}: released {len(released)}, "
                        f"withheld {len(decision.denied) + len(dropped)}; "
                        f"workload {decision.workload_name!r}",
                        (),
                    )
                )
                appended = self._trail.log.append_in(uow, entries)
                self._store.insert_session(
                    uow.cursor,
                    replace(session, released_key_ids=tuple(k.key_id for k in released)),
                )

        self._commit_release(decide, duplicate=duplicate, missing_reference=missing)
        if denied_reason is not None:
            # Withheld keys' records were written only when the nonce was good (see decide).
            kept = () if isinstance(denial_cause, NonceError) else pointed
            denied(denied_reason, denied_code, denial_cause, appended, kept)
        recipients = tuple(self._party(p) for p in decision.output_recipients)
        return AttestOutcome(
            session_id=session_id,
            released=released,
            denied=(
                *(
                    WithheldKey(d.key_id, d.reason, d.code, appended[first_withheld + i].sequence)
                    for d, i in pointed
                ),
                *(
                    WithheldKey(
                        k,
                        f"approval {a} was revoked during the attestation",
                        DenialCode.NOT_APPROVED,
                        appended[first_withheld + len(withheld) - len(dropped) + j].sequence,
                    )
                    for j, (k, a) in enumerate(dropped)
                ),
            ),
            output_recipients=recipients,
            expires_at=expires,
        )

    def _commit_release(
        self,
        decide: Callable[[UnitOfWork], None],
        *,
        duplicate: BrokerError,
        missing_reference: BrokerError,
    ) -> None:
        """Runs an attestation's final decision in its unit of work (one method, so that the
        benchmark's breakdown can time it).

        Raises:
            DuplicateError, UnknownKeyError, StorageError: as the unit of work.
        """
        with self._store.fast_unit_of_work(
            "release keys", duplicate=duplicate, missing_reference=missing_reference
        ) as uow:
            decide(uow)

    def end_session(
        self, actor: SpiffeId, session_id: str, exit_code: int, outputs: Sequence[str]
    ) -> None:
        session = self._store.get_session(session_id)
        if session.peer != str(actor):
            raise PolicyError("session belongs to another sidecar")
        with self._trail.allowed_change(
            self._store.unit_of_work("end session"),
            actor,
            "session.end",
            session_id,
            f"exit code {exit_code}; outputs: {', '.join(outputs) or 'none'}",
        ) as uow:
            self._store.end_session(session_id, self._clock(), exit_code, uow=uow)


def _files_pcr23(measured: Sequence[ManifestEntry]) -> bytes | None:
    """The sha256 PCR 23 value of the measured files alone (before the launch), which approvals
    are also indexed by; None when there are no files or a file has no sha256 digest."""
    return files_pcr23(measured) if measured else None


__all__ = ["AttestOutcome", "Attestation", "Challenge", "Evidence", "WithheldKey"]
