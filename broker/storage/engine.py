"""The storage engine: opening a database (SQLite's connection settings and WAL, PostgreSQL),
preparing or checking its schema, and mapping driver errors to :class:`broker.errors.StorageError`
messages that name the database without its password.

:class:`broker.storage.store.Store` builds on it; the repository methods and the unit of work
(:mod:`broker.storage.unit`) never talk to a driver's settings or error codes themselves.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL

from broker.errors import (
    StorageError,
)
from broker.storage import migrate as _migrate

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


# SQLSTATE codes of PostgreSQL's integrity violations.
PG_UNIQUE_VIOLATION = "23505"


PG_FOREIGN_KEY_VIOLATION = "23503"


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def describe_error(e: BaseException) -> str:
    """A short description of a database error for an exception message.

    Only the driver's first line is kept: PostgreSQL's DETAIL lines can quote row values, and
    SQLAlchemy's own message quotes the statement (its parameters are hidden by the engine's
    ``hide_parameters``, but the statement itself is noise to an operator).
    """
    orig = getattr(e, "orig", None)
    cause: BaseException = orig if isinstance(orig, BaseException) else e
    line = first_line(str(cause))
    return f"{type(cause).__name__}: {line}" if line else type(cause).__name__


def integrity_kind(e: BaseException) -> str:
    """ "unique", "foreign_key" or "other", for SQLAlchemy's or the driver's integrity error."""
    orig = getattr(e, "orig", None) or e
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == PG_UNIQUE_VIOLATION:
        return "unique"
    if sqlstate == PG_FOREIGN_KEY_VIOLATION:
        return "foreign_key"
    text = str(orig)
    if "UNIQUE constraint failed" in text:
        return "unique"
    if "FOREIGN KEY constraint failed" in text:
        return "foreign_key"
    return "other"


def safe_url(url: str | URL) -> str:
    """``url`` as text with any password replaced by ``***``, fit for messages and logs."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except sa.exc.ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


def install_sqlite_hooks(engine: Engine, *, busy_timeout_ms: int, synchronous: str) -> None:
    """Per-connection pragmas, and transactions that SQLAlchemy (not the driver) begins.

    Python's sqlite3 driver begins transactions itself, lazily, before the first write, which
    makes ``SELECT`` then ``UPDATE`` a deferred transaction that cannot wait for the write lock.
    Turning that off (``isolation_level = None``) and emitting BEGIN from the ``begin`` event
    (``BEGIN IMMEDIATE`` for writers) is SQLAlchemy's documented recipe.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            mode = enable_wal(cursor, timeout_seconds=busy_timeout_ms / 1000)
            if mode is None or str(mode[0]).lower() != "wal":
                raise StorageError(
                    "SQLite refused WAL journal mode (is the file on a network filesystem?)"
                )
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("cleanroom_sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def enable_wal(cursor: Any, *, timeout_seconds: float) -> Any:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the file.

    Switching a fresh database to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once, without calling the busy handler, when another process is switching it
    or opening its WAL at the same moment (replicas starting together on a new file). Once
    the file is in WAL mode the pragma is a no-op that never waits, so the loop only ever
    spins at first start.
    """
    deadline = time.monotonic() + timeout_seconds
    delay = 0.005
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def prepare_schema(
    engine: Engine, *, migrate: bool, display: str, require_existing: bool = False
) -> None:
    try:
        with engine.connect() as conn:
            if require_existing:
                found = _migrate.current_revision(conn)
                conn.rollback()
                if found is None:
                    raise StorageError(
                        f"the database {display} has no broker schema "
                        "(create it with `cleanroom broker init --config FILE`)"
                    )
            if migrate:
                _migrate.upgrade(conn)
                return
            current = _migrate.current_revision(conn)
            conn.rollback()
    except sa.exc.OperationalError as e:
        raise StorageError(f"cannot open database {display}: {describe_error(e)}") from e
    except sa.exc.SQLAlchemyError as e:
        raise StorageError(f"cannot prepare database {display}: {describe_error(e)}") from e
    except CommandError as e:
        raise StorageError(
            f"cannot migrate database {display}: {first_line(str(e))} "
            "(is it newer than this broker?)"
        ) from e
    head = _migrate.head_revision()
    if current != head:
        raise StorageError(
            f"database {display} is at schema revision {current or 'none'}, this broker needs "
            f"{head}: open it with migrate=True or run `python -m broker.storage upgrade`"
        )
