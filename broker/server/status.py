"""The one place where exceptions become gRPC status codes and client-facing messages.

Clients get a code they can act on and a short message; exact reasons of refusals stay in the
audit log and the server log. The rules, most specific first:

* ``INVALID_ARGUMENT``: malformed requests (naming the field), malformed TPM structures and keys,
  unacceptable key attributes; a golden set (set, or named by an approval) over a PCR that no
  quote is sure to cover.
* ``UNAUTHENTICATED``: no usable client identity.
* ``PERMISSION_DENIED``: the caller's role may not call the method; policy refusals. For
  ``Attest`` every refusal (verification, policy, replayed or foreign nonce, a key its KEK
  refuses to unwrap) gets the one opaque message ``"attestation denied"``.
* ``FAILED_PRECONDITION``: not enrolled, revoked, credential challenge unknown or expired, nonce
  expired; a KEK that refuses for good (forbidden, not found, disabled): with the reason
  (``key not found: ...``, ``forbidden: ...``) for the operator's KEK calls (``SetPartyKek``,
  ``RewrapDataKey``, ``CheckKek``), with a short message that names nothing of the vault
  elsewhere (``RegisterDataKey``).
* ``NOT_FOUND``: unknown objects named in admin calls.
* ``ALREADY_EXISTS``: duplicates.
* ``RESOURCE_EXHAUSTED``: rate limits (gRPC itself answers oversized messages the same way).
* ``UNAVAILABLE``: transient faults only (the database; a KEK service that is throttled,
  unreachable or failing, :class:`~broker.errors.KekUnavailableError`), in every method, with a
  generic message asking to retry; for the operator's KEK calls the message also gives the
  cause (``throttled: ...``, ``unreachable (refused): ...``, ``unavailable: ... (503 ...)``).
* ``INTERNAL``: everything unexpected, with a generic message; the server logs the traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc

from broker.errors import (
    AuditChainError,
    BrokerConfigError,
    BrokerError,
    CredentialError,
    CustodyError,
    DuplicateError,
    EkCertificateError,
    EnrollmentError,
    GoldenValueError,
    KekError,
    KekUnavailableError,
    KeyAttributeError,
    MalformedEvidenceError,
    NonceError,
    NonceExpiredError,
    NotApprovedError,
    PolicyError,
    RevokedKeyError,
    StorageError,
    UncoveredPcrError,
    UnknownKeyError,
    UnknownPolicyObjectError,
    UnsupportedAlgorithmError,
    VerificationError,
)
from broker.model import DenialCode
from broker.server.authz import ADMIN_SERVICE, ATTESTATION_SERVICE, split_method
from broker.server.errors import (
    CallerDeniedError,
    CallerUnauthenticatedError,
    InvalidRequestError,
    RateLimitedError,
    StreamAbandonedError,
    StreamStepError,
)
from evidence.errors import EvidenceError
from pki.errors import IdentityError
from sealing.errors import InvalidKeyError, ParameterError

ATTEST_METHOD: Final = f"/{ATTESTATION_SERVICE}/Attest"
ATTESTATION_DENIED: Final = "attestation denied"
INTERNAL_MESSAGE: Final = "internal error"
#: A transient KEK fault, in any method: nothing about the vault, only that a retry may work.
KEK_UNAVAILABLE_MESSAGE: Final = "key custody is temporarily unavailable; retry later"
#: A KEK that refuses for good, outside the operator's KEK calls: the caller (a party) learns
#: that its KEK is the problem and who can look, not what the vault said.
KEK_UNUSABLE_MESSAGE: Final = (
    "the party's key encryption key cannot be used; "
    "the operator can check it with `cleanroom admin kek check`"
)

#: Admin methods whose PolicyError means "this object is invalid" rather than "refused".
_VALIDATING_METHODS: Final = frozenset(
    f"/{ADMIN_SERVICE}/{m}" for m in ("SetGoldenPcrSet", "AddParty")
)
_REGISTER_METHOD: Final = f"/{ADMIN_SERVICE}/RegisterDataKey"
#: Operator calls about one KEK, whose KekError is a precondition with its reason.
_KEK_ADMIN_METHODS: Final = frozenset(
    f"/{ADMIN_SERVICE}/{m}" for m in ("SetPartyKek", "RewrapDataKey", "CheckKek")
)


@dataclass(frozen=True)
class Status:
    """A gRPC status for a failed call. ``unexpected`` asks the caller to log a traceback."""

    code: grpc.StatusCode
    message: str
    unexpected: bool = False


def _attest_status(exc: BaseException) -> Status | None:
    """The status of a refused ``Attest``; None when the generic rules apply."""
    cause = exc.__cause__ if isinstance(exc, PolicyError) else exc
    # A denial raised "from" a lower error: look at what actually went wrong.
    if isinstance(cause, NonceExpiredError):
        return Status(grpc.StatusCode.FAILED_PRECONDITION, "nonce expired; ask for a new challenge")
    if isinstance(cause, UnknownKeyError):
        return Status(grpc.StatusCode.FAILED_PRECONDITION, "AK is not enrolled")
    if isinstance(cause, MalformedEvidenceError | EvidenceError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, "quote: malformed evidence")
    if isinstance(cause, KekUnavailableError):
        # The evidence passed and a key's KEK service failed transiently: the sidecar can ask
        # for a new challenge and try again. A KEK that refuses for good stays an opaque denial.
        return Status(grpc.StatusCode.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    if isinstance(exc, PolicyError | VerificationError | NonceError | EnrollmentError):
        return Status(grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)
    return None


def status_for(exc: BaseException, *, full_method: str) -> Status:
    """Maps an exception raised while serving ``full_method`` to a gRPC status.

    Messages are short and never contain key material; for ``Attest`` refusals they are opaque.
    """
    if isinstance(exc, StreamStepError):
        return status_for(exc.error, full_method=exc.method)
    service, _ = split_method(full_method)
    admin = service == ADMIN_SERVICE
    code = grpc.StatusCode
    if isinstance(exc, StreamAbandonedError):
        return Status(code.CANCELLED, "the client went away")

    if isinstance(exc, InvalidRequestError):
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, CallerUnauthenticatedError):
        return Status(code.UNAUTHENTICATED, exc.public_message)
    if isinstance(exc, CallerDeniedError):
        return Status(code.PERMISSION_DENIED, exc.public_message)
    if isinstance(exc, RateLimitedError):
        return Status(code.RESOURCE_EXHAUSTED, str(exc))
    if full_method == ATTEST_METHOD:
        attest = _attest_status(exc)
        if attest is not None:
            return attest
    if isinstance(exc, DuplicateError):
        return Status(code.ALREADY_EXISTS, str(exc))
    if isinstance(exc, StorageError):
        # Storage messages may hold database details; the log has them.
        return Status(code.UNAVAILABLE, "storage is temporarily unavailable; retry", True)
    if isinstance(exc, KekUnavailableError):
        if full_method in _KEK_ADMIN_METHODS:
            # The operator's own KEK calls (operator-only by the authorization table): the
            # cause class (throttled, unreachable (dns-temporary, refused, timeout), a 5xx) is
            # what tells the operator what to check. KekError messages hold no key material.
            return Status(
                code.UNAVAILABLE, f"key custody is temporarily unavailable ({exc}); retry later"
            )
        # Transient in every method; the reason (throttled, unreachable, a 5xx) is in the server
        # log and, where the call records one, in the audit log.
        return Status(code.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    if isinstance(exc, KekError):
        if full_method in _KEK_ADMIN_METHODS:
            # The operator asked about this very KEK: the reason is the answer. KekError
            # messages name the key and what Key Vault said, never key material.
            return Status(code.FAILED_PRECONDITION, str(exc))
        # Elsewhere (a party's RegisterDataKey) the vault's name, key URL and answer are the
        # operator's business: they are in the audit record and the server log.
        return Status(code.FAILED_PRECONDITION, KEK_UNUSABLE_MESSAGE)
    if isinstance(exc, CustodyError):
        if full_method == _REGISTER_METHOD:
            return Status(code.INVALID_ARGUMENT, f"sealed_data_key: {exc}")
        return Status(code.INTERNAL, "key custody failed", True)
    if isinstance(exc, UncoveredPcrError):
        # An approval or golden set that could never release a key: the message says which
        # PCRs every quote covers, which the caller can act on.
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, UnknownPolicyObjectError):
        return Status(code.NOT_FOUND, str(exc))
    if isinstance(exc, UnknownKeyError):
        # An admin call names a key that is not there; a sidecar is not enrolled.
        return Status(code.NOT_FOUND if admin else code.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, RevokedKeyError | CredentialError):
        return Status(code.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, KeyAttributeError):
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, EkCertificateError):
        return Status(code.PERMISSION_DENIED, str(exc))
    if isinstance(exc, EnrollmentError):
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, NonceExpiredError):
        return Status(code.FAILED_PRECONDITION, "nonce expired; ask for a new challenge")
    if isinstance(exc, NonceError):
        return Status(code.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, MalformedEvidenceError | UnsupportedAlgorithmError):
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, VerificationError):
        return Status(code.PERMISSION_DENIED, str(exc))
    if isinstance(exc, PolicyError):
        if full_method in _VALIDATING_METHODS:
            return Status(code.INVALID_ARGUMENT, str(exc))
        return Status(code.PERMISSION_DENIED, str(exc))
    if isinstance(exc, AuditChainError):
        return Status(code.INTERNAL, "audit log integrity check failed", True)
    if isinstance(exc, BrokerConfigError):
        return Status(code.FAILED_PRECONDITION, "the broker is misconfigured", True)
    if isinstance(exc, EvidenceError | InvalidKeyError | ParameterError | IdentityError):
        return Status(code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, BrokerError):
        return Status(code.INTERNAL, INTERNAL_MESSAGE, True)
    return Status(code.INTERNAL, INTERNAL_MESSAGE, True)


#: The metric label of each denial code (``reason`` of the attestation and key metrics).
_REASON_LABELS: Final[dict[DenialCode, str]] = {
    DenialCode.NOT_APPROVED: "not_approved",
    DenialCode.PLATFORM_NOT_ACCEPTED: "golden",
    DenialCode.ATTESTER_REVOKED: "ak",
    DenialCode.ATTESTER_UNKNOWN: "ak",
    DenialCode.EVIDENCE_INVALID: "evidence",
    DenialCode.NONCE_INVALID: "nonce",
    DenialCode.KEY_CUSTODY: "custody",
    DenialCode.KEYS_WITHHELD: "keys_withheld",
}


def reason_label(code: DenialCode) -> str:
    """The metric label for a denial code (a small fixed set)."""
    return _REASON_LABELS[code]


def attestation_reason_class(exc: BaseException | None) -> str:
    """A coarse, bounded label for why an attestation was refused (for metrics).

    A denial from the core carries its code, which decides the label; other refusals (a
    malformed request, a rate limit) are classified by their type. ``None`` means the
    attestation was refused because no key was approved.
    """
    if exc is None:
        return "not_approved"
    code = getattr(exc, "code", None)
    if isinstance(exc, PolicyError) and isinstance(code, DenialCode):
        return reason_label(code)
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    cause: BaseException | None = exc.__cause__ if isinstance(exc, PolicyError) else exc
    if cause is None:
        # A denial without a cause is the core's "no key released": nothing was approved.
        return "not_approved" if isinstance(exc, PolicyError) else "error"
    if isinstance(cause, NonceError):
        return "nonce"
    if isinstance(cause, UnknownKeyError | RevokedKeyError):
        return "ak"
    if isinstance(cause, GoldenValueError):
        return "golden"
    if isinstance(cause, CustodyError):
        # A granted key could not be unwrapped (KekError) or sealed: not the evidence's fault.
        return "custody"
    if isinstance(cause, VerificationError | EvidenceError):
        return "evidence"
    if isinstance(cause, NotApprovedError):
        return "not_approved"
    if isinstance(cause, PolicyError):
        return "policy"
    if isinstance(cause, BrokerError):
        return "evidence"
    if isinstance(exc, PolicyError):
        # Anything else the core caught while checking evidence (e.g. a malformed binding).
        return "evidence"
    return "error"


__all__ = [
    "ATTESTATION_DENIED",
    "ATTEST_METHOD",
    "INTERNAL_MESSAGE",
    "KEK_UNAVAILABLE_MESSAGE",
    "KEK_UNUSABLE_MESSAGE",
    "Status",
    "attestation_reason_class",
    "reason_label",
    "status_for",
]
