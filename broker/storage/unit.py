"""The unit of work: one decision's database transaction, with the audit chain head locked.

Every decision of the broker (an enrollment, a key registration, an approval or its revocation,
an AK or EK revocation, a KEK operation, a release or a denial with its nonce and session)
commits its state change and its audit records in one :class:`UnitOfWork`, or nothing at all:
a crash, a failed statement or an exception anywhere inside leaves neither the object without
its record nor the record without its object.

Two ways to append, by backend:

* **SQLite** (``deferred`` false): the unit reads the audit chain head first (SQLite's ``BEGIN
  IMMEDIATE`` has taken the whole file, so writers are serialized anyway); records are sealed
  onto it (hashed) as they are appended and the head moves at :meth:`UnitOfWork.finish`.
* **PostgreSQL** (``deferred`` true, docs/storage.md "Batch sequencing"): the unit takes no
  chain lock. At :meth:`UnitOfWork.finish`, its last statements, each record is inserted into
  ``audit_pending`` with the next value of the ``audit_tickets`` sequence, which is its final
  sequence number in the chain; the sealer (:meth:`broker.storage.repositories.audit.
  AuditRepository.seal`) later hashes pending records onto the chain in sequence order, many
  per transaction. Numbers are taken after every other statement of the unit, so of two units
  that conflict on a row (a release that locks its AK and approvals ``FOR SHARE``, a revocation
  that updates them), the one that waited gets the later numbers: the chain keeps the order in
  which they committed.

The hash-chain computation stays pure in :mod:`broker.auditchain`; this module only stores the
records it is handed and moves the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from broker.errors import StorageError
from broker.model import AuditRecord
from broker.storage.fast import FastCursor, FastPath, FastStatement
from broker.storage.schema import (
    AUDIT_TICKETS,
    audit_head,
    audit_parties,
    audit_pending,
    audit_records,
)


class ChainStatements:
    """The audit chain's statements, compiled once for a store's backend."""

    def __init__(self, fast: FastPath) -> None:
        self.lock_head: FastStatement = fast.prepare(
            sa.select(audit_head.c.sequence, audit_head.c.record_hash)
            .where(audit_head.c.id == 1)
            .with_for_update()
        )
        self.insert_record: FastStatement = fast.prepare(sa.insert(audit_records))
        self.insert_party: FastStatement = fast.prepare(sa.insert(audit_parties))
        self.update_head: FastStatement = fast.prepare(
            sa.update(audit_head)
            .where(audit_head.c.id == 1)
            .values(sequence=sa.bindparam("seq"), record_hash=sa.bindparam("hash"))
        )
        self.insert_pending: FastStatement | None = None
        if fast.dialect == "postgresql":
            self.insert_pending = fast.prepare(
                sa.insert(audit_pending)
                .values(
                    sequence=sa.func.nextval(AUDIT_TICKETS),
                    **{
                        c.name: sa.bindparam(c.name)
                        for c in audit_pending.c
                        if c.name != "sequence"
                    },
                )
                .returning(audit_pending.c.sequence)
            )


class UnitOfWork:
    """One open decision transaction (see the module docstring); made by
    :meth:`broker.storage.Store.unit_of_work` or :meth:`~broker.storage.Store.fast_unit_of_work`.

    ``cursor`` runs the hot path's prepared statements in the transaction; ``conn`` (units of
    :meth:`~broker.storage.Store.unit_of_work` only) runs SQLAlchemy Core statements in the same
    transaction. Never commit or roll back through either: the unit does, when its block ends.
    """

    def __init__(
        self,
        *,
        cursor: FastCursor,
        chain: ChainStatements,
        conn: Connection | None = None,
        deferred: bool = False,
    ) -> None:
        self.cursor = cursor
        self._conn = conn
        self._chain = chain
        self._moved = False
        #: Whether records are numbered now and sealed later (PostgreSQL; see the module
        #: docstring), rather than sealed onto the head in this transaction.
        self.deferred = deferred
        self._pending: list[tuple[list[AuditRecord], list[dict[str, Any]]]] = []
        if deferred:
            self._sequence, self._hash = 0, ""
            return
        head = cursor.one(chain.lock_head, {})
        if head is None:
            raise StorageError("the audit chain head row is missing (database tampered?)")
        self._sequence = int(head.sequence)
        self._hash = str(head.record_hash)

    @property
    def conn(self) -> Connection:
        """The Core connection of this transaction.

        Raises:
            StorageError: this is a hot-path unit, which has only ``cursor``.
        """
        if self._conn is None:
            raise StorageError("this unit of work runs prepared statements only")
        return self._conn

    @property
    def head(self) -> tuple[int, str]:
        """The chain head as this transaction sees it: the last sequence number and hash,
        including records this unit has appended.

        Raises:
            StorageError: the unit is deferred (it holds no head).
        """
        if self.deferred:
            raise StorageError("a deferred unit of work does not hold the chain head")
        return self._sequence, self._hash

    def append_pending(self, records: list[AuditRecord], rows: Sequence[Mapping[str, Any]]) -> None:
        """Queues unsealed records (``rows`` are their ``audit_pending`` values) for
        :meth:`finish`, which numbers them and replaces each item of ``records`` with the
        record carrying its sequence number (its hashes stay empty until it is sealed).

        Raises:
            StorageError: the unit is not deferred.
        """
        if not self.deferred:
            raise StorageError("only a deferred unit of work queues pending records")
        if records:
            self._pending.append((records, [dict(r) for r in rows]))

    def append_records(
        self, records: Sequence[Mapping[str, Any]], parties: Sequence[Sequence[str]]
    ) -> None:
        """Stores sealed audit records (the rows of :func:`broker.audit` and each record's
        parties) and moves the head to the last of them.

        The caller sealed them on :attr:`head`; their sequence numbers continue it.

        Raises:
            StorageError: the records do not continue the head.
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        if not records:
            return
        first = int(records[0]["sequence"])
        if first != self._sequence + 1 or str(records[0]["previous_hash"]) != self._hash:
            raise StorageError("audit records must continue the chain head of their unit")
        cur = self.cursor
        if len(records) == 1:
            cur.execute(self._chain.insert_record, records[0])
        else:
            cur.executemany(self._chain.insert_record, list(records))
        index = [
            {"party": party, "sequence": int(r["sequence"])}
            for r, names in zip(records, parties, strict=True)
            for party in sorted(set(names))
        ]
        if len(index) == 1:
            cur.execute(self._chain.insert_party, index[0])
        elif index:
            cur.executemany(self._chain.insert_party, index)
        self._sequence = int(records[-1]["sequence"])
        self._hash = str(records[-1]["record_hash"])
        self._moved = True

    def finish(self) -> None:
        """Writes the head row if records were appended, or numbers and inserts the pending
        records of a deferred unit (called once, as the unit's last statements, before the
        commit).

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        statement = self._chain.insert_pending
        if self._pending and statement is not None:
            for records, rows in self._pending:
                for i, row in enumerate(rows):
                    got = self.cursor.one(statement, row)
                    if got is None:
                        raise StorageError("the audit record was not numbered")
                    records[i] = replace(records[i], sequence=int(got.sequence))
            self._pending = []
        if self._moved:
            self.cursor.execute(
                self._chain.update_head, {"seq": self._sequence, "hash": self._hash}
            )
            self._moved = False


__all__ = ["ChainStatements", "UnitOfWork"]
