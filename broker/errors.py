"""Errors of the ``broker`` package. Every error it raises derives from :class:`BrokerError`.

Subtrees follow the failure areas: evidence verification, enrollment, nonces, policy, key
custody, storage and the audit log. Each leaf names one precise reason; the gRPC layer maps a
whole subtree to one status code and one opaque client message, and records the leaf's message
in the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cleanroom.errors import CleanroomError

if TYPE_CHECKING:
    # Typing only: the denial codes and withheld keys are domain values (broker.model); this module
    # stays importable on its own (the sidecar imports it as part of the broker's client).
    from broker.model import DenialCode, WithheldKey


class BrokerError(CleanroomError):
    """Root of every error the ``broker`` package raises."""


# --- configuration -------------------------------------------------------------------------


class BrokerConfigError(BrokerError):
    """The broker's configuration is invalid."""


# --- quote and event-log verification -----------------------------------------------------


class AdminUsageError(BrokerError):
    """The admin command's arguments or input files are unusable (nothing was sent)."""


class VerificationError(BrokerError):
    """Evidence (quote, signature, PCR values, event log) failed verification."""


class MalformedEvidenceError(VerificationError):
    """Evidence bytes cannot be parsed (truncated, trailing bytes, wrong structure)."""


class NotTpmGeneratedError(VerificationError):
    """The attest structure's magic is not TPM_GENERATED_VALUE."""


class AttestTypeError(VerificationError):
    """The attest structure is not of type TPM_ST_ATTEST_QUOTE (e.g. a certify)."""


class SignatureError(VerificationError):
    """The signature does not verify under the AK, or its scheme/hash is not the AK's."""


class UnsupportedAlgorithmError(VerificationError):
    """A key type, signature scheme, hash or PCR bank that the broker does not accept."""


class QualifiedSignerError(VerificationError):
    """The quote's qualifiedSigner is not the qualified name of the enrolled AK under its EK:
    the quote was made by another TPM object than the one enrolled."""


class QualifyingDataError(VerificationError):
    """The quote's extraData is not the expected qualifying data (wrong nonce or binding)."""


class PcrDigestError(VerificationError):
    """The quote's PCR digest does not match the digest of the reported PCR values."""


class PcrSelectionError(VerificationError):
    """The quoted PCR selection omits a required PCR or bank, or the reported values do not
    cover exactly the quoted selection."""


class EventLogReplayError(VerificationError):
    """The event log does not replay to the quoted PCR value, or is malformed or too long."""


class GoldenValueError(VerificationError):
    """A quoted PCR value is not among the accepted (golden) values."""


# --- enrollment -----------------------------------------------------------------------------


class EnrollmentError(BrokerError):
    """An EK or AK cannot be enrolled, or a credential challenge failed."""


class KeyAttributeError(EnrollmentError):
    """An AK or EK public area has attributes, a type, a size or a curve the broker refuses."""


class EkCertificateError(EnrollmentError):
    """An EK certificate is malformed, does not chain to a trusted CA, or does not match the EK."""


class CredentialError(EnrollmentError):
    """A credential activation failed: unknown or expired challenge, or the wrong secret."""


class UnknownKeyError(EnrollmentError):
    """An EK or AK is not enrolled."""


class DuplicateError(BrokerError):
    """Something with the same identifier already exists."""


# --- nonces ---------------------------------------------------------------------------------


class NonceError(BrokerError):
    """A nonce cannot be used: unknown, already used, expired or bound to another AK."""


class NonceUnknownError(NonceError):
    """The nonce was never issued by this broker (or was purged long ago)."""


class NonceReplayError(NonceError):
    """The nonce was already consumed."""


class NonceExpiredError(NonceError):
    """The nonce's time to live has passed."""


class NonceBindingError(NonceError):
    """The nonce was issued to another AK."""


# --- policy ---------------------------------------------------------------------------------


class PolicyError(BrokerError):
    """A policy object is invalid, or policy denies a release."""


class NotApprovedError(PolicyError):
    """The measured workload is not approved for a key by that key's owner."""


class RevokedKeyError(EnrollmentError, PolicyError):
    """An EK or AK has been revoked: it can neither enroll nor have keys released to it."""


class AttesterRevokedError(RevokedKeyError, PolicyError):
    """The attesting AK, or the EK it is bound to, is revoked: nothing is released.

    It is both a :class:`RevokedKeyError` (what failed) and a :class:`PolicyError` (where it was
    decided), so callers that map the policy subtree to one status catch it too.
    """


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


class UncoveredPcrError(PolicyError):
    """A golden set names a PCR that no quote is sure to cover (neither PCR 23 nor one of the
    broker's ``boot_pcrs``), so an approval relying on it could never release a key."""


class UnknownPolicyObjectError(PolicyError):
    """A golden set, party, key or approval named in a request does not exist."""


class UnknownSessionError(UnknownPolicyObjectError):
    """A session named in a request does not exist."""


# --- key custody ----------------------------------------------------------------------------


class CustodyError(BrokerError):
    """A data key cannot be wrapped, unwrapped or sealed for release."""


class KekError(CustodyError):
    """The key-encryption key is unavailable, or it refused to wrap or unwrap.

    A plain ``KekError`` is permanent: the same call fails again until someone changes the key,
    its role assignments or the broker's configuration.
    """


class KekUnavailableError(KekError):
    """The KEK's service failed transiently (throttled after the retries, unreachable, a server
    error): the same call may succeed later, with nothing changed."""


# --- storage and audit ----------------------------------------------------------------------


class StorageError(BrokerError):
    """The database failed or holds something unexpected."""


class AuditChainError(BrokerError):
    """The audit log's hash chain is broken: a record was deleted, inserted or altered."""


# --- AMD SEV-SNP hardware root (Azure confidential VMs) -------------------------------------


class SnpError(VerificationError):
    """The SEV-SNP evidence behind a vTPM (HCL report, VCEK) failed verification or policy."""


class SnpMalformedError(SnpError):
    """The HCL report or SNP report cannot be parsed (too short, wrong signature or type,
    runtime claims out of bounds)."""


class SnpUnsupportedError(SnpError):
    """An SNP report version, signature algorithm, signing key or claims hash not supported."""


class SnpCertificateError(SnpError):
    """The VCEK is not a certificate, not a P-384 key, or has a malformed AMD extension."""


class SnpChainError(SnpError):
    """The VCEK does not chain to a trusted AMD root (ARK/ASK), or a chain certificate has
    expired."""


class SnpSignatureError(SnpError):
    """The SNP report's ECDSA P-384 signature does not verify under the VCEK."""


class SnpTcbError(SnpError):
    """The VCEK's TCB extensions are not the report's REPORTED_TCB."""


class SnpChipIdError(SnpError):
    """The VCEK's hwID is not the report's CHIP_ID (another chip's VCEK), or CHIP_ID is
    masked."""


class SnpReportDataError(SnpError):
    """The SNP report's REPORT_DATA is not the hash of the runtime claims."""


class SnpRuntimeClaimsError(SnpError):
    """The runtime claims are not valid JSON or lack exactly one ``HCLAkPub`` key."""


class SnpAkBindingError(SnpError):
    """The runtime claims' ``HCLAkPub`` is not the AK that signed the quote."""


class SnpEkBindingError(SnpError):
    """The runtime claims' ``HCLEkPub`` is not the EK being enrolled."""


class SnpFreshnessError(SnpError):
    """The runtime claims' ``user-data`` is not bound to this quote's qualifying data."""


class SnpPolicyError(SnpError, PolicyError):
    """Verified SNP claims fail policy: debug allowed, VMPL, measurement, TCB, VM
    configuration, or SNP evidence required but absent."""
