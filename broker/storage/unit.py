"""The unit of work: one decision's database transaction, with the audit chain head locked.

Every decision of the broker (an enrollment, a key registration, an approval or its revocation,
an AK or EK revocation, a KEK operation, a release or a denial with its nonce and session)
commits its state change and its audit records in one :class:`UnitOfWork`, or nothing at all:
a crash, a failed statement or an exception anywhere inside leaves neither the object without
its record nor the record without its object.

Lock order. A unit of work locks the audit chain head row first (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` takes the whole file), before any other row. Every
decision appends at least one record, so decisions are serialized by the head in every process
and replica, and no transaction that holds the head ever waits for a row lock held by a
transaction waiting for the head (no deadlock). It also gives the chain the order of the
decisions: a release that re-checks its approvals inside its unit of work either runs before a
revocation's unit of work (its records precede the revocation's) or after it (it sees the
approval revoked), never in between.

The hash-chain computation stays in :mod:`broker.audit` (pure); this module only stores the
records it is handed and moves the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from broker.errors import StorageError
from broker.storage.fast import FastCursor, FastPath, FastStatement
from broker.storage.schema import audit_head, audit_parties, audit_records


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
    ) -> None:
        self.cursor = cursor
        self._conn = conn
        self._chain = chain
        head = cursor.one(chain.lock_head, {})
        if head is None:
            raise StorageError("the audit chain head row is missing (database tampered?)")
        self._sequence = int(head.sequence)
        self._hash = str(head.record_hash)
        self._moved = False

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
        including records this unit has appended."""
        return self._sequence, self._hash

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
        """Writes the head row if records were appended (called once, before the commit).

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        if self._moved:
            self.cursor.execute(
                self._chain.update_head, {"seq": self._sequence, "hash": self._hash}
            )
            self._moved = False


__all__ = ["ChainStatements", "UnitOfWork"]
