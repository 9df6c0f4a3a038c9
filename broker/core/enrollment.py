"""Enrollment: EKs and AKs by the operator, credential activation by a sidecar, revocation
and re-admission.

An AK attests only once it is enrolled: by the operator (:meth:`Enrollment.enroll_ak`), or by a
sidecar that proves with TPM2_ActivateCredential that the AK lives in the TPM of a vouched-for EK
(:meth:`Enrollment.start_enrollment`, :meth:`Enrollment.complete_enrollment`). Every decision is
recorded with its exact reason.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker import tpmkeys
from broker.azure_snp import SnpGate
from broker.config import BrokerConfig
from broker.core.trail import AuditTrail, Clock, utcnow
from broker.errors import (
    BrokerError,
    CredentialError,
    EkCertificateError,
    EnrollmentError,
    RevokedKeyError,
    SnpError,
    UnknownKeyError,
)
from broker.model import AkRecord, CredentialChallenge, EkRecord
from broker.storage import Store
from broker.storage.unit import UnitOfWork
from pki.identity import SpiffeId


@dataclass(frozen=True)
class EnrollmentChallenge:
    """What a sidecar's TPM answers with TPM2_ActivateCredential, and when it expires."""

    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    expires_at: datetime


class Enrollment:
    """Enrolling, revoking and re-admitting EKs and AKs.

    Its collaborators: the store, the audit trail, the clock, the trusted EK CAs, the SEV-SNP
    gate (for EKs vouched for by an HCL report) and the enrollment settings of the
    configuration (accepted AK sizes and curves, the credential TTL, EKs without a certificate).
    """

    def __init__(
        self,
        *,
        store: Store,
        trail: AuditTrail,
        config: BrokerConfig,
        snp: SnpGate,
        trusted_ek_cas: Sequence[bytes] = (),
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._trail = trail
        self._snp = snp
        self._trusted_ek_cas = tuple(trusted_ek_cas)
        self._clock = clock
        self._allow_ek_without_certificate = config.allow_ek_without_certificate
        self._credential_ttl_seconds = config.credential_ttl_seconds
        # The AK sizes and curves an operator accepts (BrokerConfig.accepted_rsa_bits/_ecc_curves).
        self._ak_limits: dict[str, Any] = {
            "rsa_key_sizes": frozenset(config.accepted_rsa_bits),
            "curves": frozenset(config.accepted_ecc_curves),
        }

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
                    certificate, pub, self._trusted_ek_cas, now=self._clock()
                )
            elif not allow_without_certificate:
                raise EkCertificateError(
                    "EK has no certificate and enrollment without one was not explicitly allowed"
                )
        except BrokerError as e:
            self._trail.record(actor, "ek.enroll", "", "deny", str(e))
            raise
        record = EkRecord(
            ek_id=ek_id,
            public=pub.tpm2b_public or ek_public,
            certificate=certificate or None,
            enrolled_at=self._clock(),
        )
        with self._trail.allowed_change(
            self._store.unit_of_work("enroll EK"),
            actor,
            "ek.enroll",
            record.ek_id,
            "with certificate" if certificate else "without certificate (operator)",
        ) as uow:
            self._store.add_ek(record, uow=uow)
        return record

    def _refuse_revoked_ek(self, ek_id: str) -> None:
        """Raises RevokedKeyError when the EK ``ek_id`` is enrolled and revoked.

        Raises:
            RevokedKeyError: it is.
            StorageError: the database failed.
        """
        try:
            existing = self._store.get_ek(ek_id)
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
                ek = self._store.get_ek(ek_id)
                if ek.revoked:
                    raise RevokedKeyError(f"EK {ek_id} is revoked")
        except BrokerError as e:
            self._trail.record(actor, "ak.enroll", "", "deny", str(e))
            raise
        record = AkRecord(
            ak_name=pub.key_id if pub.name is None else pub.name.hex(),
            public=ak_public,
            ek_id=ek_id or None,
            enrolled_by="operator",
            enrolled_at=self._clock(),
        )
        with self._trail.allowed_change(
            self._store.unit_of_work("enroll AK"),
            actor,
            "ak.enroll",
            record.ak_name,
            "operator enrollment",
        ) as uow:
            self._store.add_ak(record, uow=uow)
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
                ek_record: EkRecord | None = self._store.get_ek(ek_id)
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
                if (hcl_report or vcek) and self._snp.enroll:
                    # The hardware root vouches for the EK instead of a certificate; the
                    # credential activation that follows still proves the AK lives with it.
                    try:
                        self._snp.check_enrollment(
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
                        ek_certificate, ek, self._trusted_ek_cas, now=self._clock()
                    )
                elif not self._allow_ek_without_certificate:
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
            self._trail.record(actor, "ak.credential", "", "deny", str(e))
            raise
        challenge = CredentialChallenge(
            enrollment_id=uuid.uuid4().hex,
            ak_name=ak.name.hex(),
            ak_public=ak_public,
            ek_id=ek_id,
            secret_digest=hashlib.sha256(secret).digest(),
            expires_at=self._clock() + timedelta(seconds=self._credential_ttl_seconds),
            ek_public=ek.tpm2b_public or ek_public,
            # A certificate is kept only when it is what vouched for a new EK.
            ek_certificate=ek_certificate or None if basis.startswith("certificate") else None,
            ek_basis=basis,
            requester=str(actor),
        )
        # The EK is not enrolled here (the activation enrolls it); the challenge commits with
        # its record.
        with self._trail.allowed_change(
            self._store.unit_of_work("issue credential"),
            actor,
            "ak.credential",
            challenge.ak_name,
            f"credential issued under EK {ek_id}",
        ) as uow:
            self._store.put_credential_challenge(challenge, uow=uow)
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
        with self._store.unit_of_work("activate credential") as uow:
            try:
                challenge = self._store.take_credential_challenge(
                    enrollment_id, self._clock(), str(actor), uow=uow
                )
                if not hmac.compare_digest(
                    hashlib.sha256(secret).digest(), challenge.secret_digest
                ):
                    raise CredentialError("wrong credential secret")
            except CredentialError as e:
                self._trail.record_in(uow, actor, "ak.activate", enrollment_id, "deny", str(e))
                refused = e
            else:
                try:
                    existing: AkRecord | None = self._store.get_ak(challenge.ak_name)
                except UnknownKeyError:
                    existing = None
                if existing is not None and existing.revoked:
                    self._trail.record_in(
                        uow, actor, "ak.activate", existing.ak_name, "deny", "AK is revoked"
                    )
                    refused = RevokedKeyError(f"AK {existing.ak_name} is revoked")
                elif existing is not None:
                    self._trail.record_in(
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
        now = self._clock()
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
            ek_created = self._store.add_activated_ak(ek_record, record, uow=uow)
        except RevokedKeyError as e:
            # Nothing was written: the unit still commits the taken challenge and this record.
            self._trail.record_in(uow, actor, "ak.activate", record.ak_name, "deny", str(e))
            return e, None
        if ek_created:
            self._trail.record_in(
                uow,
                actor,
                "ek.enroll",
                ek_record.ek_id,
                "allow",
                f"credential activated under it; {challenge.ek_basis}",
            )
        self._trail.record_in(
            uow, actor, "ak.activate", record.ak_name, "allow", "credential activated"
        )
        return None, record

    def revoke_ek(self, actor: SpiffeId, ek_id: str, reason: str) -> None:
        """Revokes an EK and every AK under it; a refusal is recorded with its reason.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with (
            self._trail.refusal_recorded(actor, "ek.revoke", ek_id),
            self._trail.allowed_change(
                self._store.unit_of_work("revoke EK"), actor, "ek.revoke", ek_id, reason
            ) as uow,
        ):
            self._store.revoke_ek(ek_id, reason, uow=uow)

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
            self._trail.refusal_recorded(actor, "ak.revoke", ak_name),
            self._store.unit_of_work("revoke AK") as uow,
        ):
            blocked = self._store.revoke_ak(ak_name, reason, uow=uow)
            self._trail.record_in(
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
            self._trail.refusal_recorded(actor, "ek.readmit", ek_id),
            self._store.unit_of_work("re-admit EK") as uow,
        ):
            lifted = self._store.readmit_ek(ek_id, uow=uow)
            outcome = f"lifted: {lifted}" if lifted is not None else "was not revoked"
            self._trail.record_in(
                uow,
                actor,
                "ek.readmit",
                ek_id,
                "allow",
                f"{reason}; {outcome}" if reason else outcome,
            )
        return lifted is not None


__all__ = ["Enrollment", "EnrollmentChallenge"]
