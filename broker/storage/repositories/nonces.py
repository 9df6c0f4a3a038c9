"""The nonce table: insert, the one-statement burn, the lookup that says why a burn found
nothing, purging and counting. What a burned row means (accepted, bound to another AK,
expired) is :mod:`broker.nonces`'s decision."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from broker.storage.engine import Database
from broker.storage.fast import FastCursor
from broker.storage.schema import nonces
from broker.storage.unit import UnitOfWork


class NonceRepository:
    """Nonce rows, on the hot path's prepared statements."""

    def __init__(self, db: Database) -> None:
        self._db = db
        fast = db.fast
        self._insert = fast.prepare(sa.insert(nonces))
        self._burn = fast.prepare(
            sa.update(nonces)
            .where(nonces.c.nonce == sa.bindparam("n"), nonces.c.used_at.is_(None))
            .values(used_at=sa.bindparam("now"))
            .returning(nonces.c.ak_name, nonces.c.expires_at)
        )
        self._lookup = fast.prepare(
            sa.select(nonces.c.used_at).where(nonces.c.nonce == sa.bindparam("n"))
        )

    def insert(self, row: Mapping[str, Any], cur: FastCursor | None = None) -> None:
        """Stores a nonce row, in a statement of its own or on ``cur`` (a caller's transaction).

        Raises:
            StorageError: the database failed (without ``cur``).
            sqlite3.Error, psycopg.Error: the driver's error (with ``cur``; its session maps it).
        """
        if cur is not None:
            cur.execute(self._insert, row)
            return
        with self._db.fast.session("issue nonce", write=True) as own:
            own.execute(self._insert, row)

    def burn(self, nonce: bytes, now: datetime, uow: UnitOfWork | None = None) -> Any | None:
        """Marks the nonce used if it was not, in one statement, and returns its ``ak_name`` and
        ``expires_at``; None when no unused row was found. Without ``uow`` the statement
        commits on its own (autocommit): a refused nonce stays burned.

        Raises:
            StorageError: the database failed (without ``uow``).
            sqlite3.Error, psycopg.Error: the driver's error (in ``uow``; the unit maps it).
        """
        params = {"n": nonce, "now": now}
        if uow is not None:
            return uow.cursor.one(self._burn, params)
        with self._db.fast.session("consume nonce", write=True) as cur:
            return cur.one(self._burn, params)

    def exists(self, nonce: bytes, uow: UnitOfWork | None = None) -> bool:
        """Whether a row (used or not) exists for ``nonce``.

        Raises:
            StorageError, sqlite3.Error, psycopg.Error: as :meth:`burn`.
        """
        if uow is not None:
            return uow.cursor.one(self._lookup, {"n": nonce}) is not None
        with self._db.fast.session("look up nonce") as cur:
            return cur.one(self._lookup, {"n": nonce}) is not None

    def purge_expired(self, older_than: datetime) -> int:
        """Deletes nonces that expired before ``older_than``; returns how many.

        Raises:
            StorageError: the database failed.
        """
        with self._db.transaction("purge nonces", write=True) as conn:
            return conn.execute(sa.delete(nonces).where(nonces.c.expires_at < older_than)).rowcount

    def count_outstanding(self, now: datetime) -> int:
        """How many nonces are unused and unexpired at ``now``.

        Raises:
            StorageError: the database failed.
        """
        with self._db.transaction("count nonces") as conn:
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(nonces)
                .where(nonces.c.used_at.is_(None), nonces.c.expires_at > now)
            ).scalar_one()
        return int(count)
