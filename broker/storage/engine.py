"""The storage engine: opening a database (SQLite's connection settings and WAL, PostgreSQL),
preparing or checking its schema, transactions (:class:`Database`: a Core transaction, a write
inside or outside a decision's unit of work, the unit of work itself) and mapping driver errors
to :class:`broker.errors.StorageError` messages that name the database without its password.

The repositories (:mod:`broker.storage.repositories`) run every statement through a
:class:`Database`; none of them talks to a driver's settings or error codes itself.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL

from broker.errors import BrokerError, StorageError
from broker.storage import migrate as _migrate
from broker.storage.fast import FastPath, FastStatement
from broker.storage.unit import ChainStatements, UnitOfWork
from cleanroom.closing import Closeable

T = TypeVar("T")

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: The PostgreSQL advisory lock (transaction-scoped) that orders the units of work of
#: administration and enrollment among themselves across replicas (see
#: :meth:`Database.unit_of_work`). Any fixed 64-bit number; "cleanroom decision" in spirit.
DECISION_LOCK = 0x636C_5244_6563_6964


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


class Database(Closeable):
    """The broker's database: SQLite (default, one file, WAL) or PostgreSQL (several replicas),
    with the one transaction style every repository uses: :meth:`transaction` (a Core
    transaction), :meth:`write` (a write of its own or inside a unit of work), the decision's
    :meth:`unit_of_work` and :meth:`fast_unit_of_work`, and :attr:`fast` (the hot path's
    prepared statements, see :mod:`broker.storage.fast`).

    Build one with :meth:`open`; use it as a context manager or call :meth:`close`. It is
    thread-safe (every call checks a connection out of the pool) but must not cross a fork:
    open one per process.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        display_url: str,
        fast_engine: Engine | None = None,
        write_lock_timeout_seconds: float = 30.0,
    ) -> None:
        """Wraps engines that :meth:`open` configured; use :meth:`open` instead."""
        self._engine = engine
        self._fast_engine = fast_engine
        # Write transactions on SQLite begin with BEGIN IMMEDIATE (see install_sqlite_hooks).
        self._write_engine: Engine = engine.execution_options(cleanroom_sqlite_begin="IMMEDIATE")
        self._snapshot_engine: Engine = (
            engine.execution_options(isolation_level="REPEATABLE READ")
            if engine.dialect.name == "postgresql"
            else engine
        )
        self.display_url = display_url
        self._closed = False
        # SQLite has one writer at a time per file, and a writer that finds the lock taken
        # polls for it with growing sleeps (1, 2, 5, ... 100 ms), so under load one thread can
        # starve for a long time. Queueing this process's writers on a lock instead keeps
        # latency flat; other processes still meet the busy timeout. Reentrant, so that a
        # nested write fails with "database is locked" after the timeout instead of hanging.
        self._write_lock = threading.RLock() if engine.dialect.name == "sqlite" else None
        self._write_lock_timeout = write_lock_timeout_seconds
        #: The hot-path executor (see broker.storage.fast); the repositories prepare their
        #: statements on it.
        self.fast = FastPath(
            fast_engine or engine,
            display_url=display_url,
            writer=self._writer,
            integrity_kind=integrity_kind,
            describe=describe_error,
        )
        self._chain = ChainStatements(self.fast)
        #: Whether units of work number their records and leave them to the sealer (on
        #: PostgreSQL) instead of sealing them onto the locked chain head (SQLite).
        self._deferred = engine.dialect.name == "postgresql"
        self._dbapi: Any = engine.dialect.loaded_dbapi

    # --- life cycle -----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str,
        *,
        migrate: bool = True,
        pool_size: int = 10,
        max_overflow: int = 10,
        pool_timeout_seconds: float = 30.0,
        connect_timeout_seconds: int = 10,
        busy_timeout_seconds: float = 30.0,
        sqlite_synchronous: str = "NORMAL",
        require_existing: bool = False,
    ) -> Self:
        """Opens the database at ``url`` and, with ``migrate``, upgrades its schema to head.

        URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or
        ``postgresql+psycopg://user:password@host:5432/dbname`` (a bare ``postgresql://`` is
        taken to mean psycopg 3). SQLite runs in WAL mode with foreign keys on and waits up to
        ``busy_timeout_seconds`` for the write lock; ``sqlite_synchronous`` is NORMAL by default
        (in WAL mode a crash of the process loses nothing, a power cut may lose the last
        commits; FULL syncs every commit, at a large cost in throughput).

        With ``require_existing`` nothing is created: a SQLite file that does not exist, or a
        database without the broker's schema, is refused (``cleanroom broker init`` creates
        them); an existing database is still upgraded when ``migrate`` is true.

        Raises:
            StorageError: the URL is invalid or of an unsupported backend, the database cannot
                be reached or opened, or its schema is not at this code's revision (with
                ``migrate=False``) or is newer than this code knows.
        """
        try:
            parsed = make_url(url)
        except sa.exc.ArgumentError as e:
            raise StorageError(
                "invalid database URL (expected sqlite:///... or postgresql+psycopg://...)"
            ) from e
        backend = parsed.get_backend_name()
        display = safe_url(parsed)
        common: dict[str, Any] = {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": pool_timeout_seconds,
            # Parameters can hold wrapped keys and nonces: keep them out of error messages.
            "hide_parameters": True,
        }
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:") or str(parsed.database).startswith(
                "file::memory:"
            ):
                raise StorageError(
                    "an in-memory SQLite database cannot be shared by the pool; "
                    "use a file: sqlite:///path/to/broker.db"
                )
            # Checked before connecting: SQLite creates a missing file on connect.
            if require_existing and not Path(str(parsed.database)).is_file():
                raise StorageError(
                    f"the database {Path(str(parsed.database)).absolute()} does not exist "
                    "(create it with `cleanroom broker init --config FILE`)"
                )
            if sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
                raise StorageError(
                    f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}"
                )
            if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
                raise StorageError(f"unsupported SQLite driver {parsed.drivername!r}")
            engine = sa.create_engine(
                parsed, connect_args={"timeout": busy_timeout_seconds}, **common
            )
            install_sqlite_hooks(
                engine,
                busy_timeout_ms=int(busy_timeout_seconds * 1000),
                synchronous=sqlite_synchronous.upper(),
            )
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            if parsed.drivername != "postgresql+psycopg":
                raise StorageError(
                    f"unsupported PostgreSQL driver {parsed.drivername!r}; "
                    "use postgresql+psycopg://"
                )
            engine = sa.create_engine(
                parsed,
                connect_args={"connect_timeout": connect_timeout_seconds},
                **common,
            )
        else:
            raise StorageError(
                f"unsupported database backend {backend!r} in {display} "
                "(supported: sqlite, postgresql)"
            )
        fast_engine: Engine | None = None
        if backend == "postgresql":
            # A second pool in driver autocommit for the hot path's single statements (one
            # round trip each); Core's transactions need the first pool's non-autocommit ones.
            # In autocommit nothing is left to reset when a connection comes back, and the fast
            # path discards a connection whose explicit transaction it could not roll back, so
            # the pool's reset-on-return (a ROLLBACK round trip per checkout) is off.
            fast_engine = sa.create_engine(
                parsed,
                connect_args={"connect_timeout": connect_timeout_seconds},
                isolation_level="AUTOCOMMIT",
                pool_reset_on_return=None,
                **common,
            )
        try:
            prepare_schema(
                engine, migrate=migrate, display=display, require_existing=require_existing
            )
            return cls(
                engine=engine,
                display_url=display,
                fast_engine=fast_engine,
                write_lock_timeout_seconds=busy_timeout_seconds,
            )
        except BaseException:
            engine.dispose()
            if fast_engine is not None:
                fast_engine.dispose()
            raise

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return str(self._engine.dialect.name)

    @property
    def engine(self) -> Engine:
        """The underlying engine, for tools and tests that need raw SQL."""
        return self._engine

    def close(self) -> None:
        """Closes every pooled connection. The Store cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self.fast.close()
            self._engine.dispose()
            if self._fast_engine is not None:
                self._fast_engine.dispose()

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(
        self,
        operation: str,
        *,
        write: bool = False,
        snapshot: bool = False,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[Connection]:
        """One database transaction, committed when the block ends without an exception.

        This is the building block of every repository (``broker.storage.repositories``).
        ``write`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``), which a transaction
        that will write must do: a deferred transaction that upgrades to
        a writer fails at once with "database is locked" instead of waiting. ``snapshot``
        gives one consistent view across several reads (REPEATABLE READ on PostgreSQL;
        SQLite's WAL readers always have one).

        Raises:
            DuplicateError: ``duplicate``, on a unique-constraint violation, when given.
            BrokerError: ``missing_reference``, on a foreign-key violation, when given.
            StorageError: any other database failure, with the operation named.
        """
        if self._closed:
            raise StorageError(f"{operation}: the store is closed")
        engine: Engine
        if write:
            engine = self._write_engine
        elif snapshot:
            engine = self._snapshot_engine
        else:
            engine = self._engine
        try:
            with self._writer(operation) if write else nullcontext(), engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as e:
            raise self._mapped(operation, e, duplicate, missing_reference) from e

    def _mapped(
        self,
        operation: str,
        e: BaseException,
        duplicate: BrokerError | None,
        missing_reference: BrokerError | None,
    ) -> BrokerError:
        """The broker error for a database error ``e`` (SQLAlchemy's or the driver's)."""
        if isinstance(e, sa.exc.IntegrityError | self._dbapi.IntegrityError):
            kind = integrity_kind(e)
            if kind == "unique" and duplicate is not None:
                return duplicate
            if kind == "foreign_key" and missing_reference is not None:
                return missing_reference
            return StorageError(f"{operation}: constraint violated: {describe_error(e)}")
        if isinstance(e, sa.exc.OperationalError | self._dbapi.OperationalError):
            return StorageError(f"{operation} on {self.display_url}: {describe_error(e)}")
        return StorageError(f"{operation}: {describe_error(e)}")

    @contextmanager
    def write(
        self,
        operation: str,
        uow: UnitOfWork | None,
        *,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[Connection]:
        """A write transaction of its own, or the statements of ``uow``'s (whose errors are
        mapped here, so that the caller sees the same error either way, and which then rolls
        back as a whole): every repository's write method takes ``uow=`` and runs through this.

        Raises:
            DuplicateError, BrokerError, StorageError: as :meth:`transaction`.
        """
        if uow is None:
            with self.transaction(
                operation, write=True, duplicate=duplicate, missing_reference=missing_reference
            ) as conn:
                yield conn
            return
        try:
            yield uow.conn
        except sa.exc.SQLAlchemyError as e:
            raise self._mapped(operation, e, duplicate, missing_reference) from e

    # --- reads --------------------------------------------------------------------------

    def fetch_one(
        self, operation: str, stmt: FastStatement, params: Mapping[str, Any], missing: BrokerError
    ) -> Any:
        """The one row a prepared statement selects, read on the fast path: the lookups by key
        that every repository has, with the error for an absent key given by the caller.

        Raises:
            BrokerError: ``missing``, when the statement selects no row.
            StorageError: the database failed.
        """
        with self.fast.session(operation) as cur:
            row = cur.one(stmt, params)
        if row is None:
            raise missing
        return row

    def select_one(self, operation: str, stmt: sa.Select[Any], missing: BrokerError) -> Any:
        """The one row a SQLAlchemy select returns, in a read transaction of its own.

        Raises:
            BrokerError: ``missing``, when it returns no row.
            StorageError: the database failed.
        """
        with self.transaction(operation) as conn:
            row = conn.execute(stmt).one_or_none()
        if row is None:
            raise missing
        return row

    def select_all(
        self, operation: str, stmt: sa.Select[Any], decode: Callable[[Any], T]
    ) -> list[T]:
        """Every row a SQLAlchemy select returns, in a read transaction of its own, each
        decoded by ``decode`` (a row codec of :mod:`broker.storage.rows`).

        Raises:
            StorageError: the database failed.
        """
        with self.transaction(operation) as conn:
            rows = conn.execute(stmt).all()
        return [decode(row) for row in rows]

    @contextmanager
    def unit_of_work(
        self,
        operation: str,
        *,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[UnitOfWork]:
        """One decision's transaction (see :mod:`broker.storage.unit`): the repository's write
        methods (``uow=``), the audit log (:meth:`broker.audit.AuditLog.append_in`) and the
        nonce service write in it; it commits when the block ends without an exception and
        rolls back as a whole otherwise.

        These units (enrollment, administration, KEK operations, a session's end) run one at a
        time: on SQLite its write lock, taken first, serializes every writer; on PostgreSQL
        they take a transaction-scoped advisory lock first (:data:`DECISION_LOCK`), so that
        their checks and the records that follow them are ordered as they happened, across
        replicas. The hot path's units (:meth:`fast_unit_of_work`) do not take it: what they
        must be ordered against (a revocation) they lock row by row.

        Raises:
            DuplicateError: ``duplicate``, on a unique-constraint violation, when given.
            BrokerError: ``missing_reference``, on a foreign-key violation, when given.
            StorageError: any other database failure, with the operation named.
        """
        with self.transaction(
            operation, write=True, duplicate=duplicate, missing_reference=missing_reference
        ) as conn:
            # The prepared statements run on a driver cursor of the same connection, so they
            # are part of the same transaction.
            driver_cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                if self._deferred:
                    driver_cursor.execute(f"SELECT pg_advisory_xact_lock({DECISION_LOCK})")
                uow = UnitOfWork(
                    cursor=self.fast.cursor_for(driver_cursor),
                    chain=self._chain,
                    conn=conn,
                    deferred=self._deferred,
                )
                yield uow
                uow.finish()
            except ValueError as e:
                raise StorageError(f"{operation}: {e}") from e
            except self._dbapi.Error as e:
                raise self._mapped(operation, e, duplicate, missing_reference) from e
            finally:
                driver_cursor.close()
        if self._deferred:
            self.records_committed()

    @contextmanager
    def fast_unit_of_work(
        self,
        operation: str,
        *,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[UnitOfWork]:
        """:meth:`unit_of_work` on the hot path: prepared statements only (``uow.cursor``), one
        pooled driver connection, two round trips on PostgreSQL (its pipeline mode) for the
        statements whose results are not read.

        Raises:
            DuplicateError, BrokerError, StorageError: as :meth:`unit_of_work`.
        """
        with self.fast.session(
            operation,
            write=True,
            transaction=True,
            duplicate=duplicate,
            missing_reference=missing_reference,
        ) as cur:
            uow = UnitOfWork(cursor=cur, chain=self._chain, deferred=self._deferred)
            yield uow
            uow.finish()
        if self._deferred:
            self.records_committed()

    def records_committed(self) -> None:
        """Called after a deferred unit of work committed (PostgreSQL): its records wait for
        the sealer. A hook for :class:`broker.storage.Store`, which runs the sealer."""

    @contextmanager
    def _writer(self, operation: str) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        if not self._write_lock.acquire(timeout=self._write_lock_timeout):
            raise StorageError(f"{operation} on {self.display_url}: database is locked")
        try:
            yield
        finally:
            self._write_lock.release()

    def upsert(self, table: sa.Table, values: Mapping[str, Any], conflict: list[str]) -> sa.Insert:
        """``INSERT ... ON CONFLICT (conflict) DO UPDATE SET`` every other column."""
        if self.dialect == "postgresql":
            pg = pg_dialect.insert(table).values(**values)
            return pg.on_conflict_do_update(
                index_elements=conflict,
                set_={k: pg.excluded[k] for k in values if k not in conflict},
            )
        lite = sqlite_dialect.insert(table).values(**values)
        return lite.on_conflict_do_update(
            index_elements=conflict,
            set_={k: lite.excluded[k] for k in values if k not in conflict},
        )
