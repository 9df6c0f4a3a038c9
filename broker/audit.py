"""The broker's audit log: an append-only, SHA-256 hash-chained record of every decision.

Each record carries its sequence number (1, 2, ...), the previous record's hash (64 zeros for
the first) and its own hash over a canonical encoding of every field (:func:`canonical_bytes`),
so that deleting, inserting, reordering or editing a record breaks the chain at that point,
which :meth:`AuditLog.verify_chain` finds. A one-row chain head (last sequence and hash) is
updated with every append; it serializes appenders across threads, processes and replicas and
lets verification notice a truncated tail.

Records hold identifiers, decisions and reasons, never key material or plaintext: callers put
key ids and digests in ``subject`` and ``evidence_digest``, not keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from broker.errors import AuditChainError, StorageError
from broker.model import AuditEntry, AuditRecord, Session
from broker.storage import Store
from broker.storage.fast import FastCursor
from broker.storage.schema import GENESIS_HASH, audit_head, audit_parties, audit_records
from broker.storage.unit import UnitOfWork

#: Version of the canonical encoding, hashed into every record.
RECORD_FORMAT_VERSION = 1

#: The most records one list_records call returns.
MAX_LIST_LIMIT = 1000

_VERIFY_BATCH = 1000

# json.dumps with any option builds a new encoder per call; these are built once (an encoder
# keeps no state between calls, so threads can share them).
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    """A record's time as hashed: UTC, ISO 8601, always six fractional digits, ``Z``."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    v = t.astimezone(UTC)
    # What strftime("%Y-%m-%dT%H:%M:%S.%fZ") gives, at a fraction of its cost (this runs for
    # every record appended).
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T"
        f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}Z"
    )


def canonical_bytes(record: AuditRecord) -> bytes:
    """The bytes that ``record_hash`` is the SHA-256 of: every field but the hash itself.

    A JSON object with sorted keys, no whitespace, strings unescaped beyond what JSON requires,
    UTF-8: for this object (ASCII keys, strings, integers) that is exactly RFC 8785 (JCS)
    canonical JSON, so other tools can recompute it. ``parties`` keeps the caller's order.

    Raises:
        ValueError: a field is not encodable (a naive time, or a string with lone surrogates).
    """
    return _canonical(
        record.sequence,
        record.time,
        record.actor,
        record.action,
        record.subject,
        record.decision,
        record.reason,
        record.evidence_digest,
        record.parties,
        record.previous_hash,
    )


def _canonical(
    sequence: int,
    time: datetime,
    actor: str,
    action: str,
    subject: str,
    decision: str,
    reason: str,
    evidence_digest: str,
    parties: Sequence[str],
    previous_hash: str,
) -> bytes:
    doc: dict[str, Any] = {
        "v": RECORD_FORMAT_VERSION,
        "sequence": sequence,
        "time": format_time(time),
        "actor": actor,
        "action": action,
        "subject": subject,
        "decision": decision,
        "reason": reason,
        "evidence_digest": evidence_digest,
        "parties": list(parties),
        "previous_hash": previous_hash,
    }
    text = _CANONICAL_JSON.encode(doc)
    return text.encode("utf-8")


def compute_record_hash(record: AuditRecord) -> str:
    """The hex SHA-256 of :func:`canonical_bytes` (``record.record_hash`` is not an input).

    Raises:
        ValueError: a field is not encodable.
    """
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """The result of a chain verification. ``problem`` is empty when ``valid``."""

    valid: bool
    records_checked: int
    first_bad_sequence: int | None = None
    problem: str = ""


class AuditLog:
    """Appends to, lists and verifies the audit chain kept in a :class:`~broker.storage.Store`."""

    def __init__(self, store: Store, *, clock: Clock = utcnow) -> None:
        self._store = store
        self._clock = clock

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Appends one record (in a transaction of its own) and returns it as stored.

        Raises:
            StorageError: the database failed, or a field cannot be encoded.
        """
        return self.append_many([entry])[0]

    def append_in(self, uow: UnitOfWork, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Seals ``entries`` onto the chain head of ``uow`` (a decision's unit of work, see
        :meth:`broker.storage.Store.unit_of_work`) and stores them there: they commit with the
        unit's other writes, or not at all.

        The record times are read from the clock while the unit holds the head, so they never
        run backwards along the chain within one clock.

        Raises:
            StorageError: a field cannot be encoded.
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        sequence, previous = uow.head
        records: list[AuditRecord] = []
        for entry in entries:
            sequence += 1
            record = _seal(entry, sequence, self._clock(), previous)
            previous = record.record_hash
            records.append(record)
        uow.append_records([_record_values(r) for r in records], [r.parties for r in records])
        return records

    def append_many(
        self,
        entries: Sequence[AuditEntry],
        *,
        session: Session | None = None,
        within: Callable[[FastCursor], object] | None = None,
    ) -> list[AuditRecord]:
        """Appends several records in one unit of work (consecutive sequence numbers); with
        ``session``, records that attested session in the same transaction, so that a release
        and its session are stored together or not at all (and with one commit).

        ``within`` runs further statements of the caller's in the same transaction, after the
        chain head is locked and before the records are inserted (e.g. the nonce that an
        audited challenge issues): the records and those rows commit together or not at all,
        with one commit between them. It must not commit or roll back.

        The chain head row is locked first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's
        write transactions are ``BEGIN IMMEDIATE``), so appends from any number of threads,
        processes or replicas queue up and each sees the previous one's hash.

        Raises:
            DuplicateError: a session with ``session``'s id exists (nothing is appended).
            UnknownKeyError: ``session``'s AK is not enrolled (nothing is appended).
            StorageError: the database failed, or a field cannot be encoded (nothing is
                appended, and nothing ``within`` wrote is kept).
        """
        if not entries and within is None:
            if session is not None:
                self._store.add_session(session)
            return []
        duplicate, missing = (
            self._store.session_errors(session) if session is not None else (None, None)
        )
        with self._store.fast_unit_of_work(
            "append audit records", duplicate=duplicate, missing_reference=missing
        ) as uow:
            if within is not None:
                within(uow.cursor)
            records = self.append_in(uow, entries)
            if session is not None:
                self._store.insert_session(uow.cursor, session)
        return records

    def list_records(
        self, after_sequence: int = 0, limit: int = 100, party: str | None = None
    ) -> list[AuditRecord]:
        """Records after ``after_sequence``, in order, at most ``limit`` (capped at
        :data:`MAX_LIST_LIMIT`); with ``party``, only records whose parties include it.

        Raises:
            ValueError: ``limit`` is below 1.
            StorageError: the database failed.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        limit = min(limit, MAX_LIST_LIMIT)
        stmt = sa.select(audit_records).order_by(audit_records.c.sequence).limit(limit)
        if party is None:
            stmt = stmt.where(audit_records.c.sequence > after_sequence)
        else:
            stmt = stmt.join(
                audit_parties, audit_parties.c.sequence == audit_records.c.sequence
            ).where(audit_parties.c.party == party, audit_parties.c.sequence > after_sequence)
        with self._store.transaction("list audit records") as conn:
            rows = conn.execute(stmt).all()
        return [_record(r) for r in rows]

    def head(self) -> tuple[int, str]:
        """The chain head: the last sequence number and its hash (0 and 64 zeros if empty).

        Publishing it elsewhere from time to time (a log line, a ticket, another party)
        anchors the chain: a later rewrite of the whole table would no longer match it.

        Raises:
            StorageError: the database failed or the head row is missing.
        """
        with self._store.transaction("read audit head") as conn:
            row = conn.execute(
                sa.select(audit_head.c.sequence, audit_head.c.record_hash).where(
                    audit_head.c.id == 1
                )
            ).one_or_none()
        if row is None:
            raise StorageError("the audit chain head row is missing (database tampered?)")
        return int(row.sequence), str(row.record_hash)

    def verify_chain(self) -> ChainReport:
        """Recomputes the whole chain and reports the first break, if any.

        Checks, in one consistent snapshot: sequence numbers run 1, 2, ... without gaps; each
        ``previous_hash`` is the preceding record's ``record_hash`` (the genesis hash for the
        first); each ``record_hash`` is the hash of the record's contents; the party index
        agrees with each record's parties; the last record is the chain head.

        Raises:
            StorageError: the database failed.
        """
        with self._store.transaction("verify audit chain", snapshot=True) as conn:
            return _verify(conn)

    def verify_chain_or_raise(self) -> ChainReport:
        """:meth:`verify_chain`, raising on a broken chain.

        Raises:
            AuditChainError: the chain is broken (the message names the first bad record).
            StorageError: the database failed.
        """
        report = self.verify_chain()
        if not report.valid:
            raise AuditChainError(
                f"audit chain broken at record {report.first_bad_sequence}: {report.problem}"
            )
        return report


def _seal(entry: AuditEntry, sequence: int, time: datetime, previous_hash: str) -> AuditRecord:
    time = time.astimezone(UTC)
    # A party named twice (an approving party that is also an output recipient, say) is named
    # once: the list says who the record concerns, in the caller's order.
    parties = tuple(dict.fromkeys(entry.parties))
    try:
        canonical = _canonical(
            sequence,
            time,
            entry.actor,
            entry.action,
            entry.subject,
            entry.decision,
            entry.reason,
            entry.evidence_digest,
            parties,
            previous_hash,
        )
    except ValueError as e:
        raise StorageError(f"audit entry cannot be encoded: {e}") from e
    return AuditRecord(
        sequence=sequence,
        time=time,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        decision=entry.decision,
        reason=entry.reason,
        evidence_digest=entry.evidence_digest,
        parties=parties,
        previous_hash=previous_hash,
        record_hash=hashlib.sha256(canonical).hexdigest(),
    )


def _record_values(r: AuditRecord) -> dict[str, Any]:
    return {
        "sequence": r.sequence,
        "recorded_at": r.time,
        "actor": r.actor,
        "action": r.action,
        "subject": r.subject,
        "decision": r.decision,
        "reason": r.reason,
        "evidence_digest": r.evidence_digest,
        "parties": _COMPACT_JSON.encode(list(r.parties)),
        "previous_hash": r.previous_hash,
        "record_hash": r.record_hash,
    }


def _record(row: Row[Any]) -> AuditRecord:
    return AuditRecord(
        sequence=int(row.sequence),
        time=row.recorded_at,
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        decision=row.decision,
        reason=row.reason,
        evidence_digest=row.evidence_digest,
        parties=tuple(json.loads(row.parties)),
        previous_hash=row.previous_hash,
        record_hash=row.record_hash,
    )


def _verify(conn: Connection) -> ChainReport:
    head = conn.execute(
        sa.select(audit_head.c.sequence, audit_head.c.record_hash).where(audit_head.c.id == 1)
    ).one_or_none()
    expected = 1
    previous = GENESIS_HASH
    checked = 0

    def bad(sequence: int, problem: str) -> ChainReport:
        return ChainReport(
            valid=False, records_checked=checked, first_bad_sequence=sequence, problem=problem
        )

    last = 0
    while True:
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
                record = _record(row)
            except (ValueError, TypeError) as e:
                return bad(int(row.sequence), f"record cannot be decoded: {e}")
            if record.sequence != expected:
                if record.sequence > expected:
                    return bad(
                        expected,
                        f"record {expected} is missing (next is {record.sequence}): deleted",
                    )
                return bad(record.sequence, "sequence out of order")
            if record.previous_hash != previous:
                return bad(
                    record.sequence,
                    "previous_hash does not match the preceding record: a record was "
                    "inserted, deleted or replaced before it",
                )
            try:
                recomputed = compute_record_hash(record)
            except ValueError as e:
                return bad(record.sequence, f"record cannot be encoded: {e}")
            if recomputed != record.record_hash:
                return bad(record.sequence, "record_hash does not match the contents: modified")
            if index.get(record.sequence, set()) != set(record.parties):
                return bad(record.sequence, "the party index disagrees with the record")
            previous = record.record_hash
            expected += 1
            checked += 1
    if head is None:
        return bad(expected, "the chain head row is missing")
    head_seq, head_hash = int(head.sequence), str(head.record_hash)
    if head_seq > checked:
        return bad(checked + 1, f"records {checked + 1}..{head_seq} are missing: truncated")
    if head_seq < checked:
        return bad(head_seq + 1, f"records after {head_seq} were added outside the log")
    if head_hash != previous:
        return bad(head_seq, "the chain head's hash does not match the last record")
    return ChainReport(valid=True, records_checked=checked)
