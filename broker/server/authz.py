"""Who may call what: the broker's per-method authorization table.

Callers are named by the SPIFFE ID in their client certificate. The role is the ID's kind:

* ``operator``: EKs, AKs, golden PCR sets, parties, key custody (each party's KEK, rewrapping
  data keys, checking a KEK), and reading everything (keys, approvals, the audit log and its
  verification).
* ``party/<name>``: the broker's info, its own data keys and approvals, its own audit records,
  and reading the parties and golden sets it needs to write an approval.
* ``sidecar/<id>``: the attestation service only.

The table is deny-by-default: a method missing from it is refused for everyone. What depends on
the data (a party acting on its own keys only) is enforced by the core's use cases
(:mod:`broker.core`), and by the servicers' filtering of list results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from broker.server.errors import CallerDeniedError
from pki.identity import SpiffeId

ATTESTATION_SERVICE: Final = "cleanroom.v1.AttestationService"
ADMIN_SERVICE: Final = "cleanroom.v1.AdminService"
HEALTH_SERVICE: Final = "grpc.health.v1.Health"
REFLECTION_SERVICES: Final = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

OPERATOR: Final = frozenset({"operator"})
PARTY: Final = frozenset({"party"})
SIDECAR: Final = frozenset({"sidecar"})
OPERATOR_OR_PARTY: Final = OPERATOR | PARTY

_ADMIN_RULES: Final[Mapping[str, frozenset[str]]] = {
    "GetBrokerInfo": OPERATOR_OR_PARTY,
    "EnrollEk": OPERATOR,
    "RevokeEk": OPERATOR,
    "ReadmitEk": OPERATOR,
    "ListEks": OPERATOR,
    "EnrollAk": OPERATOR,
    "RevokeAk": OPERATOR,
    "ListAks": OPERATOR,
    "SetGoldenPcrSet": OPERATOR,
    "ListGoldenPcrSets": OPERATOR_OR_PARTY,
    "DeleteGoldenPcrSet": OPERATOR,
    "AddParty": OPERATOR,
    "ListParties": OPERATOR_OR_PARTY,
    "RegisterDataKey": PARTY,
    # A party sees its own keys, approvals and records; the operator sees all of them.
    "ListDataKeys": OPERATOR_OR_PARTY,
    "ApproveWorkload": PARTY,
    "RevokeApproval": PARTY,
    "ListApprovals": OPERATOR_OR_PARTY,
    "ListAuditRecords": OPERATOR_OR_PARTY,
    "VerifyAuditLog": OPERATOR,
    # Key custody: which KEK wraps whose keys is the operator's business. A party could
    # otherwise point its keys at a KEK it controls, or move another party's keys.
    "SetPartyKek": OPERATOR,
    "ListPartyKeks": OPERATOR,
    "RewrapDataKey": OPERATOR,
    "CheckKek": OPERATOR,
    # The database URL, KEK fingerprints and counts are the operator's.
    "GetStatus": OPERATOR,
}

_ATTESTATION_RULES: Final[Mapping[str, frozenset[str]]] = {
    "StartEnrollment": SIDECAR,
    "CompleteEnrollment": SIDECAR,
    "GetChallenge": SIDECAR,
    "Attest": SIDECAR,
    "AttestStream": SIDECAR,
    "EndSession": SIDECAR,
}

#: Services every role of the broker's trust domain may use (health and reflection).
OPEN_SERVICES: Final = frozenset({HEALTH_SERVICE, *REFLECTION_SERVICES})
#: The roles that may use :data:`OPEN_SERVICES`: every role with methods of its own. The
#: broker's own identity (``/broker``) is none of them: it may call nothing, as documented.
OPEN_SERVICE_KINDS: Final = OPERATOR | PARTY | SIDECAR


def _full(service: str, rules: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    return {f"/{service}/{method}": kinds for method, kinds in rules.items()}


#: Full gRPC method name (``/package.Service/Method``) -> identity kinds allowed to call it.
RULES: Final[Mapping[str, frozenset[str]]] = {
    **_full(ADMIN_SERVICE, _ADMIN_RULES),
    **_full(ATTESTATION_SERVICE, _ATTESTATION_RULES),
}


def split_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``; ``("", full)`` if malformed."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def authorize(full_method: str, caller: SpiffeId, *, trust_domain: str) -> None:
    """Checks that ``caller`` may call ``full_method``.

    Raises:
        CallerDeniedError: the caller belongs to another trust domain, or its kind of identity
            may not call the method (or the method is not in the table at all).
    """
    if caller.trust_domain != trust_domain:
        raise CallerDeniedError(
            f"{caller} belongs to trust domain {caller.trust_domain!r}, not {trust_domain!r}",
            public_message="permission denied: foreign trust domain",
        )
    service, _ = split_method(full_method)
    if service in OPEN_SERVICES:
        if caller.kind not in OPEN_SERVICE_KINDS:
            raise CallerDeniedError(
                f"{caller} ({caller.kind}) may not call {full_method}",
                public_message=f"permission denied: {full_method} is not open to this identity",
            )
        return
    allowed = RULES.get(full_method)
    if allowed is None:
        raise CallerDeniedError(f"{full_method} is not open to any caller")
    if caller.kind not in allowed:
        roles = " or ".join(sorted(allowed))
        raise CallerDeniedError(
            f"{caller} ({caller.kind}) may not call {full_method}; it needs {roles}",
            public_message=f"permission denied: {full_method} needs the {roles} role",
        )


__all__ = [
    "ADMIN_SERVICE",
    "ATTESTATION_SERVICE",
    "HEALTH_SERVICE",
    "OPEN_SERVICES",
    "OPEN_SERVICE_KINDS",
    "REFLECTION_SERVICES",
    "RULES",
    "authorize",
    "split_method",
]
