"""The attestation hot path: statements SQLAlchemy compiles once, run on the driver connection.

SQLAlchemy Core's execution machinery (compile-cache lookup, events, result processing) costs
about 100-200 microseconds per statement on this class of machine, five to ten times the cost
of the query itself, and an attestation needs a dozen statements. So the few statements on the
hot path are still written with Core (one source of truth for table and column names, and
dialect-correct SQL), compiled once per Store, and then executed directly on the pooled driver
connection (sqlite3 or psycopg), with the handful of type conversions done here:

* times: timezone-aware UTC datetimes; SQLite keeps them as fixed-width text in exactly the
  format SQLAlchemy's ``DATETIME`` type uses (:func:`sqlite_time_text`), so both paths read and
  compare each other's values;
* booleans: SQLite returns integers;
* bytes: returned as ``bytes`` by both drivers.

Single statements run in autocommit (one round trip on PostgreSQL, instead of BEGIN, statement,
COMMIT); multi-statement work runs in an explicit transaction (``BEGIN IMMEDIATE`` on SQLite).

Connections: checking a connection out of SQLAlchemy's pool and back costs about 8-11
microseconds (the pool's lock and queue, events, the reset-on-return rollback), and an
attestation runs about nine sessions. On SQLite, where a connection is a cheap local handle,
each thread therefore keeps one driver connection of its own for the fast path (taken from the
pool once and detached from it, so it was set up by the same connect hooks); on PostgreSQL,
where a server backend per thread would exhaust ``max_connections``, the fast path keeps using
its pool, whose connections are in autocommit and so need no reset on return.
"""

from __future__ import annotations

import threading
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ClauseElement

from broker.errors import BrokerError, StorageError
from broker.storage.schema import UtcDateTime

Converter = Callable[[Any], Any]


def sqlite_time_text(value: datetime) -> str:
    """A time as SQLite stores it: UTC, ``YYYY-MM-DD HH:MM:SS.ffffff`` (SQLAlchemy's format).

    Raises:
        ValueError: ``value`` is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime given to the broker's storage; use an aware UTC time")
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d} "
        f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}"
    )


def _sqlite_time_out(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _pg_time_in(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime given to the broker's storage; use an aware UTC time")
    return value


def _pg_time_out(value: Any) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _to_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _to_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


class FastStatement:
    """One compiled statement: its SQL text, bound defaults and how to build result rows."""

    __slots__ = ("converters", "defaults", "row_type", "sql")

    def __init__(
        self,
        sql: str,
        defaults: Mapping[str, Any],
        row_type: Callable[..., Any] | None,
        converters: Sequence[Converter | None],
    ) -> None:
        self.sql = sql
        self.defaults = dict(defaults)
        self.row_type = row_type
        self.converters = tuple(converters)


class FastCursor:
    """Runs :class:`FastStatement` objects on one driver cursor."""

    __slots__ = ("_cursor", "_time_in")

    def __init__(self, cursor: Any, time_in: Callable[[datetime], Any]) -> None:
        self._cursor = cursor
        self._time_in = time_in

    def _params(self, stmt: FastStatement, params: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(stmt.defaults)
        for k, v in params.items():
            out[k] = self._time_in(v) if isinstance(v, datetime) else v
        return out

    def _row(self, stmt: FastStatement, raw: Sequence[Any]) -> Any:
        assert stmt.row_type is not None, "statement returns no rows"
        return stmt.row_type(
            *(v if c is None else c(v) for v, c in zip(raw, stmt.converters, strict=True))
        )

    def all(self, stmt: FastStatement, params: Mapping[str, Any]) -> list[Any]:
        """Every row the statement returns (named tuples, converted)."""
        self._cursor.execute(stmt.sql, self._params(stmt, params))
        return [self._row(stmt, r) for r in self._cursor.fetchall()]

    def one(self, stmt: FastStatement, params: Mapping[str, Any]) -> Any | None:
        """The single row the statement returns, or None."""
        rows = self.all(stmt, params)
        if len(rows) > 1:
            raise StorageError("a lookup by primary key returned several rows")
        return rows[0] if rows else None

    def execute(self, stmt: FastStatement, params: Mapping[str, Any]) -> int:
        """Runs a statement that returns no rows; returns the row count."""
        self._cursor.execute(stmt.sql, self._params(stmt, params))
        return int(self._cursor.rowcount)

    def executemany(self, stmt: FastStatement, rows: Sequence[Mapping[str, Any]]) -> None:
        """Runs a statement once per parameter set (one driver call)."""
        self._cursor.executemany(stmt.sql, [self._params(stmt, r) for r in rows])


class _Held:
    """The driver connection one thread holds for the fast path (SQLite)."""

    __slots__ = ("__weakref__", "driver", "fairy")

    def __init__(self, fairy: Any, driver: Any) -> None:
        self.fairy = fairy
        self.driver = driver


def _close_quietly(fairy: Any) -> None:
    # Closing at shutdown or when a thread ends: a failure leaves nothing to clean up.
    with suppress(Exception):
        fairy.close()


class FastPath:
    """Compiles hot-path statements and runs them on pooled driver connections.

    ``engine`` must hand out connections in driver-level autocommit: on SQLite the store's
    engine (its connect hook turns the driver's own transactions off), on PostgreSQL a second
    engine created with ``isolation_level="AUTOCOMMIT"``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        display_url: str,
        writer: Callable[[str], AbstractContextManager[None]],
        integrity_kind: Callable[[BaseException], str],
        describe: Callable[[BaseException], str],
    ) -> None:
        self._engine = engine
        self._display_url = display_url
        self._writer = writer
        self._integrity_kind = integrity_kind
        self._describe = describe
        self._sqlite = engine.dialect.name == "sqlite"
        # sqlite3 takes :name parameters natively; psycopg takes %(name)s, the dialect default.
        self._compile_dialect = (
            sqlite_dialect.dialect(paramstyle="named") if self._sqlite else engine.dialect
        )
        self._time_in: Callable[[datetime], Any] = sqlite_time_text if self._sqlite else _pg_time_in
        self._time_out: Converter = _sqlite_time_out if self._sqlite else _pg_time_out
        dbapi = engine.dialect.loaded_dbapi
        self._dbapi_error: type[BaseException] = dbapi.Error
        self._dbapi_integrity: type[BaseException] = dbapi.IntegrityError
        self._closed = False
        # SQLite: one connection per thread (see the module docstring). Each is closed when its
        # thread ends (the holder is only referenced from the thread-local) or at close().
        self._local = threading.local()
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._held_lock = threading.Lock()

    def close(self) -> None:
        """Refuses further work and closes the per-thread connections (the Store disposes of
        the pool)."""
        self._closed = True
        with self._held_lock:
            held = list(self._held)
            self._held.clear()
        for h in held:
            _close_quietly(h.fairy)

    def _thread_connection(self) -> _Held:
        """This thread's own SQLite connection, opened on first use.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the connection cannot be opened.
        """
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            fairy = self._engine.raw_connection()
            driver = fairy.driver_connection
            # Detached, it no longer counts against the pool's size, and closing it closes
            # the driver connection instead of returning it.
            fairy.detach()
            held = _Held(fairy, driver)
            weakref.finalize(held, _close_quietly, fairy)
            with self._held_lock:
                self._held.add(held)
            self._local.held = held
        return held

    def _drop_thread_connection(self) -> None:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None:
            self._local.held = None
            with self._held_lock:
                self._held.discard(held)
            _close_quietly(held.fairy)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return "sqlite" if self._sqlite else "postgresql"

    def cursor_for(self, driver_cursor: Any) -> FastCursor:
        """A :class:`FastCursor` over a driver cursor the caller opened (on a connection of a
        Core transaction, so that prepared statements join that transaction)."""
        return FastCursor(driver_cursor, self._time_in)

    def prepare(self, stmt: ClauseElement) -> FastStatement:
        """Compiles ``stmt`` for this backend (once; keep the result)."""
        compiled = stmt.compile(dialect=self._compile_dialect)
        defaults = {k: v for k, v in compiled.params.items() if v is not None}
        columns = list(getattr(stmt, "exported_columns", ()))
        if not columns:
            return FastStatement(str(compiled), defaults, None, ())
        converters: list[Converter | None] = []
        for col in columns:
            t = col.type
            if isinstance(t, UtcDateTime):
                converters.append(self._time_out)
            elif isinstance(t, sa.Boolean):
                converters.append(_to_bool)
            elif isinstance(t, sa.LargeBinary):
                converters.append(_to_bytes)
            else:
                converters.append(None)
        row_type = namedtuple("FastRow", [c.key for c in columns])  # type: ignore[misc]
        return FastStatement(str(compiled), defaults, row_type, converters)

    @contextmanager
    def session(
        self,
        operation: str,
        *,
        write: bool = False,
        transaction: bool = False,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[FastCursor]:
        """A cursor on a pooled driver connection; with ``transaction``, inside BEGIN/COMMIT.

        Raises:
            DuplicateError: ``duplicate``, on a unique-constraint violation, when given.
            BrokerError: ``missing_reference``, on a foreign-key violation, when given.
            StorageError: the database failed (the operation and, for connection trouble,
                the database are named).
        """
        if self._closed:
            raise StorageError(f"{operation}: the store is closed")
        with self._writer(operation) if write else nullcontext():
            held: _Held | None = None
            raw: Any = None
            try:
                if self._sqlite:
                    held = self._thread_connection()
                    driver: Any = held.driver
                else:
                    raw = self._engine.raw_connection()
                    driver = raw.driver_connection
            except sa.exc.SQLAlchemyError as e:
                raise StorageError(
                    f"{operation} on {self._display_url}: {self._describe(e)}"
                ) from e
            cursor: Any = None
            try:
                cursor = driver.cursor()
                # psycopg's pipeline mode sends BEGIN with the first statement and the
                # remaining statements with COMMIT, so a transaction costs two round trips
                # (and holds its row locks that much shorter) instead of one per statement.
                pipeline = driver.pipeline() if transaction and not self._sqlite else nullcontext()
                try:
                    with pipeline:
                        if transaction:
                            cursor.execute("BEGIN IMMEDIATE" if self._sqlite and write else "BEGIN")
                        yield FastCursor(cursor, self._time_in)
                        if transaction:
                            cursor.execute("COMMIT")
                except BaseException:
                    if transaction and not self._rollback(cursor):
                        # The transaction may still be open on this connection, and nothing
                        # resets it on return (the pool's reset is off, a held connection is
                        # never returned): discard the connection.
                        if held is not None:
                            self._drop_thread_connection()
                            held = None
                        elif raw is not None:
                            raw.invalidate()
                    raise
            except ValueError as e:
                raise StorageError(f"{operation}: {e}") from e
            except self._dbapi_error as e:
                if isinstance(e, self._dbapi_integrity):
                    kind = self._integrity_kind(e)
                    if kind == "unique" and duplicate is not None:
                        raise duplicate from e
                    if kind == "foreign_key" and missing_reference is not None:
                        raise missing_reference from e
                    raise StorageError(
                        f"{operation}: constraint violated: {self._describe(e)}"
                    ) from e
                if self._engine.dialect.is_disconnect(e, driver, cursor):  # type: ignore[arg-type]
                    if held is not None:
                        self._drop_thread_connection()
                        held = None
                    else:
                        # The server went away (restart, failover): this connection is dead
                        # and so, most likely, are the pooled ones. Start a fresh pool;
                        # connections other threads hold are discarded when they come back.
                        raw.invalidate(e)
                        self._engine.dispose()
                raise StorageError(
                    f"{operation} on {self._display_url}: {self._describe(e)}"
                ) from e
            finally:
                if cursor is not None:
                    try:
                        cursor.close()
                    except self._dbapi_error:
                        pass
                if raw is not None:
                    raw.close()

    def _rollback(self, cursor: Any) -> bool:
        """Rolls back; False when that failed (the connection's state is unknown)."""
        try:
            cursor.execute("ROLLBACK")
        except self._dbapi_error:
            return False
        return True
