"""The broker's repository: every domain object in and out of SQLite or PostgreSQL.

One :class:`Store` holds one SQLAlchemy engine (a connection pool) for the life of the broker;
each method is one short transaction of a few indexed statements. The attestation hot path
(``get_ak``, ``find_active_approvals``, ``get_data_key``, ``get_golden_set``, ``add_session``)
is one single-row or index-range statement each.
"""

from __future__ import annotations

import json
import threading
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row, make_url

from broker.errors import (
    BrokerError,
    CredentialError,
    DuplicateError,
    PolicyError,
    RevokedKeyError,
    StorageError,
    UnknownKeyError,
    UnknownPolicyObjectError,
    UnknownSessionError,
)
from broker.model import (
    AkRecord,
    Approval,
    CredentialChallenge,
    DataKeyRecord,
    EkRecord,
    GoldenPcrSet,
    Party,
    PartyKek,
    PcrKey,
    Session,
)
from broker.storage.engine import (
    SQLITE_SYNCHRONOUS,
    describe_error,
    install_sqlite_hooks,
    integrity_kind,
    prepare_schema,
    safe_url,
)
from broker.storage.fast import FastCursor, FastPath, FastStatement
from broker.storage.schema import (
    aks,
    approvals,
    credential_challenges,
    data_keys,
    eks,
    golden_sets,
    kek_fingerprints,
    parties,
    party_keks,
    sessions,
)
from broker.storage.unit import ChainStatements, UnitOfWork
from evidence.launch import Launch
from evidence.manifest import ManifestEntry, files_pcr23

#: The most decoded approvals one Store keeps (beyond it, approvals are decoded per lookup).
_MAX_CACHED_APPROVALS: Final = 10_000

#: The PCR bank whose PCR 23 value indexes approvals (see :meth:`Store.find_active_approvals`).
APPROVAL_INDEX_BANK: Final = "sha256"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Store:
    """The broker's database: SQLite (default, one file, WAL) or PostgreSQL (several replicas).

    Build one with :meth:`open`; use it as a context manager or call :meth:`close`. A Store is
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
        #: The hot-path executor (see broker.storage.fast); broker.nonces and broker.audit
        #: prepare their statements on it too.
        self.fast = FastPath(
            fast_engine or engine,
            display_url=display_url,
            writer=self._writer,
            integrity_kind=integrity_kind,
            describe=describe_error,
        )
        self._q = _HotQueries(self.fast)
        self._chain = ChainStatements(self.fast)
        self._dbapi: Any = engine.dialect.loaded_dbapi
        # Decoded approvals by id, for find_active_approvals. An approval is never changed
        # once stored except for ``revoked``, which every lookup reads fresh from the database
        # (the query selects the ids of unrevoked approvals), so an entry never goes stale,
        # whichever process or replica revokes it. Only unrevoked approvals are cached.
        self._approvals: dict[str, Approval] = {}

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
    ) -> Store:
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

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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

        This is the building block of every method here and of ``broker.nonces`` and
        ``broker.audit``. ``write`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``),
        which a transaction that will write must do: a deferred transaction that upgrades to
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
    def _write(
        self,
        operation: str,
        uow: UnitOfWork | None,
        *,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[Connection]:
        """A write transaction of its own, or the statements of ``uow``'s (whose errors are
        mapped here, so that the caller sees the same error either way, and which then rolls
        back as a whole)."""
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

    @contextmanager
    def unit_of_work(
        self,
        operation: str,
        *,
        duplicate: BrokerError | None = None,
        missing_reference: BrokerError | None = None,
    ) -> Iterator[UnitOfWork]:
        """One decision's transaction (see :mod:`broker.storage.unit`): the audit chain head is
        locked first; the repository's write methods (``uow=``), the audit log
        (:meth:`broker.audit.AuditLog.append_in`) and the nonce service write in it; it commits
        when the block ends without an exception and rolls back as a whole otherwise.

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
                uow = UnitOfWork(
                    cursor=self.fast.cursor_for(driver_cursor), chain=self._chain, conn=conn
                )
                yield uow
                uow.finish()
            except ValueError as e:
                raise StorageError(f"{operation}: {e}") from e
            except self._dbapi.Error as e:
                raise self._mapped(operation, e, duplicate, missing_reference) from e
            finally:
                driver_cursor.close()

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
            uow = UnitOfWork(cursor=cur, chain=self._chain)
            yield uow
            uow.finish()

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

    # --- KEK fingerprints -----------------------------------------------------------------

    def kek_fingerprints(self) -> dict[str, str]:
        """The fingerprint recorded for each KEK ref (see ``cleanroom broker init``).

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("read KEK fingerprints") as conn:
            rows = conn.execute(sa.select(kek_fingerprints)).all()
        return {r.kek_ref: r.fingerprint for r in rows}

    def record_kek_fingerprint(
        self, kek_ref: str, fingerprint: str, *, at: datetime, uow: UnitOfWork | None = None
    ) -> str:
        """Records ``fingerprint`` for ``kek_ref`` unless one is recorded already; returns the
        fingerprint recorded (the earlier one, when there was one: the caller compares).

        Raises:
            StorageError: the database failed.
        """
        t = kek_fingerprints
        with self._write("record KEK fingerprint", uow) as conn:
            found = conn.execute(sa.select(t.c.fingerprint).where(t.c.kek_ref == kek_ref)).first()
            if found is not None:
                return str(found.fingerprint)
            conn.execute(
                sa.insert(t).values(kek_ref=kek_ref, fingerprint=fingerprint, recorded_at=at)
            )
        return fingerprint

    # --- endorsement keys -----------------------------------------------------------------

    def add_ek(self, record: EkRecord, *, uow: UnitOfWork | None = None) -> None:
        """Enrolls an EK.

        Raises:
            DuplicateError: an EK with this id is already enrolled.
            StorageError: the database failed.
        """
        with self._write(
            "add EK", uow, duplicate=DuplicateError(f"EK {record.ek_id} is already enrolled")
        ) as conn:
            conn.execute(
                sa.insert(eks).values(
                    ek_id=record.ek_id,
                    public=record.public,
                    certificate=record.certificate,
                    enrolled_at=record.enrolled_at,
                    revoked=record.revoked,
                    revoked_reason=record.revoked_reason,
                )
            )

    def get_ek(self, ek_id: str) -> EkRecord:
        """The EK with this id (revoked or not).

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with self.fast.session("get EK") as cur:
            row = cur.one(self._q.get_ek, {"ek_id": ek_id})
        if row is None:
            raise UnknownKeyError(f"EK {ek_id} is not enrolled")
        return _ek(row)

    def list_eks(self) -> list[EkRecord]:
        """Every EK, by id.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("list EKs") as conn:
            rows = conn.execute(sa.select(eks).order_by(eks.c.ek_id)).all()
        return [_ek(r) for r in rows]

    def revoke_ek(self, ek_id: str, reason: str, *, uow: UnitOfWork | None = None) -> None:
        """Revokes an EK and every AK enrolled under it, in one transaction.

        ``ek_id`` is the canonical identity (``broker.tpmkeys.ek_identity``), so the revocation
        reaches every encoding of the key. Already revoked keys keep their first reason. The AKs
        get the reason ``"EK revoked: <reason>"``.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with self._write("revoke EK", uow) as conn:
            # The row lock makes a concurrent add_ak under this EK (which takes a share lock
            # on it) finish first, so that the AK update below sees its AK.
            found = conn.execute(
                sa.select(eks.c.ek_id).where(eks.c.ek_id == ek_id).with_for_update()
            ).one_or_none()
            if found is not None:
                conn.execute(
                    sa.update(eks)
                    .where(eks.c.ek_id == ek_id, eks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=reason)
                )
                conn.execute(
                    sa.update(aks)
                    .where(aks.c.ek_id == ek_id, aks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=f"EK revoked: {reason}")
                )
        if found is None:
            raise UnknownKeyError(f"EK {ek_id} is not enrolled")

    # --- attestation keys -----------------------------------------------------------------

    def add_ak(self, record: AkRecord, *, uow: UnitOfWork | None = None) -> None:
        """Enrolls an AK, under an EK or (``ek_id`` None) directly by the operator.

        Raises:
            DuplicateError: an AK with this name is already enrolled.
            UnknownKeyError: its EK is not enrolled.
            RevokedKeyError: its EK is revoked.
            StorageError: the database failed.
        """
        with self._write(
            "add AK",
            uow,
            duplicate=DuplicateError(f"AK {record.ak_name} is already enrolled"),
            missing_reference=UnknownKeyError(f"EK {record.ek_id} is not enrolled"),
        ) as conn:
            problem: BrokerError | None = None
            if record.ek_id is not None:
                # A share lock: revoke_ek cannot slip in between this check and the insert.
                ek_revoked = conn.execute(
                    sa.select(eks.c.revoked)
                    .where(eks.c.ek_id == record.ek_id)
                    .with_for_update(read=True)
                ).scalar_one_or_none()
                if ek_revoked is None:
                    problem = UnknownKeyError(f"EK {record.ek_id} is not enrolled")
                elif ek_revoked:
                    problem = RevokedKeyError(f"EK {record.ek_id} is revoked")
            if problem is None:
                conn.execute(
                    sa.insert(aks).values(
                        ak_name=record.ak_name,
                        public=record.public,
                        ek_id=record.ek_id,
                        enrolled_by=record.enrolled_by,
                        enrolled_at=record.enrolled_at,
                        revoked=record.revoked,
                        revoked_reason=record.revoked_reason,
                    )
                )
        if problem is not None:
            raise problem

    def get_ak(self, ak_name: str) -> AkRecord:
        """The AK with this name (revoked or not: callers check ``revoked``).

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        with self.fast.session("get AK") as cur:
            row = cur.one(self._q.get_ak, {"ak_name": ak_name})
        if row is None:
            raise UnknownKeyError(f"AK {ak_name} is not enrolled")
        return _ak(row)

    def list_aks(self) -> list[AkRecord]:
        """Every AK, by name.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("list AKs") as conn:
            rows = conn.execute(sa.select(aks).order_by(aks.c.ak_name)).all()
        return [_ak(r) for r in rows]

    def revoke_ak(self, ak_name: str, reason: str, *, uow: UnitOfWork | None = None) -> str | None:
        """Revokes an AK (an already revoked one keeps its first reason) and, in the same
        transaction, keeps its EK out: the EK is marked revoked with the reason
        ``"AK <name> revoked: <reason>"`` (unless it is revoked already), so that the TPM enrolls
        no other AK until the operator re-admits the EK (:meth:`readmit_ek`).

        Returns the id of the EK it kept out, or None (no EK, or the EK was revoked already).

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        with self._write("revoke AK", uow) as conn:
            row = conn.execute(sa.select(aks.c.ek_id).where(aks.c.ak_name == ak_name)).one_or_none()
            blocked: str | None = None
            if row is not None:
                conn.execute(
                    sa.update(aks)
                    .where(aks.c.ak_name == ak_name, aks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=reason)
                )
                if row.ek_id is not None:
                    updated = conn.execute(
                        sa.update(eks)
                        .where(eks.c.ek_id == row.ek_id, eks.c.revoked.is_(False))
                        .values(revoked=True, revoked_reason=f"AK {ak_name} revoked: {reason}")
                    ).rowcount
                    blocked = row.ek_id if updated else None
        if row is None:
            raise UnknownKeyError(f"AK {ak_name} is not enrolled")
        return blocked

    def readmit_ek(self, ek_id: str, *, uow: UnitOfWork | None = None) -> str | None:
        """Lifts an EK's revocation (by ``ek revoke`` or by the revocation of one of its AKs), so
        that its TPM may enroll AKs again. AKs revoked before stay revoked.

        Returns the reason of the revocation it lifted, or None when the EK was not revoked.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with self._write("re-admit EK", uow) as conn:
            row = conn.execute(
                sa.select(eks.c.revoked, eks.c.revoked_reason)
                .where(eks.c.ek_id == ek_id)
                .with_for_update()
            ).one_or_none()
            if row is not None and row.revoked:
                conn.execute(
                    sa.update(eks)
                    .where(eks.c.ek_id == ek_id)
                    .values(revoked=False, revoked_reason="")
                )
        if row is None:
            raise UnknownKeyError(f"EK {ek_id} is not enrolled")
        return str(row.revoked_reason or "revoked") if row.revoked else None

    def get_attester(self, ak_name: str) -> tuple[AkRecord, EkRecord | None]:
        """The AK with this name and the EK it is bound to (None for an AK without one), read in
        one statement: the challenge and attestation paths check both for revocation.

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        with self.fast.session("get AK") as cur:
            row = cur.one(self._q.get_attester, {"ak_name": ak_name})
        if row is None:
            raise UnknownKeyError(f"AK {ak_name} is not enrolled")
        ak = _ak(row)
        if row.ek_ek_id is None:
            return ak, None
        return ak, EkRecord(
            ek_id=row.ek_ek_id,
            public=bytes(row.ek_public),
            certificate=None if row.ek_certificate is None else bytes(row.ek_certificate),
            enrolled_at=row.ek_enrolled_at,
            revoked=bool(row.ek_revoked),
            revoked_reason=row.ek_revoked_reason,
        )

    def add_activated_ak(
        self, ek: EkRecord, ak: AkRecord, *, uow: UnitOfWork | None = None
    ) -> bool:
        """Enrolls an AK whose credential activation under ``ek`` succeeded, enrolling the EK in
        the same transaction when it is not enrolled yet: an EK is recorded only together with
        the first AK proven to live beside it.

        Returns whether the EK was enrolled now.

        Raises:
            RevokedKeyError: the EK is revoked (or kept out after an AK revocation).
            DuplicateError: an AK with this name is already enrolled.
            StorageError: the database failed.
        """
        with self._write(
            "add activated AK",
            uow,
            duplicate=DuplicateError(f"AK {ak.ak_name} is already enrolled"),
        ) as conn:
            # An update lock (PostgreSQL) so that revoke_ek and readmit_ek wait for this
            # enrollment or this enrollment for them; SQLite's write lock already serializes.
            revoked = conn.execute(
                sa.select(eks.c.revoked).where(eks.c.ek_id == ek.ek_id).with_for_update()
            ).scalar_one_or_none()
            created = revoked is None
            if created:
                conn.execute(
                    sa.insert(eks).values(
                        ek_id=ek.ek_id,
                        public=ek.public,
                        certificate=ek.certificate,
                        enrolled_at=ek.enrolled_at,
                        revoked=False,
                        revoked_reason="",
                    )
                )
            if not revoked:
                conn.execute(
                    sa.insert(aks).values(
                        ak_name=ak.ak_name,
                        public=ak.public,
                        ek_id=ek.ek_id,
                        enrolled_by=ak.enrolled_by,
                        enrolled_at=ak.enrolled_at,
                        revoked=False,
                        revoked_reason="",
                    )
                )
        if revoked:
            raise RevokedKeyError(f"EK {ek.ek_id} is revoked")
        return created

    # --- credential challenges ------------------------------------------------------------

    def put_credential_challenge(
        self, challenge: CredentialChallenge, *, uow: UnitOfWork | None = None
    ) -> None:
        """Stores a challenge, replacing any outstanding one for the same AK (one per AK).

        Raises:
            DuplicateError: another AK's challenge has this enrollment id.
            StorageError: the database failed.
        """
        values = {
            "enrollment_id": challenge.enrollment_id,
            "ak_name": challenge.ak_name,
            "ak_public": challenge.ak_public,
            "ek_id": challenge.ek_id,
            "secret_digest": challenge.secret_digest,
            "expires_at": challenge.expires_at,
            "ek_public": challenge.ek_public,
            "ek_certificate": challenge.ek_certificate,
            "ek_basis": challenge.ek_basis,
            "requester": challenge.requester,
        }
        with self._write(
            "put credential challenge",
            uow,
            duplicate=DuplicateError(f"enrollment id {challenge.enrollment_id} is in use"),
        ) as conn:
            # One statement, so that two replicas replacing the same AK's challenge at once
            # cannot both insert: the AK's unique index decides, the later write wins.
            stmt = self._upsert(credential_challenges, values, ["ak_name"])
            conn.execute(stmt)

    def take_credential_challenge(
        self,
        enrollment_id: str,
        now: datetime,
        requester: str,
        *,
        uow: UnitOfWork | None = None,
    ) -> CredentialChallenge:
        """Removes and returns the challenge that ``requester`` started, atomically (a second
        take finds nothing). A challenge that another identity started is left in place.

        Raises:
            CredentialError: no such challenge (never issued, replaced, or already taken), it
                belongs to another identity, or it expired (it is removed all the same).
            StorageError: the database failed.
        """
        t = credential_challenges
        with self._write("take credential challenge", uow) as conn:
            row = conn.execute(
                sa.delete(t)
                .where(t.c.enrollment_id == enrollment_id, t.c.requester == requester)
                .returning(*t.c)
            ).one_or_none()
            owner = (
                conn.execute(
                    sa.select(t.c.requester).where(t.c.enrollment_id == enrollment_id)
                ).scalar_one_or_none()
                if row is None
                else None
            )
        if owner is not None:
            raise CredentialError(
                f"the credential challenge was issued to {owner}, not to {requester}"
            )
        if row is None:
            raise CredentialError("unknown credential challenge (never issued, replaced or used)")
        challenge = _challenge(row)
        if now >= challenge.expires_at:
            raise CredentialError("the credential challenge expired")
        return challenge

    def purge_credential_challenges(self, now: datetime) -> int:
        """Deletes challenges expired at ``now``; returns how many.

        Raises:
            StorageError: the database failed.
        """
        t = credential_challenges
        with self.transaction("purge credential challenges", write=True) as conn:
            return conn.execute(sa.delete(t).where(t.c.expires_at <= now)).rowcount

    # --- golden PCR sets ------------------------------------------------------------------

    def put_golden_set(self, golden: GoldenPcrSet, *, uow: UnitOfWork | None = None) -> None:
        """Creates or replaces the golden set of this name.

        Raises:
            StorageError: the database failed.
        """
        values = {
            "name": golden.name,
            "accepted": _encode_accepted(golden.accepted),
            "updated_at": golden.updated_at,
        }
        with self._write("put golden set", uow) as conn:
            conn.execute(self._upsert(golden_sets, values, ["name"]))

    def get_golden_set(self, name: str) -> GoldenPcrSet:
        """The golden set of this name.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        with self.fast.session("get golden set") as cur:
            row = cur.one(self._q.get_golden_set, {"name": name})
        if row is None:
            raise UnknownPolicyObjectError(f"golden set {name!r} does not exist")
        return _golden(row)

    def list_golden_sets(self) -> list[GoldenPcrSet]:
        """Every golden set, by name.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("list golden sets") as conn:
            rows = conn.execute(sa.select(golden_sets).order_by(golden_sets.c.name)).all()
        return [_golden(r) for r in rows]

    def delete_golden_set(self, name: str, *, uow: UnitOfWork | None = None) -> None:
        """Deletes a golden set. Approvals that name it then fail closed at attestation.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        with self._write("delete golden set", uow) as conn:
            n = conn.execute(sa.delete(golden_sets).where(golden_sets.c.name == name)).rowcount
        if n == 0:
            raise UnknownPolicyObjectError(f"golden set {name!r} does not exist")

    # --- parties --------------------------------------------------------------------------

    def add_party(self, party: Party, *, uow: UnitOfWork | None = None) -> None:
        """Registers a party.

        Raises:
            DuplicateError: a party of this name exists.
            StorageError: the database failed.
        """
        with self._write(
            "add party", uow, duplicate=DuplicateError(f"party {party.name!r} exists")
        ) as conn:
            conn.execute(
                sa.insert(parties).values(
                    name=party.name, kem=party.kem, public_key=party.public_key
                )
            )

    def get_party(self, name: str) -> Party:
        """The party of this name.

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        with self.fast.session("get party") as cur:
            row = cur.one(self._q.get_party, {"name": name})
        if row is None:
            raise UnknownPolicyObjectError(f"party {name!r} does not exist")
        return _party(row)

    def list_parties(self) -> list[Party]:
        """Every party, by name.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("list parties") as conn:
            rows = conn.execute(sa.select(parties).order_by(parties.c.name)).all()
        return [_party(r) for r in rows]

    # --- party KEKs -----------------------------------------------------------------------

    def set_party_kek(
        self,
        party: str,
        kek_ref: str,
        *,
        checked_key: str,
        updated_at: datetime,
        uow: UnitOfWork | None = None,
    ) -> None:
        """Records (or replaces) the KEK that wraps ``party``'s new data keys.

        ``checked_key`` is what the broker's check of the KEK found (the versioned Key Vault key
        id); it is kept for the operator's reference only.

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        values = {
            "party": party,
            "kek_ref": kek_ref,
            "checked_key": checked_key,
            "updated_at": updated_at,
        }
        with self._write(
            "set party KEK",
            uow,
            missing_reference=UnknownPolicyObjectError(f"party {party!r} does not exist"),
        ) as conn:
            conn.execute(self._upsert(party_keks, values, ["party"]))

    def get_party_kek(self, party: str) -> PartyKek | None:
        """The KEK recorded for ``party``, or None when none was.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("get party KEK") as conn:
            row = conn.execute(sa.select(party_keks).where(party_keks.c.party == party)).first()
        return _party_kek(row) if row is not None else None

    def list_party_keks(self) -> list[PartyKek]:
        """Every recorded party KEK, by party.

        Raises:
            StorageError: the database failed.
        """
        with self.transaction("list party KEKs") as conn:
            rows = conn.execute(sa.select(party_keks).order_by(party_keks.c.party)).all()
        return [_party_kek(r) for r in rows]

    # --- data keys ------------------------------------------------------------------------

    def add_data_key(self, record: DataKeyRecord, *, uow: UnitOfWork | None = None) -> None:
        """Stores a party's wrapped data key.

        Raises:
            DuplicateError: a key with this id exists.
            UnknownPolicyObjectError: the owner is not a registered party.
            StorageError: the database failed.
        """
        with self._write(
            "add data key",
            uow,
            duplicate=DuplicateError(f"data key {record.key_id!r} exists"),
            missing_reference=UnknownPolicyObjectError(f"party {record.owner!r} does not exist"),
        ) as conn:
            conn.execute(
                sa.insert(data_keys).values(
                    key_id=record.key_id,
                    owner=record.owner,
                    wrapped_key=record.wrapped_key,
                    kek_ref=record.kek_ref,
                    created_at=record.created_at,
                    description=record.description,
                )
            )

    def get_data_key(self, key_id: str) -> DataKeyRecord:
        """The data key with this id (still wrapped).

        Raises:
            UnknownPolicyObjectError: no such key.
            StorageError: the database failed.
        """
        with self.fast.session("get data key") as cur:
            row = cur.one(self._q.get_data_key, {"key_id": key_id})
        if row is None:
            raise UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
        return _data_key(row)

    def get_data_keys(self, key_ids: Sequence[str]) -> list[DataKeyRecord]:
        """Several data keys in one statement, in the order asked.

        Raises:
            UnknownPolicyObjectError: one of them does not exist.
            StorageError: the database failed.
        """
        if not key_ids:
            return []
        with self.transaction("get data keys") as conn:
            rows = conn.execute(
                sa.select(data_keys).where(data_keys.c.key_id.in_(set(key_ids)))
            ).all()
        found = {r.key_id: _data_key(r) for r in rows}
        for key_id in key_ids:
            if key_id not in found:
                raise UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
        return [found[k] for k in key_ids]

    def list_data_keys(self, owner: str | None = None) -> list[DataKeyRecord]:
        """Every data key (or one owner's), by id.

        Raises:
            StorageError: the database failed.
        """
        stmt = sa.select(data_keys).order_by(data_keys.c.key_id)
        if owner is not None:
            stmt = stmt.where(data_keys.c.owner == owner)
        with self.transaction("list data keys") as conn:
            rows = conn.execute(stmt).all()
        return [_data_key(r) for r in rows]

    def rewrap_data_key(
        self, key_id: str, wrapped_key: bytes, kek_ref: str, *, uow: UnitOfWork | None = None
    ) -> None:
        """Replaces a key's wrapping (KEK rotation): the same data key under another KEK.

        Raises:
            UnknownPolicyObjectError: no such key.
            StorageError: the database failed.
        """
        with self._write("rewrap data key", uow) as conn:
            n = conn.execute(
                sa.update(data_keys)
                .where(data_keys.c.key_id == key_id)
                .values(wrapped_key=wrapped_key, kek_ref=kek_ref)
            ).rowcount
        if n == 0:
            raise UnknownPolicyObjectError(f"data key {key_id!r} does not exist")

    # --- approvals ------------------------------------------------------------------------

    def add_approval(self, approval: Approval, *, uow: UnitOfWork | None = None) -> None:
        """Stores a party's approval of a workload, after checking what it names.

        The party, every key, every output recipient and the golden set (when named) must
        exist; every key must be the party's own; ``expected_pcrs`` must hold a sha256 value
        (approvals are found by it at attestation).

        Raises:
            UnknownPolicyObjectError: the party, a key, a recipient or the golden set does not
                exist.
            PolicyError: a key belongs to another party, a key is named twice, or the sha256
                PCR value is missing or malformed.
            DuplicateError: an approval with this id exists.
            StorageError: the database failed.
        """
        sha256 = approval.expected_pcrs.get(APPROVAL_INDEX_BANK)
        if sha256 is None or len(sha256) != 32:
            raise PolicyError("an approval needs the expected sha256 PCR 23 value (32 bytes)")
        if len(set(approval.key_ids)) != len(approval.key_ids):
            raise PolicyError("an approval names a key twice")
        problem: BrokerError | None = None
        with self._write(
            "add approval",
            uow,
            duplicate=DuplicateError(f"approval {approval.approval_id!r} exists"),
        ) as conn:
            wanted_parties = {approval.party, *approval.output_recipients}
            known = set(
                conn.execute(
                    sa.select(parties.c.name).where(parties.c.name.in_(wanted_parties))
                ).scalars()
            )
            owners: dict[str, str] = {}
            if approval.key_ids:
                owners = {
                    r.key_id: r.owner
                    for r in conn.execute(
                        sa.select(data_keys.c.key_id, data_keys.c.owner).where(
                            data_keys.c.key_id.in_(approval.key_ids)
                        )
                    )
                }
            golden_exists = approval.golden_set is None or (
                conn.execute(
                    sa.select(golden_sets.c.name).where(golden_sets.c.name == approval.golden_set)
                ).first()
                is not None
            )
            problem = _approval_problem(approval, known, owners, golden_exists)
            if problem is None:
                conn.execute(sa.insert(approvals).values(**_approval_values(approval, sha256)))
        if problem is not None:
            raise problem

    def get_approval(self, approval_id: str) -> Approval:
        """The approval with this id (revoked or not).

        Raises:
            UnknownPolicyObjectError: no such approval.
            StorageError: the database failed.
        """
        with self.transaction("get approval") as conn:
            row = conn.execute(
                sa.select(approvals).where(approvals.c.approval_id == approval_id)
            ).one_or_none()
        if row is None:
            raise UnknownPolicyObjectError(f"approval {approval_id!r} does not exist")
        return _approval(row)

    def list_approvals(
        self, party: str | None = None, include_revoked: bool = True
    ) -> list[Approval]:
        """Approvals (all, or one party's), oldest first.

        Raises:
            StorageError: the database failed.
        """
        stmt = sa.select(approvals).order_by(approvals.c.created_at, approvals.c.approval_id)
        if party is not None:
            stmt = stmt.where(approvals.c.party == party)
        if not include_revoked:
            stmt = stmt.where(approvals.c.revoked.is_(False))
        with self.transaction("list approvals") as conn:
            rows = conn.execute(stmt).all()
        return [_approval(r) for r in rows]

    def revoke_approval(self, approval_id: str, *, uow: UnitOfWork | None = None) -> None:
        """Revokes an approval (idempotent).

        Raises:
            UnknownPolicyObjectError: no such approval.
            StorageError: the database failed.
        """
        with self._write("revoke approval", uow) as conn:
            n = conn.execute(
                sa.update(approvals)
                .where(approvals.c.approval_id == approval_id)
                .values(revoked=True)
            ).rowcount
        # Not needed for correctness (lookups read ``revoked`` fresh), only to free the entry.
        self._approvals.pop(approval_id, None)
        if n == 0:
            raise UnknownPolicyObjectError(f"approval {approval_id!r} does not exist")

    def find_active_approvals(
        self, expected_pcr_sha256: bytes, *, files_pcr_sha256: bytes | None = None
    ) -> list[Approval]:
        """Unrevoked approvals whose expected sha256 PCR 23 value is this one, or whose files
        alone give ``files_pcr_sha256`` (approvals of the same files with another launch),
        oldest first.

        This is the attestation hot path: one index lookup for the ids; the approvals
        themselves come from a cache (their contents never change, only ``revoked``).

        Raises:
            StorageError: the database failed.
        """
        with self.fast.session("find approvals") as cur:
            ids = cur.all(
                self._q.find_active_approval_ids,
                # A value no approval has stands for "no files value": the statement is prepared
                # once, with both parameters.
                {"pcr": expected_pcr_sha256, "files_pcr": files_pcr_sha256 or b""},
            )
            out: list[Approval] = []
            for (approval_id,) in ids:
                approval = self._approvals.get(approval_id)
                if approval is None:
                    row = cur.one(self._q.get_approval, {"approval_id": approval_id})
                    if row is None or row.revoked:
                        # Revoked between the two statements: it is not active.
                        continue
                    approval = _approval(row)
                    if len(self._approvals) < _MAX_CACHED_APPROVALS:
                        self._approvals[approval_id] = approval
                out.append(approval)
        return out

    # --- sessions -------------------------------------------------------------------------

    def add_session(self, session: Session) -> None:
        """Records an attested session.

        Raises:
            DuplicateError: a session with this id exists.
            UnknownKeyError: its AK is not enrolled.
            StorageError: the database failed.
        """
        duplicate, missing = self.session_errors(session)
        with self.fast.session(
            "add session", write=True, duplicate=duplicate, missing_reference=missing
        ) as cur:
            self.insert_session(cur, session)

    def session_errors(self, session: Session) -> tuple[BrokerError, BrokerError]:
        """The ``duplicate`` and ``missing_reference`` errors of a fast-path session that
        inserts ``session`` (for :meth:`insert_session` inside another write)."""
        return (
            DuplicateError(f"session {session.session_id!r} exists"),
            UnknownKeyError(f"AK {session.ak_name} is not enrolled"),
        )

    def insert_session(self, cur: FastCursor, session: Session) -> None:
        """Inserts ``session`` on a cursor of a caller's write session (``self.fast.session(...,
        write=True)``), so that it commits, or not, with the caller's other statements; the
        audit log records a release and its session this way in one transaction.

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error, which the enclosing
                ``fast.session`` maps (with :meth:`session_errors`) to a broker error.
        """
        cur.execute(
            self._q.add_session,
            {
                "session_id": session.session_id,
                "ak_name": session.ak_name,
                "peer": session.peer,
                "started_at": session.started_at,
                "expires_at": session.expires_at,
                "released_key_ids": _dumps(list(session.released_key_ids)),
                "ended_at": session.ended_at,
                "exit_code": session.exit_code,
            },
        )

    def still_active(
        self, uow: UnitOfWork, *, ak_name: str, approval_ids: Sequence[str]
    ) -> tuple[bool, frozenset[str]]:
        """Inside a release's unit of work: whether the AK and its EK (if it has one) are still
        unrevoked, and which of ``approval_ids`` still are (one statement).

        Run after the unit locked the chain head, this sees every revocation whose unit of work
        committed before (each revocation appends its record, so it took the head too), and no
        revocation can commit until this unit has: the release and the revocations are ordered
        in the chain as they happened.

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        ids: Any = (
            list(approval_ids) if self.dialect == "postgresql" else _dumps(list(approval_ids))
        )
        rows = uow.cursor.all(self._q.still_active, {"ak": ak_name, "ids": ids})
        ak_ok = any(r.kind == "ak" for r in rows)
        return ak_ok, frozenset(r.id for r in rows if r.kind == "approval")

    def end_session(
        self, session_id: str, ended_at: datetime, exit_code: int, *, uow: UnitOfWork | None = None
    ) -> Session:
        """Marks a session ended and returns it. Ending an ended session changes nothing
        (a retried call is harmless) and returns it as first ended.

        Raises:
            UnknownSessionError: no such session.
            StorageError: the database failed.
        """
        with self._write("end session", uow) as conn:
            conn.execute(
                sa.update(sessions)
                .where(sessions.c.session_id == session_id, sessions.c.ended_at.is_(None))
                .values(ended_at=ended_at, exit_code=exit_code)
            )
            row = conn.execute(
                sa.select(sessions).where(sessions.c.session_id == session_id)
            ).one_or_none()
        if row is None:
            raise UnknownSessionError(f"session {session_id!r} does not exist")
        return _session(row)

    def get_session(self, session_id: str) -> Session:
        """The session with this id.

        Raises:
            UnknownSessionError: no such session.
            StorageError: the database failed.
        """
        with self.transaction("get session") as conn:
            row = conn.execute(
                sa.select(sessions).where(sessions.c.session_id == session_id)
            ).one_or_none()
        if row is None:
            raise UnknownSessionError(f"session {session_id!r} does not exist")
        return _session(row)

    # --- helpers --------------------------------------------------------------------------

    def _upsert(self, table: sa.Table, values: Mapping[str, Any], conflict: list[str]) -> sa.Insert:
        """INSERT ... ON CONFLICT (conflict) DO UPDATE SET every other column."""
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


class _HotQueries:
    """The repository's hot-path statements, compiled once for the Store's backend."""

    def __init__(self, fast: FastPath) -> None:
        self.get_ek = fast.prepare(sa.select(eks).where(eks.c.ek_id == sa.bindparam("ek_id")))
        self.get_ak = fast.prepare(sa.select(aks).where(aks.c.ak_name == sa.bindparam("ak_name")))
        # The AK and its EK in one round trip (LEFT JOIN: an operator's AK may have no EK).
        self.get_attester = fast.prepare(
            sa.select(
                aks,
                *(c.label(f"ek_{c.name}") for c in eks.c),
            )
            .select_from(aks.outerjoin(eks, aks.c.ek_id == eks.c.ek_id))
            .where(aks.c.ak_name == sa.bindparam("ak_name"))
        )
        self.get_party = fast.prepare(
            sa.select(parties).where(parties.c.name == sa.bindparam("name"))
        )
        self.get_data_key = fast.prepare(
            sa.select(data_keys).where(data_keys.c.key_id == sa.bindparam("key_id"))
        )
        self.get_golden_set = fast.prepare(
            sa.select(golden_sets).where(golden_sets.c.name == sa.bindparam("name"))
        )
        self.get_approval = fast.prepare(
            sa.select(approvals).where(approvals.c.approval_id == sa.bindparam("approval_id"))
        )
        # Only the ids: the rest of an unrevoked approval never changes (see _approvals).
        self.find_active_approval_ids = fast.prepare(
            sa.select(approvals.c.approval_id)
            .where(
                sa.or_(
                    approvals.c.expected_pcr_sha256 == sa.bindparam("pcr"),
                    approvals.c.files_pcr_sha256 == sa.bindparam("files_pcr"),
                ),
                approvals.c.revoked.is_(False),
            )
            .order_by(approvals.c.created_at, approvals.c.approval_id)
        )
        self.add_session = fast.prepare(sa.insert(sessions))
        # Which of an AK (with its EK: an AK whose EK is revoked or kept out is not active)
        # and a list of approvals are still unrevoked, in one statement: the list is an array
        # on PostgreSQL and a JSON array on SQLite (a prepared statement cannot expand an IN
        # list).
        if fast.dialect == "postgresql":
            sql = (
                "SELECT 'ak' AS kind, a.ak_name AS id FROM aks a"
                " LEFT JOIN eks e ON e.ek_id = a.ek_id"
                " WHERE a.ak_name = %(ak)s AND a.revoked = false AND e.revoked IS NOT TRUE"
                " UNION ALL SELECT 'approval', approval_id FROM approvals"
                " WHERE approval_id = ANY(%(ids)s) AND revoked = false"
            )
        else:
            sql = (
                "SELECT 'ak' AS kind, a.ak_name AS id FROM aks a"
                " LEFT JOIN eks e ON e.ek_id = a.ek_id"
                " WHERE a.ak_name = :ak AND a.revoked = 0 AND coalesce(e.revoked, 0) = 0"
                " UNION ALL SELECT 'approval', approval_id FROM approvals"
                " WHERE approval_id IN (SELECT value FROM json_each(:ids)) AND revoked = 0"
            )
        self.still_active = FastStatement(
            sql, {}, namedtuple("ActiveRow", ["kind", "id"]), (None, None)
        )


# --- engine setup -------------------------------------------------------------------------


# --- row <-> object -----------------------------------------------------------------------


def _ek(row: Row[Any]) -> EkRecord:
    return EkRecord(
        ek_id=row.ek_id,
        public=bytes(row.public),
        certificate=None if row.certificate is None else bytes(row.certificate),
        enrolled_at=row.enrolled_at,
        revoked=bool(row.revoked),
        revoked_reason=row.revoked_reason,
    )


def _ak(row: Row[Any]) -> AkRecord:
    return AkRecord(
        ak_name=row.ak_name,
        public=bytes(row.public),
        ek_id=row.ek_id,
        enrolled_by=row.enrolled_by,
        enrolled_at=row.enrolled_at,
        revoked=bool(row.revoked),
        revoked_reason=row.revoked_reason,
    )


def _challenge(row: Row[Any]) -> CredentialChallenge:
    return CredentialChallenge(
        enrollment_id=row.enrollment_id,
        ak_name=row.ak_name,
        ak_public=bytes(row.ak_public),
        ek_id=row.ek_id,
        secret_digest=bytes(row.secret_digest),
        expires_at=row.expires_at,
        ek_public=bytes(row.ek_public),
        ek_certificate=None if row.ek_certificate is None else bytes(row.ek_certificate),
        ek_basis=row.ek_basis,
        requester=row.requester,
    )


def _encode_accepted(accepted: Mapping[PcrKey, frozenset[bytes]]) -> str:
    entries = [
        {"index": key.index, "bank": key.bank, "values": sorted(v.hex() for v in values)}
        for key, values in accepted.items()
    ]
    entries.sort(key=lambda e: (e["index"], e["bank"]))
    return _dumps(entries)


def _golden(row: Row[Any]) -> GoldenPcrSet:
    accepted = {
        PcrKey(index=int(e["index"]), bank=str(e["bank"])): frozenset(
            bytes.fromhex(v) for v in e["values"]
        )
        for e in json.loads(row.accepted)
    }
    return GoldenPcrSet(name=row.name, accepted=accepted, updated_at=row.updated_at)


def _party(row: Row[Any]) -> Party:
    return Party(name=row.name, kem=int(row.kem), public_key=bytes(row.public_key))


def _party_kek(row: Row[Any]) -> PartyKek:
    return PartyKek(
        party=row.party,
        kek_ref=row.kek_ref,
        checked_key=row.checked_key,
        updated_at=row.updated_at,
    )


def _data_key(row: Row[Any]) -> DataKeyRecord:
    return DataKeyRecord(
        key_id=row.key_id,
        owner=row.owner,
        wrapped_key=bytes(row.wrapped_key),
        kek_ref=row.kek_ref,
        created_at=row.created_at,
        description=row.description,
    )


def _approval_problem(
    approval: Approval, known_parties: set[str], owners: Mapping[str, str], golden_exists: bool
) -> BrokerError | None:
    if approval.party not in known_parties:
        return UnknownPolicyObjectError(f"party {approval.party!r} does not exist")
    for key_id in approval.key_ids:
        owner = owners.get(key_id)
        if owner is None:
            return UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
        if owner != approval.party:
            return PolicyError(f"data key {key_id!r} belongs to another party")
    for recipient in approval.output_recipients:
        if recipient not in known_parties:
            return UnknownPolicyObjectError(f"output recipient {recipient!r} does not exist")
    if not golden_exists:
        return UnknownPolicyObjectError(f"golden set {approval.golden_set!r} does not exist")
    return None


def _approval_values(approval: Approval, sha256: bytes) -> dict[str, Any]:
    manifest = [
        {
            "path": e.path,
            "size": e.size,
            "digests": {bank: d.hex() for bank, d in e.digests.items()},
        }
        for e in approval.manifest
    ]
    return {
        "approval_id": approval.approval_id,
        "party": approval.party,
        "workload_name": approval.workload_name,
        "manifest": _dumps(manifest),
        "expected_pcrs": _dumps({b: v.hex() for b, v in approval.expected_pcrs.items()}),
        "expected_pcr_sha256": sha256,
        "key_ids": _dumps(list(approval.key_ids)),
        "output_recipients": _dumps(list(approval.output_recipients)),
        "golden_set": approval.golden_set,
        "created_at": approval.created_at,
        "revoked": approval.revoked,
        "require_snp": approval.require_snp,
        "launch": None if approval.launch is None else _dumps(_launch_doc(approval.launch)),
        "files_pcr_sha256": _files_pcr_sha256(approval.manifest),
    }


def _files_pcr_sha256(manifest: Sequence[ManifestEntry]) -> bytes | None:
    # An empty manifest is indexed by the reset value (its files' PCR is all zeros).
    return files_pcr23(manifest, APPROVAL_INDEX_BANK)


def _launch_doc(launch: Launch) -> dict[str, Any]:
    return {
        "argv": list(launch.argv),
        "executable": launch.executable,
        "executable_sha256": launch.executable_sha256.hex(),
        "env": [list(item) for item in launch.env],
        "cwd": launch.cwd,
    }


def _launch_from_doc(text: str | None) -> Launch | None:
    if text is None:
        return None
    doc = json.loads(text)
    return Launch(
        argv=tuple(doc["argv"]),
        executable=str(doc["executable"]),
        executable_sha256=bytes.fromhex(doc["executable_sha256"]),
        env=tuple((str(n), str(v)) for n, v in doc["env"]),
        cwd=str(doc["cwd"]),
    )


def _approval(row: Row[Any]) -> Approval:
    manifest = tuple(
        ManifestEntry(
            path=str(e["path"]),
            size=int(e["size"]),
            digests={str(b): bytes.fromhex(d) for b, d in e["digests"].items()},
        )
        for e in json.loads(row.manifest)
    )
    return Approval(
        approval_id=row.approval_id,
        party=row.party,
        workload_name=row.workload_name,
        manifest=manifest,
        expected_pcrs={str(b): bytes.fromhex(v) for b, v in json.loads(row.expected_pcrs).items()},
        key_ids=tuple(json.loads(row.key_ids)),
        output_recipients=tuple(json.loads(row.output_recipients)),
        golden_set=row.golden_set,
        created_at=row.created_at,
        revoked=bool(row.revoked),
        require_snp=bool(row.require_snp),
        launch=_launch_from_doc(row.launch),
    )


def _session(row: Row[Any]) -> Session:
    return Session(
        session_id=row.session_id,
        ak_name=row.ak_name,
        peer=row.peer,
        started_at=row.started_at,
        expires_at=row.expires_at,
        released_key_ids=tuple(json.loads(row.released_key_ids)),
        ended_at=row.ended_at,
        exit_code=row.exit_code,
    )
