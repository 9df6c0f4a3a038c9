"""The broker's application core: enrollment, challenges, attestation and release, and admin.

Transport-independent: the gRPC servicers translate messages to these calls and errors to status
codes. Every decision, allowed or denied, is written to the audit log with its exact reason;
the caller of a denied release learns only that it was denied.

Authorization by role (operator, party, sidecar) happens in the gRPC interceptor; this core
enforces what depends on the data: a party acts only on its own keys, approvals and records.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from broker import policy, quote, release, tpmkeys
from broker.audit import AuditLog, ChainReport
from broker.azure_snp import SnpGate
from broker.config import BrokerConfig
from broker.custody import KekRegistry
from broker.errors import (
    BrokerError,
    CredentialError,
    CustodyError,
    EkCertificateError,
    EnrollmentError,
    NonceError,
    NotApprovedError,
    PolicyError,
    RevokedKeyError,
    SnpError,
    StorageError,
    UnknownKeyError,
    UnknownPolicyObjectError,
    VerificationError,
)
from broker.keyseal import open_registered_key
from broker.model import (
    AkRecord,
    Approval,
    AuditEntry,
    AuditRecord,
    CredentialChallenge,
    DataKeyRecord,
    EkRecord,
    GoldenPcrSet,
    Party,
    Session,
)
from broker.nonces import NonceService
from broker.policy import AttesterRevokedError, Denial, DenialCode
from broker.release import SealedRelease
from broker.snp import SnpClaims
from broker.storage import Store
from broker.storage.unit import UnitOfWork
from evidence.binding import qualifying_data
from evidence.launch import Launch
from evidence.manifest import ManifestEntry, files_pcr23
from evidence.pcr import WORKLOAD_PCR, MeasurementEvent
from pki.identity import SpiffeId
from sealing.errors import SealingError
from sealing.keys import RecipientPrivateKey, RecipientPublicKey

log = logging.getLogger("cleanroom.broker")

Clock = Callable[[], datetime]

#: Parties kept in memory for releases; a clean room has a handful, so this is only a bound.
_MAX_CACHED_PARTIES = 4096


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class EnrollmentChallenge:
    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    expires_at: datetime


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at: datetime
    #: bank -> PCR indices the quote must cover
    pcr_selection: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class WithheldKey:
    """A requested key that was not released: the exact reason (server-side only), its coarse
    code (which the sidecar learns) and the sequence of the audit record that holds the reason.
    """

    key_id: str
    reason: str
    code: DenialCode
    audit_record: int


@dataclass(frozen=True)
class AttestOutcome:
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


def _entry(
    actor: SpiffeId | str,
    action: str,
    subject: str,
    decision: str,
    reason: str = "",
    *,
    evidence_digest: str = "",
    parties: Sequence[str] = (),
) -> AuditEntry:
    return AuditEntry(
        actor=str(actor),
        action=action,
        subject=subject,
        decision=decision,
        reason=reason,
        evidence_digest=evidence_digest,
        parties=tuple(parties),
    )


class AttestationRefusedError(PolicyError):
    """Nothing was released. The exact reason (``str(e)``) is in the audit log; the client
    learns only ``code``, the sequence of the verdict's record (``audit_record``) and, when
    every key was withheld, each key's code and record (``withheld``).
    """

    def __init__(
        self,
        reason: str,
        *,
        code: DenialCode | None = None,
        audit_record: int = 0,
        withheld: Sequence[WithheldKey] = (),
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.audit_record = audit_record
        self.withheld = tuple(withheld)


def digest_evidence(attest: bytes, signature: bytes) -> str:
    """The digest an attestation's audit records carry (hex SHA-256 of the quote and its
    signature), so that a retried quote can be matched; empty when there is no quote."""
    quoted = attest + signature
    return hashlib.sha256(quoted).hexdigest() if quoted else ""


class Broker:
    """The key broker's core. Construct with :meth:`open`-style keyword arguments."""

    def __init__(
        self,
        *,
        config: BrokerConfig,
        store: Store,
        keks: KekRegistry,
        registration_key: RecipientPrivateKey,
        trusted_ek_cas: Sequence[bytes] = (),
        clock: Clock = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.keks = keks
        self.registration_key = registration_key
        self.trusted_ek_cas = tuple(trusted_ek_cas)
        self.clock = clock
        self.nonces = NonceService(store, ttl_seconds=config.nonce_ttl_seconds, clock=clock)
        self.audit = AuditLog(store, clock=clock)
        # The AMD roots and the [broker.azure_snp] policy, read once (the root files are small).
        self.snp = SnpGate.from_config(config.azure_snp)
        self._required = {bank: (WORKLOAD_PCR, *config.boot_pcrs) for bank in config.required_banks}
        # The AK sizes and curves an operator accepts (BrokerConfig.accepted_rsa_bits/_ecc_curves).
        self._ak_limits: dict[str, Any] = {
            "rsa_key_sizes": frozenset(config.accepted_rsa_bits),
            "curves": frozenset(config.accepted_ecc_curves),
        }
        # Parties are never changed or removed once added (the store has no such operation),
        # so the records that every release names as output recipients are read once. Whoever
        # adds party updates or removal must drop this cache.
        self._parties: dict[str, Party] = {}

    def close(self) -> None:
        """Drops the KEKs and the registration key and closes the store (idempotent)."""
        self.keks.close()
        self.registration_key.close()
        self.store.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------------------

    def _record(
        self,
        actor: SpiffeId | str,
        action: str,
        subject: str,
        decision: str,
        reason: str = "",
        *,
        evidence_digest: str = "",
        parties: Sequence[str] = (),
    ) -> AuditRecord:
        """Records a decision that changes nothing (a refusal, a check) on its own."""
        return self.audit.append(
            _entry(
                actor,
                action,
                subject,
                decision,
                reason,
                evidence_digest=evidence_digest,
                parties=parties,
            )
        )

    def _record_in(
        self,
        uow: UnitOfWork,
        actor: SpiffeId | str,
        action: str,
        subject: str,
        decision: str,
        reason: str = "",
        *,
        parties: Sequence[str] = (),
    ) -> None:
        """Records a decision in the unit of work that makes its change."""
        self.audit.append_in(
            uow, [_entry(actor, action, subject, decision, reason, parties=parties)]
        )

    @contextmanager
    def _refusal_recorded(
        self,
        actor: SpiffeId,
        action: str,
        subject: str,
        *,
        parties: Sequence[str] = (),
    ) -> Iterator[None]:
        """Records a refused change (``deny`` with the exact reason) and re-raises it unchanged.

        A database failure is not a refusal (and its record could not be written either), so
        StorageError passes through unrecorded.
        """
        try:
            yield
        except StorageError:
            raise
        except (BrokerError, SealingError) as e:
            self._record(actor, action, subject, "deny", str(e), parties=parties)
            raise

    def _party(self, name: str) -> Party:
        """The party ``name`` (cached: parties are immutable once added).

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        party = self._parties.get(name)
        if party is None:
            party = self.store.get_party(name)
            if len(self._parties) < _MAX_CACHED_PARTIES:
                self._parties[name] = party
        return party

    @property
    def _quoted_pcrs(self) -> frozenset[int]:
        """The PCRs every quote covers: PCR 23 and ``boot_pcrs`` (every challenge names them)."""
        return frozenset((WORKLOAD_PCR, *self.config.boot_pcrs))

    @staticmethod
    def _require_party(actor: SpiffeId) -> str:
        if actor.kind != "party":
            raise PolicyError(f"{actor} is not a party")
        return actor.name

    # --- enrollment -------------------------------------------------------------------------

    def enroll_ek(
        self,
        actor: SpiffeId,
        *,
        ek_public: bytes,
        certificate: bytes | None,
        allow_without_certificate: bool,
    ) -> EkRecord:
        """Operator enrollment of an EK (with a certificate checked against the trusted CAs,
        or explicitly without one). The EK must match a TCG EK template; it is recorded under
        its canonical identity (:func:`broker.tpmkeys.ek_identity`).

        Raises:
            EnrollmentError: bad EK, bad certificate, or no certificate without the override.
            RevokedKeyError: the EK (in any encoding) is revoked: re-admit it instead.
            DuplicateError: the EK is enrolled already.
        """
        try:
            pub = tpmkeys.load_public(ek_public)
            ek_id = tpmkeys.ek_identity(pub)
            self._refuse_revoked_ek(ek_id)
            tpmkeys.check_ek_attributes(pub)
            if certificate:
                tpmkeys.verify_ek_certificate(
                    certificate, pub, self.trusted_ek_cas, now=self.clock()
                )
            elif not allow_without_certificate:
                raise EkCertificateError(
                    "EK has no certificate and enrollment without one was not explicitly allowed"
                )
        except BrokerError as e:
            self._record(actor, "ek.enroll", "", "deny", str(e))
            raise
        record = EkRecord(
            ek_id=ek_id,
            public=pub.tpm2b_public or ek_public,
            certificate=certificate or None,
            enrolled_at=self.clock(),
        )
        with self.store.unit_of_work("enroll EK") as uow:
            self.store.add_ek(record, uow=uow)
            self._record_in(
                uow,
                actor,
                "ek.enroll",
                record.ek_id,
                "allow",
                "with certificate" if certificate else "without certificate (operator)",
            )
        return record

    def _refuse_revoked_ek(self, ek_id: str) -> None:
        """Raises RevokedKeyError when the EK ``ek_id`` is enrolled and revoked.

        Raises:
            RevokedKeyError: it is.
            StorageError: the database failed.
        """
        try:
            existing = self.store.get_ek(ek_id)
        except UnknownKeyError:
            return
        if existing.revoked:
            raise RevokedKeyError(f"EK {ek_id} is revoked")

    def enroll_ak(self, actor: SpiffeId, *, ak_public: bytes, ek_id: str | None) -> AkRecord:
        """Operator enrollment of an AK from `tpm2_createak --public` output or PEM.

        The accepted sizes and curves (``accepted_rsa_bits``, ``accepted_ecc_curves``) apply
        to both forms; the TPM attributes can be checked only on a TPM2B_PUBLIC.

        Raises:
            KeyAttributeError: bad attributes, or a size or curve the configuration refuses.
            EnrollmentError: unknown or revoked EK.
            DuplicateError: the AK is enrolled already.
        """
        try:
            pub = tpmkeys.load_public(ak_public)
            # A PEM key has no TPM attributes to check, but its size and curve are checked all
            # the same: the operator vouches for where the key lives, not for a weak key, so an
            # RSA-1024 or P-521 AK is refused with the same error in either form.
            tpmkeys.check_ak_attributes(pub, allow_pem=True, **self._ak_limits)
            if ek_id:
                ek = self.store.get_ek(ek_id)
                if ek.revoked:
                    raise RevokedKeyError(f"EK {ek_id} is revoked")
        except BrokerError as e:
            self._record(actor, "ak.enroll", "", "deny", str(e))
            raise
        record = AkRecord(
            ak_name=pub.key_id if pub.name is None else pub.name.hex(),
            public=ak_public,
            ek_id=ek_id or None,
            enrolled_by="operator",
            enrolled_at=self.clock(),
        )
        with self.store.unit_of_work("enroll AK") as uow:
            self.store.add_ak(record, uow=uow)
            self._record_in(uow, actor, "ak.enroll", record.ak_name, "allow", "operator enrollment")
        return record

    def start_enrollment(
        self,
        actor: SpiffeId,
        *,
        ek_public: bytes,
        ek_certificate: bytes | None,
        ak_public: bytes,
        hcl_report: bytes = b"",
        vcek: bytes = b"",
        peer_certificate_der: bytes = b"",
    ) -> EnrollmentChallenge:
        """Sidecar enrollment, step 1: MakeCredential for the AK's name under the EK.

        The EK must match a TCG EK template and is looked up by its canonical identity, so a
        revoked EK is refused in any encoding. An EK that is not enrolled must be vouched for:
        its certificate chains to a trusted EK CA, or a verified SEV-SNP HCL report
        (``hcl_report``, ``vcek``) names it and the AK and ``[broker.azure_snp]`` allows that,
        or configuration allows EKs without certificates. It is not recorded here:
        :meth:`complete_enrollment` records it once the TPM has activated the credential. The
        challenge is bound to ``actor``.

        Raises:
            EnrollmentError: the EK or AK is unacceptable.
            RevokedKeyError: the EK is revoked (or kept out after an AK revocation).
        """
        try:
            ek = tpmkeys.load_public(ek_public)
            # The identity first: a revoked TPM is refused as revoked whatever the encoding of
            # its EK (and the audit log says so), then the encoding must be a TCG template's.
            ek_id = tpmkeys.ek_identity(ek)
            try:
                ek_record: EkRecord | None = self.store.get_ek(ek_id)
            except UnknownKeyError:
                ek_record = None
            if ek_record is not None and ek_record.revoked:
                raise RevokedKeyError(f"EK {ek_id} is revoked")
            tpmkeys.check_ek_attributes(ek)
            ak = tpmkeys.load_public(ak_public)
            if ak.name is None:
                raise EnrollmentError("credential activation needs the AK as TPM2B_PUBLIC")
            tpmkeys.check_ak_attributes(ak, **self._ak_limits)
            basis = ""
            if ek_record is None:
                if (hcl_report or vcek) and self.snp.enroll:
                    # The hardware root vouches for the EK instead of a certificate; the
                    # credential activation that follows still proves the AK lives with it.
                    try:
                        self.snp.check_enrollment(
                            hcl_report=hcl_report,
                            vcek=vcek,
                            ek=ek.key,
                            ak=ak.key,
                            ek_public=ek_public,
                            ak_public=ak_public,
                            tls_certificate_der=peer_certificate_der,
                        )
                    except SnpError as e:
                        # An enrollment refusal like an untrusted EK certificate; the audit
                        # record names the failed check.
                        raise EkCertificateError(
                            f"SEV-SNP evidence rejected: {type(e).__name__}: {e}"
                        ) from e
                    basis = "vouched by a verified AMD SEV-SNP HCL report"
                elif ek_certificate:
                    tpmkeys.verify_ek_certificate(
                        ek_certificate, ek, self.trusted_ek_cas, now=self.clock()
                    )
                elif not self.config.allow_ek_without_certificate:
                    raise EkCertificateError(
                        "EK is not enrolled and has no certificate"
                        + (
                            " (SEV-SNP evidence was sent, but [broker.azure_snp] enroll is off)"
                            if hcl_report or vcek
                            else ""
                        )
                    ) from None
                basis = basis or (
                    "certificate chains to a trusted EK CA"
                    if ek_certificate
                    else "no certificate (allowed by configuration)"
                )
            secret = secrets.token_bytes(32)
            blob, encrypted = tpmkeys.make_credential(
                ek_public=ek_public, ak_name=ak.name, secret=secret
            )
        except BrokerError as e:
            self._record(actor, "ak.credential", "", "deny", str(e))
            raise
        challenge = CredentialChallenge(
            enrollment_id=uuid.uuid4().hex,
            ak_name=ak.name.hex(),
            ak_public=ak_public,
            ek_id=ek_id,
            secret_digest=hashlib.sha256(secret).digest(),
            expires_at=self.clock() + timedelta(seconds=self.config.credential_ttl_seconds),
            ek_public=ek.tpm2b_public or ek_public,
            # A certificate is kept only when it is what vouched for a new EK.
            ek_certificate=ek_certificate or None if basis.startswith("certificate") else None,
            ek_basis=basis,
            requester=str(actor),
        )
        # The EK is not enrolled here (the activation enrolls it); the challenge commits with
        # its record.
        with self.store.unit_of_work("issue credential") as uow:
            self.store.put_credential_challenge(challenge, uow=uow)
            self._record_in(
                uow,
                actor,
                "ak.credential",
                challenge.ak_name,
                "allow",
                f"credential issued under EK {ek_id}",
            )
        return EnrollmentChallenge(challenge.enrollment_id, blob, encrypted, challenge.expires_at)

    def complete_enrollment(
        self, actor: SpiffeId, *, enrollment_id: str, secret: bytes
    ) -> AkRecord:
        """Sidecar enrollment, step 2: the secret from ActivateCredential proves the AK.

        Only the identity that started the enrollment may complete it. The EK is enrolled here,
        with the AK and in the same transaction, when it was not enrolled before.

        Raises:
            CredentialError: unknown, expired or another identity's challenge, or the wrong
                secret.
            RevokedKeyError: the AK or its EK was revoked meanwhile.
        """
        # Taking the challenge and the outcome's records are one unit of work: a taken (so
        # burned) challenge is always recorded, and a wrong secret burns it for good. Another
        # identity's attempt takes nothing (the challenge stays for its requester) and is
        # recorded all the same.
        refused: BrokerError | None = None
        record: AkRecord | None = None
        with self.store.unit_of_work("activate credential") as uow:
            try:
                challenge = self.store.take_credential_challenge(
                    enrollment_id, self.clock(), str(actor), uow=uow
                )
                if not hmac.compare_digest(
                    hashlib.sha256(secret).digest(), challenge.secret_digest
                ):
                    raise CredentialError("wrong credential secret")
            except CredentialError as e:
                self._record_in(uow, actor, "ak.activate", enrollment_id, "deny", str(e))
                refused = e
            else:
                try:
                    existing: AkRecord | None = self.store.get_ak(challenge.ak_name)
                except UnknownKeyError:
                    existing = None
                if existing is not None and existing.revoked:
                    self._record_in(
                        uow, actor, "ak.activate", existing.ak_name, "deny", "AK is revoked"
                    )
                    refused = RevokedKeyError(f"AK {existing.ak_name} is revoked")
                elif existing is not None:
                    self._record_in(
                        uow, actor, "ak.activate", existing.ak_name, "allow", "already enrolled"
                    )
                    record = existing
                else:
                    refused, record = self._enroll_activated(uow, actor, challenge)
        if refused is not None:
            raise refused
        assert record is not None
        return record

    def _enroll_activated(
        self, uow: UnitOfWork, actor: SpiffeId, challenge: CredentialChallenge
    ) -> tuple[BrokerError | None, AkRecord | None]:
        """Enrolls the AK of an answered challenge, and its EK when that is new, in ``uow``
        with their records; returns (refusal, None) when the EK was revoked meanwhile (the
        refusal recorded in ``uow``), else (None, the AK).

        Raises:
            DuplicateError: the AK was enrolled meanwhile (the unit rolls back).
            StorageError: the database failed.
        """
        now = self.clock()
        record = AkRecord(
            ak_name=challenge.ak_name,
            public=challenge.ak_public,
            ek_id=challenge.ek_id,
            enrolled_by="credential-activation",
            enrolled_at=now,
        )
        ek_record = EkRecord(
            ek_id=challenge.ek_id,
            public=challenge.ek_public,
            certificate=challenge.ek_certificate,
            enrolled_at=now,
        )
        try:
            ek_created = self.store.add_activated_ak(ek_record, record, uow=uow)
        except RevokedKeyError as e:
            # Nothing was written: the unit still commits the taken challenge and this record.
            self._record_in(uow, actor, "ak.activate", record.ak_name, "deny", str(e))
            return e, None
        if ek_created:
            self._record_in(
                uow,
                actor,
                "ek.enroll",
                ek_record.ek_id,
                "allow",
                f"credential activated under it; {challenge.ek_basis}",
            )
        self._record_in(uow, actor, "ak.activate", record.ak_name, "allow", "credential activated")
        return None, record

    def revoke_ek(self, actor: SpiffeId, ek_id: str, reason: str) -> None:
        """Revokes an EK and every AK under it; a refusal is recorded with its reason.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with (
            self._refusal_recorded(actor, "ek.revoke", ek_id),
            self.store.unit_of_work("revoke EK") as uow,
        ):
            self.store.revoke_ek(ek_id, reason, uow=uow)
            self._record_in(uow, actor, "ek.revoke", ek_id, "allow", reason)

    def revoke_ak(self, actor: SpiffeId, ak_name: str, reason: str) -> None:
        """Revokes an AK and keeps its TPM out: its EK is revoked too (with the reason ``AK ...
        revoked: ...``) until the operator re-admits it (:meth:`readmit_ek`), so evicting the AK
        and enrolling a new one does not bring the TPM back. A refusal is recorded with its
        reason.

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        with (
            self._refusal_recorded(actor, "ak.revoke", ak_name),
            self.store.unit_of_work("revoke AK") as uow,
        ):
            blocked = self.store.revoke_ak(ak_name, reason, uow=uow)
            self._record_in(
                uow,
                actor,
                "ak.revoke",
                ak_name,
                "allow",
                reason + (f" (EK {blocked} kept out until re-admitted)" if blocked else ""),
            )

    def readmit_ek(self, actor: SpiffeId, ek_id: str, reason: str) -> bool:
        """Re-admits a revoked EK (revoked by ``ek revoke`` or kept out after an AK revocation):
        its TPM may enroll new AKs again; the AKs revoked before stay revoked. The change and
        its record commit together; re-admitting an EK that is not revoked changes nothing and
        is recorded all the same.

        Returns whether the EK was revoked.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with (
            self._refusal_recorded(actor, "ek.readmit", ek_id),
            self.store.unit_of_work("re-admit EK") as uow,
        ):
            lifted = self.store.readmit_ek(ek_id, uow=uow)
            outcome = f"lifted: {lifted}" if lifted is not None else "was not revoked"
            self._record_in(
                uow,
                actor,
                "ek.readmit",
                ek_id,
                "allow",
                f"{reason}; {outcome}" if reason else outcome,
            )
        return lifted is not None

    # --- challenge and attestation ----------------------------------------------------------

    def challenge(self, actor: SpiffeId, ak_name: str) -> Challenge:
        """Issues a single-use nonce bound to an enrolled, active AK.

        Every challenge is audited: a refusal with its reason, an issued nonce as ``allow``
        with the nonce's SHA-256 as the evidence digest (the same transaction as the nonce).

        Raises:
            UnknownKeyError, RevokedKeyError: the AK cannot attest.
            StorageError: the database failed.
        """
        try:
            ak, ek = self.store.get_attester(ak_name)
        except BrokerError as e:
            self._record(actor, "challenge", ak_name, "deny", str(e))
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
            self._record(
                actor, "challenge", ak_name, "deny", f"{error}: {why or 'no reason given'}"
            )
            raise error
        # The record keeps the nonce's digest, not the nonce: that matches the challenge to the
        # nonce row and to its attestation, while no one who reads or archives the audit log
        # ever holds a live nonce (to burn it first by presenting it with another AK, say).
        nonce, expires = self.nonces.issue_recorded(
            ak_name,
            audit=self.audit,
            entry=lambda digest: AuditEntry(
                actor=str(actor),
                action="challenge",
                subject=ak_name,
                decision="allow",
                reason="nonce issued",
                evidence_digest=digest,
            ),
        )
        return Challenge(nonce=nonce, expires_at=expires, pcr_selection=dict(self._required))

    def record_malformed_attest(
        self, actor: SpiffeId, *, ak_name: str, attest: bytes, signature: bytes, reason: str
    ) -> None:
        """Records an ``Attest`` that the transport refused as malformed, as the core records
        its own refusals (action ``attest``, decision ``deny``), with the quote's digest.

        Raises:
            StorageError, AuditChainError: the record could not be written.
        """
        self._record(
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
            return AuditEntry(
                actor=str(actor),
                action=action,
                subject=subject,
                decision=decision,
                reason=reason,
                evidence_digest=evidence_digest,
                parties=parties,
            )

        def refusal(uow: UnitOfWork, burn: bool) -> NonceError | None:
            """Burns the nonce in ``uow`` (when ``burn``); why it is refused, if it is."""
            return self.nonces.consume_in(uow, evidence.nonce, evidence.ak_name) if burn else None

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
            with self.store.fast_unit_of_work("deny attestation") as uow:
                nonce_refused = refusal(uow, burn)
                if nonce_refused is not None:
                    reason, parties, before, withheld = (
                        f"nonce refused: {nonce_refused}",
                        (),
                        (),
                        (),
                    )
                    code, cause = DenialCode.NONCE_INVALID, nonce_refused
                records = self.audit.append_in(
                    uow, [*before, record("attest", evidence.ak_name, "deny", reason, parties)]
                )
            denied(reason, code, cause, records, withheld)

        try:
            # The AK and its EK in one read; policy.evaluate refuses either one revoked.
            ak, ek = self.store.get_attester(evidence.ak_name)
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
                max_event_log_entries=self.config.max_event_log_entries,
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
            snp_claims = self.snp.check(
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
            self.store.find_active_approvals(pcr23, files_pcr_sha256=files_pcr23) if pcr23 else []
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
                keys[key_id] = self.store.get_data_key(key_id)
            except (UnknownPolicyObjectError, UnknownKeyError):
                pass
        golden = {}
        for a in candidates:
            if a.golden_set and a.golden_set not in golden:
                try:
                    golden[a.golden_set] = self.store.get_golden_set(a.golden_set)
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
                now=self.clock(),
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
        now = self.clock()
        expires = now + timedelta(seconds=self.config.attestation_lifetime_seconds)
        sealed: list[SealedRelease] = []
        for grant in decision.granted:
            key = keys[grant.key_id]
            try:
                # One key at a time, so that a failure is known to be this key's KEK's.
                sealed.extend(
                    release.seal_records(
                        self.keks, (key,), evidence.ephemeral_key, session_id=session_id
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
        duplicate, missing = self.store.session_errors(session)
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
                ak_active, active = self.store.still_active(
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
                appended = self.audit.append_in(
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
                appended = self.audit.append_in(uow, entries)
                self.store.insert_session(
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
        with self.store.fast_unit_of_work(
            "release keys", duplicate=duplicate, missing_reference=missing_reference
        ) as uow:
            decide(uow)

    def end_session(
        self, actor: SpiffeId, session_id: str, exit_code: int, outputs: Sequence[str]
    ) -> None:
        session = self.store.get_session(session_id)
        if session.peer != str(actor):
            raise PolicyError("session belongs to another sidecar")
        with self.store.unit_of_work("end session") as uow:
            self.store.end_session(session_id, self.clock(), exit_code, uow=uow)
            self._record_in(
                uow,
                actor,
                "session.end",
                session_id,
                "allow",
                f"exit code {exit_code}; outputs: {', '.join(outputs) or 'none'}",
            )

    # --- policy administration --------------------------------------------------------------

    def set_golden_set(self, actor: SpiffeId, golden: GoldenPcrSet) -> GoldenPcrSet:
        """Creates or replaces a golden PCR set; a refusal is recorded with its reason.

        Raises:
            PolicyError: the set is invalid (see :func:`broker.policy.validate_golden_set`).
            UncoveredPcrError: the set names a PCR that no quote is sure to cover.
            StorageError: the database failed.
        """
        with self._refusal_recorded(actor, "golden.set", golden.name):
            policy.validate_golden_set(golden, quoted_pcrs=self._quoted_pcrs)
        golden = replace(golden, updated_at=self.clock())
        with self.store.unit_of_work("set golden set") as uow:
            self.store.put_golden_set(golden, uow=uow)
            self._record_in(
                uow,
                actor,
                "golden.set",
                golden.name,
                "allow",
                f"{sum(len(v) for v in golden.accepted.values())} accepted values",
            )
        return golden

    def delete_golden_set(self, actor: SpiffeId, name: str) -> None:
        """Deletes a golden PCR set; a refusal is recorded with its reason.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        with (
            self._refusal_recorded(actor, "golden.delete", name),
            self.store.unit_of_work("delete golden set") as uow,
        ):
            self.store.delete_golden_set(name, uow=uow)
            self._record_in(uow, actor, "golden.delete", name, "allow")

    def add_party(self, actor: SpiffeId, party: Party) -> Party:
        """Registers a party and its recipient key; a refusal is recorded with its reason.

        The refusal is the operator's record only: a party of that name does not exist (or is
        another one), so no party's view should gain it.

        Raises:
            InvalidKeyError: the recipient key is not a valid key of its KEM.
            DuplicateError: a party of this name exists.
            StorageError: the database failed.
        """
        with self._refusal_recorded(actor, "party.add", party.name):
            RecipientPublicKey(kem=party.kem, raw=party.public_key)  # validates the key
            with self.store.unit_of_work("add party") as uow:
                self.store.add_party(party, uow=uow)
                self._record_in(uow, actor, "party.add", party.name, "allow", parties=(party.name,))
        return party

    def kek_ref_for_party(self, party: str) -> str:
        """The KEK that wraps ``party``'s new data keys: the one the operator imported for it
        (:func:`broker.rotation.set_party_kek`), else the configuration's ``party_keks`` entry,
        else ``default_kek``.

        Raises:
            StorageError: the database failed.
        """
        imported = self.store.get_party_kek(party)
        if imported is not None:
            return imported.kek_ref
        return self.config.kek_for_party(party)

    def register_data_key(
        self, actor: SpiffeId, *, key_id: str, sealed_data_key: bytes, description: str
    ) -> DataKeyRecord:
        """A party registers a data key sealed to the broker's registration key. It is stored
        wrapped by the party's KEK (:meth:`kek_ref_for_party`).

        Raises:
            PolicyError: the caller is not a registered party.
            CustodyError: the sealed key does not open (wrong key id, owner or broker key).
        """
        owner = self._require_party(actor)
        try:
            self.store.get_party(owner)
            data_key = open_registered_key(
                self.registration_key, sealed_data_key, key_id=key_id, owner=owner
            )
            kek = self.keks.get(self.kek_ref_for_party(owner))
            wrapped = kek.wrap(data_key, key_id=key_id, owner=owner)
        except BrokerError as e:
            self._record(actor, "key.register", key_id, "deny", str(e), parties=(owner,))
            raise
        record = DataKeyRecord(
            key_id=key_id,
            owner=owner,
            wrapped_key=wrapped,
            kek_ref=kek.ref,
            created_at=self.clock(),
            description=description,
        )
        with self.store.unit_of_work("register data key") as uow:
            self.store.add_data_key(record, uow=uow)
            self._record_in(
                uow,
                actor,
                "key.register",
                key_id,
                "allow",
                f"wrapped by {kek.ref}",
                parties=(owner,),
            )
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
        owner = self._require_party(actor)
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
            created_at=self.clock(),
            require_snp=require_snp,
        )
        try:
            policy.validate_approval(
                approval,
                keys={k: self.store.get_data_key(k) for k in key_ids},
                parties={p: self.store.get_party(p) for p in output_recipients},
                golden_sets={golden_set: self.store.get_golden_set(golden_set)}
                if golden_set
                else {},
                quoted_pcrs=self._quoted_pcrs,
            )
        except BrokerError as e:
            self._record(actor, "workload.approve", workload_name, "deny", str(e), parties=(owner,))
            raise
        with self.store.unit_of_work("approve workload") as uow:
            self.store.add_approval(approval, uow=uow)
            self._record_in(
                uow,
                actor,
                "workload.approve",
                approval.approval_id,
                "allow",
                f"workload {workload_name!r} for keys {', '.join(key_ids)}"
                + ("; requires AMD SEV-SNP evidence" if require_snp else ""),
                parties=(owner, *output_recipients),
            )
        return approval

    def revoke_approval(self, actor: SpiffeId, approval_id: str) -> None:
        """Revokes an approval: a party its own, the operator any. Refusals are recorded.

        Raises:
            UnknownPolicyObjectError: no such approval.
            PolicyError: the approval belongs to another party.
            StorageError: the database failed.
        """
        caller = (actor.name,) if actor.kind == "party" else ()
        with self._refusal_recorded(actor, "workload.revoke", approval_id, parties=caller):
            approval = self.store.get_approval(approval_id)
        if actor.kind == "party" and approval.party != actor.name:
            reason = "approval belongs to another party"
            # Two records in one transaction. The caller's is tagged with the caller only: a
            # record's parties are visible to everyone it is tagged with, so tagging the owner
            # there would tell the caller whose approval it probed. The owner gets a record of
            # its own, because an attempt on its approval is a security event about its own
            # object, and the actor it names is the party that made it.
            entries = [
                AuditEntry(
                    actor=str(actor),
                    action="workload.revoke",
                    subject=approval_id,
                    decision="deny",
                    reason=reason,
                    parties=tagged,
                )
                for tagged in ((actor.name,), (approval.party,))
            ]
            self.audit.append_many(entries)
            raise PolicyError(reason)
        with self.store.unit_of_work("revoke approval") as uow:
            self.store.revoke_approval(approval_id, uow=uow)
            self._record_in(
                uow, actor, "workload.revoke", approval_id, "allow", parties=(approval.party,)
            )

    def audit_records(self, actor: SpiffeId, *, after: int, limit: int) -> list[AuditRecord]:
        party = actor.name if actor.kind == "party" else None
        return self.audit.list_records(after_sequence=after, limit=limit, party=party)

    # --- reading (for the admin service) ----------------------------------------------------
    # The gRPC layer checks roles; what a party may see of the data is decided here: a party
    # lists only its own keys and approvals, the operator everything.

    def list_eks(self) -> list[EkRecord]:
        """Raises: StorageError."""
        return self.store.list_eks()

    def list_aks(self) -> list[AkRecord]:
        """Raises: StorageError."""
        return self.store.list_aks()

    def list_golden_sets(self) -> list[GoldenPcrSet]:
        """Raises: StorageError."""
        return self.store.list_golden_sets()

    def list_parties(self) -> list[Party]:
        """Raises: StorageError."""
        return self.store.list_parties()

    def list_data_keys(self, actor: SpiffeId) -> list[DataKeyRecord]:
        """A party's own keys, or every key for the operator. Raises: StorageError."""
        return self.store.list_data_keys(owner=actor.name if actor.kind == "party" else None)

    def list_approvals(self, actor: SpiffeId) -> list[Approval]:
        """A party's own approvals, or every approval for the operator. Raises: StorageError."""
        return self.store.list_approvals(party=actor.name if actor.kind == "party" else None)

    def verify_audit_log(self, actor: SpiffeId) -> ChainReport:
        """Recomputes the audit chain; the check itself is recorded too.

        Raises:
            StorageError: the database failed.
        """
        report = self.audit.verify_chain()
        self._record(
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


__all__ = [
    "AttestOutcome",
    "AttestationRefusedError",
    "Broker",
    "Challenge",
    "EnrollmentChallenge",
    "Evidence",
    "NotApprovedError",
]


def _files_pcr23(measured: Sequence[ManifestEntry]) -> bytes | None:
    """The sha256 PCR 23 value of the measured files alone (before the launch), which approvals
    are also indexed by; None when there are no files or a file has no sha256 digest."""
    return files_pcr23(measured) if measured else None
