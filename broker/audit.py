"""The broker's audit log: an append-only, SHA-256 hash-chained record of every decision.

Each record carries its sequence number (1, 2, ...), the previous record's hash (64 zeros for
the first) and its own hash over a canonical encoding of every field
(:func:`broker.auditchain.canonical_bytes`), so that deleting, inserting, reordering or editing a
record breaks the chain at that point, which :meth:`AuditLog.verify_chain` finds. A one-row
chain head (last sequence and hash) is updated with every append; it serializes appenders
across threads, processes and replicas and lets verification notice a truncated tail.

The chain's encoding, hashing and checking are pure (:mod:`broker.auditchain`); the rows are
the storage layer's (the unit of work appends, :mod:`broker.storage.repositories.audit`
reads). This module joins the two with a clock.

Records hold identifiers, decisions and reasons, never key material or plaintext: callers put
key ids and digests in ``subject`` and ``evidence_digest``, not keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from broker.auditchain import (
    GENESIS_HASH,
    RECORD_FORMAT_VERSION,
    ChainReport,
    canonical_bytes,
    compute_record_hash,
    format_time,
    seal_all,
)
from broker.errors import AuditChainError, StorageError
from broker.model import AuditEntry, AuditRecord, Session
from broker.storage import Store
from broker.storage import rows as codec
from broker.storage.fast import FastCursor
from broker.storage.unit import UnitOfWork

#: The most records one list_records call returns.
MAX_LIST_LIMIT = 1000

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


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
        """Appends ``entries`` in ``uow`` (a decision's unit of work, see
        :meth:`broker.storage.Store.unit_of_work`): they commit with the unit's other writes,
        or not at all.

        On SQLite the records are sealed onto the unit's chain head at once (their times read
        from the clock while the unit holds the head, so they never run backwards along the
        chain within one clock). On PostgreSQL (a deferred unit) they are numbered as the unit
        finishes and sealed by the sealer after the commit: the returned records carry their
        sequence numbers once the unit has finished, and empty hashes
        (:meth:`list_records` returns them sealed).

        Raises:
            StorageError: a field cannot be encoded.
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        times = [self._clock() for _ in entries]
        if uow.deferred:
            # Sealed on a placeholder head only to check now that every field encodes; the
            # sealer seals them again on the real head.
            checked = seal_all(entries, (0, GENESIS_HASH), times)
            records = [replace(r, sequence=0, previous_hash="", record_hash="") for r in checked]
            uow.append_pending(records, [codec.audit_pending_values(r) for r in records])
            return records
        records = seal_all(entries, uow.head, times)
        uow.append_records(
            [codec.audit_record_values(r) for r in records], [r.parties for r in records]
        )
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
            deferred = uow.deferred
        if deferred and records:
            # The caller gets its records sealed, as on SQLite: seal them now (with whatever
            # else is pending) and read them back.
            return self._sealed([r.sequence for r in records])
        return records

    def _sealed(self, sequences: Sequence[int]) -> list[AuditRecord]:
        """The sealed records of ``sequences`` (sealing what is pending first).

        Raises:
            StorageError: the database failed, or one of them is not in the chain.
        """
        self._store.audit.seal(wait=True)
        wanted = set(sequences)
        found = {
            r.sequence: r
            for r in self._store.audit.list_records(
                min(wanted) - 1, max(wanted) - min(wanted) + 1, None
            )
            if r.sequence in wanted
        }
        missing = wanted - set(found)
        if missing:
            raise StorageError(f"audit records {sorted(missing)} are not in the chain")
        return [found[s] for s in sequences]

    def seal(self) -> int:
        """Seals every record committed so far (PostgreSQL; see
        :meth:`broker.storage.repositories.audit.AuditRepository.seal`); returns how many.

        Raises:
            StorageError: the database failed.
        """
        return self._store.audit.seal(wait=True)

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
        self._store.audit.seal(wait=True)
        return self._store.audit.list_records(after_sequence, min(limit, MAX_LIST_LIMIT), party)

    def head(self) -> tuple[int, str]:
        """The chain head: the last sequence number and its hash (0 and 64 zeros if empty).

        Publishing it elsewhere from time to time (a log line, a ticket, another party)
        anchors the chain: a later rewrite of the whole table would no longer match it.

        Raises:
            StorageError: the database failed or the head row is missing.
        """
        self._store.audit.seal(wait=True)
        return self._store.audit.head()

    def verify_chain(self) -> ChainReport:
        """Recomputes the whole chain and reports the first break, if any.

        Checks, in one consistent snapshot: sequence numbers run 1, 2, ... without gaps; each
        ``previous_hash`` is the preceding record's ``record_hash`` (the genesis hash for the
        first); each ``record_hash`` is the hash of the record's contents; the party index
        agrees with each record's parties; the last record is the chain head.

        Raises:
            StorageError: the database failed.
        """
        # What is committed and pending is sealed first, so that it is verified too; a missing
        # head is reported below rather than raised here.
        self._store.audit.seal(wait=True, missing_head_ok=True)
        return self._store.audit.verify()

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


__all__ = [
    "GENESIS_HASH",
    "MAX_LIST_LIMIT",
    "RECORD_FORMAT_VERSION",
    "AuditLog",
    "ChainReport",
    "canonical_bytes",
    "compute_record_hash",
    "format_time",
    "utcnow",
]
