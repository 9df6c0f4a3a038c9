"""The broker's application core, one class per use case, wired in one place.

* :class:`~broker.core.enrollment.Enrollment`: EKs and AKs (operator enrollment, credential
  activation by a sidecar), revocation and re-admission.
* :class:`~broker.core.attestation.Attestation`: challenges, attestation and release, session end.
* :class:`~broker.core.administration.PolicyAdministration`: golden PCR sets, parties, data keys,
  workload approvals and their revocation, the audit log's reading and verification.
* :class:`~broker.core.custody.KeyCustody`: which KEK wraps a party's keys, KEK checks, rewraps.
* :class:`~broker.core.operations.Operations`: what the transport needs to run (refusal records,
  nonce upkeep, status, readiness).

:func:`~broker.core.compose.build_broker` is the composition root; the resulting
:class:`~broker.core.compose.Broker` is what the gRPC servicers call. Transport-independent:
the servicers translate messages to these calls and errors to status codes. Every decision,
allowed or denied, is written to the audit log with its exact reason; the caller of a denied
release learns only that it was denied.

Authorization by role (operator, party, sidecar) happens in the gRPC interceptor; the core
enforces what depends on the data: a party acts only on its own keys, approvals and records.
"""

from __future__ import annotations

from broker.core.administration import PolicyAdministration
from broker.core.attestation import (
    Attestation,
    AttestOutcome,
    Challenge,
    Evidence,
    WithheldKey,
)
from broker.core.compose import Broker, build_broker
from broker.core.custody import KeyCustody, PartyKekChoice
from broker.core.enrollment import Enrollment, EnrollmentChallenge
from broker.core.operations import Operations, StoreStatus
from broker.core.trail import digest_evidence

__all__ = [
    "AttestOutcome",
    "Attestation",
    "Broker",
    "Challenge",
    "Enrollment",
    "EnrollmentChallenge",
    "Evidence",
    "KeyCustody",
    "Operations",
    "PartyKekChoice",
    "PolicyAdministration",
    "StoreStatus",
    "WithheldKey",
    "build_broker",
    "digest_evidence",
]
