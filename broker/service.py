"""The broker core's former single module, kept so that existing imports keep working.

The core is :mod:`broker.core` now: one class per use case and one composition root
(:func:`broker.core.compose.build_broker`). New code imports from there.
"""

from __future__ import annotations

from broker.core import (
    AttestOutcome,
    Broker,
    Challenge,
    EnrollmentChallenge,
    Evidence,
    WithheldKey,
    digest_evidence,
)
from broker.core.trail import Clock, utcnow
from broker.errors import AttestationRefusedError, NotApprovedError

__all__ = [
    "AttestOutcome",
    "AttestationRefusedError",
    "Broker",
    "Challenge",
    "Clock",
    "EnrollmentChallenge",
    "Evidence",
    "NotApprovedError",
    "WithheldKey",
    "digest_evidence",
    "utcnow",
]
