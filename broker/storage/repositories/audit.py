"""The audit log's rows: listing records (all, or one party's), the chain head, and reading the
whole chain in one snapshot for verification.

Appending runs in a decision's unit of work (:mod:`broker.storage.unit`); the chain's hashing
and checking are pure (:mod:`broker.auditchain`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from broker.auditchain import ChainReport, ChainVerifier
from broker.errors import StorageError
from broker.model import AuditRecord
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.schema import audit_head, audit_parties, audit_records

_VERIFY_BATCH = 1000


class AuditRepository:
    """Reads of the audit chain."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
        with self._db.transaction("list audit records") as conn:
            rows = conn.execute(stmt).all()
        return [codec.audit_record(r) for r in rows]

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
                rows = conn.execute(
                    sa.select(audit_records)
                    .where(audit_records.c.sequence > last)
                    .order_by(audit_records.c.sequence)
                    .limit(_VERIFY_BATCH)
                ).all()
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


def _head(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(
        sa.select(audit_head.c.sequence, audit_head.c.record_hash).where(audit_head.c.id == 1)
    ).one_or_none()
    return None if row is None else (int(row.sequence), str(row.record_hash))
