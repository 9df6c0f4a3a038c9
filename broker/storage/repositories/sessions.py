"""Attested sessions: opened by a release, ended by the sidecar."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from broker.errors import BrokerError, DuplicateError, UnknownKeyError, UnknownSessionError
from broker.model import Session
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.fast import FastCursor
from broker.storage.schema import sessions
from broker.storage.unit import UnitOfWork


class SessionRepository:
    """Sessions."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._add_session = db.fast.prepare(sa.insert(sessions))

    def add_session(self, session: Session) -> None:
        """Records an attested session.

        Raises:
            DuplicateError: a session with this id exists.
            UnknownKeyError: its AK is not enrolled.
            StorageError: the database failed.
        """
        duplicate, missing = self.session_errors(session)
        with self._db.fast.session(
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
        """Inserts ``session`` on a cursor of a caller's write session (``self._db.fast.session(...,
        write=True)``), so that it commits, or not, with the caller's other statements; the
        audit log records a release and its session this way in one transaction.

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error, which the enclosing
                ``fast.session`` maps (with :meth:`session_errors`) to a broker error.
        """
        cur.execute(
            self._add_session,
            {
                "session_id": session.session_id,
                "ak_name": session.ak_name,
                "peer": session.peer,
                "started_at": session.started_at,
                "expires_at": session.expires_at,
                "released_key_ids": codec.dumps(list(session.released_key_ids)),
                "ended_at": session.ended_at,
                "exit_code": session.exit_code,
            },
        )

    def end_session(
        self, session_id: str, ended_at: datetime, exit_code: int, *, uow: UnitOfWork | None = None
    ) -> Session:
        """Marks a session ended and returns it. Ending an ended session changes nothing
        (a retried call is harmless) and returns it as first ended.

        Raises:
            UnknownSessionError: no such session.
            StorageError: the database failed.
        """
        with self._db.write("end session", uow) as conn:
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
        return codec.session(row)

    def get_session(self, session_id: str) -> Session:
        """The session with this id.

        Raises:
            UnknownSessionError: no such session.
            StorageError: the database failed.
        """
        row = self._db.select_one(
            "get session",
            sa.select(sessions).where(sessions.c.session_id == session_id),
            UnknownSessionError(f"session {session_id!r} does not exist"),
        )
        return codec.session(row)
