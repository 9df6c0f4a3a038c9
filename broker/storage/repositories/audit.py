"""The audit log's rows: listing records (all, or one party's), the chain head, reading the
whole chain in one snapshot for verification, and sealing PostgreSQL's pending records.

Appending runs in a decision's unit of work (:mod:`broker.storage.unit`); the chain's hashing
and checking are pure (:mod:`broker.auditchain`).

Sealing (PostgreSQL, docs/storage.md "Batch sequencing"): decisions commit their records to
``audit_pending``, each numbered with its final sequence number; :meth:`AuditRepository.seal`
locks the chain head, takes pending records in sequence order as long as the numbers run on
without a gap, hashes them onto the head, moves them into ``audit_records`` and moves the head,
thousands per transaction. A gap is a number taken by a transaction that has not committed: it
is either still running (its row appears at its commit) or it never will (it rolled back, or
its broker was killed). The sealer stops at a gap, and only once it has stood for
:data:`GAP_GRACE_SECONDS` fills it with a *void* record, by inserting that number into
``audit_pending`` itself: the primary key makes the void and a late commit of the same number
exclusive (the insert waits for a transaction still writing that row, and then either finds it
committed or takes the number), so a decision is never left without its record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.engine import Connection

from broker.auditchain import ChainReport, ChainVerifier, seal
from broker.errors import StorageError
from broker.model import AuditEntry, AuditRecord
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.schema import audit_head, audit_parties, audit_pending, audit_records

_VERIFY_BATCH = 1000

#: Pending records sealed per statement batch (one SELECT, one INSERT of each kind, one DELETE).
SEAL_BATCH: Final = 2000

#: How long a gap in the pending numbers must stand before the sealer voids it. A transaction
#: takes its numbers in its last statements, one round trip before its commit, so a gap that
#: outlives this is a transaction that died or rolled back.
GAP_GRACE_SECONDS: Final = 0.5

#: What a void record says (its subject is empty, its parties none).
VOID_ACTION: Final = "audit.void"
VOID_REASON: Final = (
    "this sequence number was taken by a transaction that did not commit (rolled back, or its "
    "broker stopped); nothing was decided under it"
)


class AuditRepository:
    """Reads of the audit chain."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] | None = None) -> None:
        self._db = db
        self._clock = clock or (lambda: datetime.now(UTC))
        # The gap this process's sealer stopped at, and when it first saw it.
        self._gap: tuple[int, float] | None = None
        self._gap_lock = threading.Lock()

    def list_records(self, after_sequence: int, limit: int, party: str | None) -> list[AuditRecord]:
        """Records after ``after_sequence``, in order, at most ``limit``; with ``party``, only
        records whose parties include it (through the party index).

        Raises:
            StorageError: the database failed.
        """
        stmt = sa.select(audit_records).order_by(audit_records.c.sequence).limit(limit)
        if party is None:
            stmt = stmt.where(audit_records.c.sequence > after_sequence)
        else:
            stmt = stmt.join(
                audit_parties, audit_parties.c.sequence == audit_records.c.sequence
            ).where(audit_parties.c.party == party, audit_parties.c.sequence > after_sequence)
        return self._db.select_all("list audit records", stmt, codec.audit_record)

    def head(self) -> tuple[int, str]:
        """The chain head row: the last sequence number and its hash.

        Raises:
            StorageError: the database failed or the head row is missing.
        """
        with self._db.transaction("read audit head") as conn:
            head = _head(conn)
        if head is None:
            raise StorageError("the audit chain head row is missing (database tampered?)")
        return head

    def verify(self) -> ChainReport:
        """Feeds every record, in one snapshot, to a :class:`~broker.auditchain.ChainVerifier`.

        Raises:
            StorageError: the database failed.
        """
        with self._db.transaction("verify audit chain", snapshot=True) as conn:
            head = _head(conn)
            verifier = ChainVerifier()
            last = 0
            while not verifier.broken:
                rows = conn.execute(_batch_after(audit_records, last, _VERIFY_BATCH)).all()
                if not rows:
                    break
                first_seq, last = int(rows[0].sequence), int(rows[-1].sequence)
                index: dict[int, set[str]] = {}
                for party, seq in conn.execute(
                    sa.select(audit_parties.c.party, audit_parties.c.sequence).where(
                        audit_parties.c.sequence.between(first_seq, last)
                    )
                ):
                    index.setdefault(int(seq), set()).add(str(party))
                for row in rows:
                    try:
                        record = codec.audit_record(row)
                    except (ValueError, TypeError) as e:
                        verifier.undecodable(int(row.sequence), e)
                        break
                    verifier.add(record, index.get(record.sequence, set()))
                    if verifier.broken:
                        break
        return verifier.finish(head)

    def seal(self, *, wait: bool = True, missing_head_ok: bool = False) -> int:
        """Seals pending records onto the chain (PostgreSQL; nothing to do on SQLite) and
        returns how many it sealed.

        With ``wait``, waits for another sealer holding the head, and for a gap to be settled
        (its transaction's commit, or :data:`GAP_GRACE_SECONDS`, after which it is voided), so
        that every record committed before the call is sealed when it returns. Without it
        (the background sealer), returns at once when another sealer holds the head and stops
        at an unsettled gap. With ``missing_head_ok`` a missing head row (a tampered
        database, which verification reports) seals nothing instead of raising.

        Raises:
            StorageError: the database failed, or (with ``wait``) the head row is missing.
        """
        if self._db.dialect != "postgresql":
            return 0
        total = 0
        while True:
            sealed, gap = self._seal_once(wait=wait, missing_head_ok=missing_head_ok)
            total += max(sealed, 0)
            if gap is None or not wait:
                return total
            # Everything before the gap is sealed; wait out its grace, then look again.
            time.sleep(min(0.05, GAP_GRACE_SECONDS))

    def try_seal(self) -> int | None:
        """One sealing transaction that does not wait (the background sealer's): how many it
        sealed, or None when another sealer holds the chain head (PostgreSQL; 0 on SQLite).

        Raises:
            StorageError: the database failed.
        """
        if self._db.dialect != "postgresql":
            return 0
        sealed, _gap = self._seal_once(wait=False, missing_head_ok=True)
        return None if sealed < 0 else sealed

    def _seal_once(self, *, wait: bool, missing_head_ok: bool) -> tuple[int, int | None]:
        """One sealing transaction; returns how many it sealed (-1: without ``wait``, another
        sealer held the head) and the unsettled gap it stopped at, if any."""
        total = 0
        stopped_at: int | None = None
        with self._db.transaction("seal audit records", write=True) as conn:
            lock = sa.select(audit_head.c.sequence, audit_head.c.record_hash).where(
                audit_head.c.id == 1
            )
            head_row = conn.execute(
                lock.with_for_update() if wait else lock.with_for_update(skip_locked=True)
            ).one_or_none()
            if head_row is None:
                if wait and not missing_head_ok:
                    raise StorageError("the audit chain head row is missing (database tampered?)")
                return (0 if wait else -1), None
            sequence, previous = int(head_row.sequence), str(head_row.record_hash)
            while True:
                rows = conn.execute(_batch_after(audit_pending, sequence, SEAL_BATCH)).all()
                if not rows:
                    break
                if int(rows[0].sequence) != sequence + 1:
                    if not self._settle_gap(conn, sequence + 1):
                        stopped_at = sequence + 1
                        break
                    continue
                records: list[AuditRecord] = []
                for row in rows:
                    if int(row.sequence) != sequence + 1:
                        break
                    record = seal(_entry(row), sequence + 1, row.recorded_at, previous)
                    records.append(record)
                    sequence, previous = record.sequence, record.record_hash
                conn.execute(
                    sa.insert(audit_records), [codec.audit_record_values(r) for r in records]
                )
                index = [
                    {"party": party, "sequence": r.sequence}
                    for r in records
                    for party in sorted(set(r.parties))
                ]
                if index:
                    conn.execute(sa.insert(audit_parties), index)
                conn.execute(
                    sa.delete(audit_pending).where(
                        audit_pending.c.sequence.between(records[0].sequence, sequence)
                    )
                )
                total += len(records)
            if total:
                conn.execute(
                    sa.update(audit_head)
                    .where(audit_head.c.id == 1)
                    .values(sequence=sequence, record_hash=previous)
                )
        return total, stopped_at

    def _settle_gap(self, conn: Connection, missing: int) -> bool:
        """Whether the gap at ``missing`` is settled now: voided after its grace (or found
        committed meanwhile). False while it is still within its grace."""
        now = time.monotonic()
        with self._gap_lock:
            if self._gap is None or self._gap[0] != missing:
                self._gap = (missing, now)
            if now - self._gap[1] < GAP_GRACE_SECONDS:
                return False
            self._gap = None
        # Waits for a transaction still inserting this number; does nothing if it committed.
        conn.execute(
            pg_dialect.insert(audit_pending)
            .values(
                sequence=missing,
                recorded_at=self._clock(),
                actor="broker",
                action=VOID_ACTION,
                subject="",
                decision="void",
                reason=VOID_REASON,
                evidence_digest="",
                parties="[]",
            )
            .on_conflict_do_nothing(index_elements=["sequence"])
        )
        return True


def _batch_after(table: sa.Table, sequence: int, limit: int) -> sa.Select[Any]:
    """The next ``limit`` rows of a table numbered by ``sequence`` (the sealed records, the
    pending ones), after ``sequence``, in order."""
    return (
        sa.select(table).where(table.c.sequence > sequence).order_by(table.c.sequence).limit(limit)
    )


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        decision=row.decision,
        reason=row.reason,
        evidence_digest=row.evidence_digest,
        parties=tuple(codec.json_list(row.parties)),
    )


def _head(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(
        sa.select(audit_head.c.sequence, audit_head.c.record_hash).where(audit_head.c.id == 1)
    ).one_or_none()
    return None if row is None else (int(row.sequence), str(row.record_hash))
