"""What every use case of the broker core shares: the clock and the way a decision is recorded.

Every decision, allowed or denied, goes to the audit log with its exact reason. A change and its
record commit in one unit of work (:meth:`AuditTrail.record_in`); a decision that changes nothing
(a refusal, a check) is recorded on its own (:meth:`AuditTrail.record`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime

from broker.audit import AuditLog
from broker.errors import BrokerError, StorageError
from broker.model import AuditEntry, AuditRecord
from broker.storage.unit import UnitOfWork
from evidence.pcr import WORKLOAD_PCR
from pki.identity import SpiffeId
from sealing.errors import SealingError

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def entry(
    actor: SpiffeId | str,
    action: str,
    subject: str,
    decision: str,
    reason: str = "",
    *,
    evidence_digest: str = "",
    parties: Sequence[str] = (),
) -> AuditEntry:
    """An audit entry with the actor as its string form."""
    return AuditEntry(
        actor=str(actor),
        action=action,
        subject=subject,
        decision=decision,
        reason=reason,
        evidence_digest=evidence_digest,
        parties=tuple(parties),
    )


def digest_evidence(attest: bytes, signature: bytes) -> str:
    """The digest an attestation's audit records carry (hex SHA-256 of the quote and its
    signature), so that a retried quote can be matched; empty when there is no quote."""
    quoted = attest + signature
    return hashlib.sha256(quoted).hexdigest() if quoted else ""


def quoted_pcrs(boot_pcrs: Sequence[int]) -> frozenset[int]:
    """The PCRs every quote covers: PCR 23 and ``boot_pcrs`` (every challenge names them)."""
    return frozenset((WORKLOAD_PCR, *boot_pcrs))


class AuditTrail:
    """The use cases' way into the audit log."""

    def __init__(self, audit: AuditLog) -> None:
        self.log = audit

    def record(
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
        """Records a decision that changes nothing (a refusal, a check) on its own.

        Raises:
            StorageError, AuditChainError: the record could not be written.
        """
        return self.log.append(
            entry(
                actor,
                action,
                subject,
                decision,
                reason,
                evidence_digest=evidence_digest,
                parties=parties,
            )
        )

    def record_in(
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
        """Records a decision in the unit of work that makes its change.

        Raises:
            StorageError, AuditChainError: the record could not be written (the unit rolls back).
        """
        self.log.append_in(uow, [entry(actor, action, subject, decision, reason, parties=parties)])

    @contextmanager
    def allowed_change(
        self,
        unit: AbstractContextManager[UnitOfWork],
        actor: SpiffeId | str,
        action: str,
        subject: str,
        reason: str = "",
        *,
        parties: Sequence[str] = (),
    ) -> Iterator[UnitOfWork]:
        """The unit of work of an allowed change: the block writes the change in it, then the
        ``allow`` record is written in the same unit, so that the change and its record commit
        together (neither does when the block raises).

        Raises:
            StorageError, AuditChainError: the record could not be written (the unit rolls back).
        """
        with unit as uow:
            yield uow
            self.record_in(uow, actor, action, subject, "allow", reason, parties=parties)

    @contextmanager
    def refusal_recorded(
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
            self.record(actor, action, subject, "deny", str(e), parties=parties)
            raise


__all__ = ["AuditTrail", "Clock", "digest_evidence", "entry", "quoted_pcrs", "utcnow"]
