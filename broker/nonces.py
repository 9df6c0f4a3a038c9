"""Single-use attestation nonces, bound to an AK, with a short time to live.

A nonce is burned by one conditional ``UPDATE ... SET used_at = now WHERE nonce = :n AND
used_at IS NULL RETURNING ak_name, expires_at``. The database applies that statement to the row
atomically, so of any number of concurrent consumers, in one broker or in several replicas on
one PostgreSQL database, exactly one gets the row back; every other one gets nothing and is
refused as a replay. Only when the burn did not succeed cleanly does a second read find out why.

A nonce presented with the wrong AK, or after its expiry, is refused *and burned*: its real
owner then has to ask for a new one (one extra round trip), which is cheaper than letting
someone who has seen a nonce probe with it. Nonces are stored raw: see the ``nonces`` table in
:mod:`broker.storage.schema` for why that is safe.

:meth:`NonceService.issue_recorded` writes the nonce and its audit record in one transaction;
the record holds the nonce's SHA-256 (:func:`nonce_digest`), not the nonce.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit import AuditLog
from broker.errors import (
    NonceBindingError,
    NonceError,
    NonceExpiredError,
    NonceReplayError,
    NonceUnknownError,
)
from broker.model import AuditEntry
from broker.storage import Store
from broker.storage.unit import UnitOfWork

#: Size of a nonce in bytes (the quote's qualifying data binds it, hashed, with the other inputs).
NONCE_BYTES = 32

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def nonce_digest(nonce: bytes) -> str:
    """The hex SHA-256 of ``nonce``: what the audit log keeps of an issued nonce.

    The digest matches a challenge's record to the nonce row and to whoever presents it, while
    a live nonce never sits in the audit log, which is kept for years, copied and read by more
    people than the nonce table (purged after the TTL).
    """
    return hashlib.sha256(nonce).hexdigest()


class NonceService:
    """Issues and consumes nonces through a :class:`~broker.storage.Store`."""

    def __init__(self, store: Store, *, ttl_seconds: float = 60.0, clock: Clock = utcnow) -> None:
        """
        Raises:
            ValueError: ``ttl_seconds`` is not positive.
        """
        if ttl_seconds <= 0:
            raise ValueError("the nonce TTL must be positive")
        self._store = store
        self._ttl = timedelta(seconds=ttl_seconds)
        self._clock = clock
        self._rows = store.nonces

    def issue(self, ak_name: str) -> tuple[bytes, datetime]:
        """A fresh nonce for ``ak_name`` and the time it expires.

        The caller checks that the AK is enrolled and not revoked; the nonce only records it.

        Raises:
            StorageError: the database failed.
        """
        nonce, expires_at, row = self._fresh(ak_name)
        self._rows.insert(row)
        return nonce, expires_at

    def issue_recorded(
        self, ak_name: str, *, audit: AuditLog, entry: Callable[[str], AuditEntry]
    ) -> tuple[bytes, datetime]:
        """:meth:`issue`, with the audit record ``entry(nonce_digest(nonce))`` appended in the
        same transaction as the nonce: a nonce is never handed out unrecorded, nor recorded
        without existing, and the two writes cost one commit.

        The record gets the nonce's digest (:func:`nonce_digest`), never the nonce itself.

        Raises:
            StorageError: the database failed (no nonce was issued and nothing recorded).
        """
        nonce, expires_at, row = self._fresh(ak_name)
        # The unit of work of a decision, not AuditLog.append_many: on PostgreSQL the record is
        # left to the sealer rather than sealed before the nonce is handed out.
        with self._store.fast_unit_of_work("issue nonce") as uow:
            self._rows.insert(row, uow.cursor)
            audit.append_in(uow, [entry(nonce_digest(nonce))])
        return nonce, expires_at

    def _fresh(self, ak_name: str) -> tuple[bytes, datetime, dict[str, Any]]:
        """A new nonce, its expiry and the row that stores it."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        now = self._clock()
        expires_at = now + self._ttl
        row = {
            "nonce": nonce,
            "ak_name": ak_name,
            "issued_at": now,
            "expires_at": expires_at,
            "used_at": None,
        }
        return nonce, expires_at, row

    def consume(self, nonce: bytes, ak_name: str) -> None:
        """Accepts ``nonce`` for ``ak_name`` once; every later use is refused.

        Raises:
            NonceUnknownError: never issued (or purged since).
            NonceReplayError: already used (by anyone, including a concurrent replica).
            NonceBindingError: issued to another AK (it is burned all the same).
            NonceExpiredError: its time to live has passed (it is burned all the same).
            StorageError: the database failed.
        """
        if len(nonce) != NONCE_BYTES:
            raise NonceUnknownError(f"a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
        now = self._clock()
        # One statement in autocommit: the row's update is atomic in the database, whichever
        # process or replica runs it.
        burned = self._rows.burn(nonce, now)
        # The statement has committed: a refused nonce stays burned.
        if burned is not None:
            problem: NonceError | None = None
            if burned.ak_name != ak_name:
                problem = NonceBindingError("the nonce was issued to another AK")
            elif now >= burned.expires_at:
                problem = NonceExpiredError("the nonce expired")
            if problem is not None:
                raise problem
            return
        if not self._rows.exists(nonce):
            raise NonceUnknownError("the nonce was never issued (or has been purged)")
        raise NonceReplayError("the nonce was already used")

    def consume_in(self, uow: UnitOfWork, nonce: bytes, ak_name: str) -> NonceError | None:
        """:meth:`consume` inside a decision's unit of work: the burn commits with the unit's
        records (a release or a denial), or not at all. Returns why the nonce is refused, or
        None when it is accepted; a refused nonce is burned all the same when the unit commits,
        so the caller records the refusal in the unit rather than raising through it.

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        if len(nonce) != NONCE_BYTES:
            return NonceUnknownError(f"a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
        now = self._clock()
        burned = self._rows.burn(nonce, now, uow)
        if burned is not None:
            if burned.ak_name != ak_name:
                return NonceBindingError("the nonce was issued to another AK")
            if now >= burned.expires_at:
                return NonceExpiredError("the nonce expired")
            return None
        if not self._rows.exists(nonce, uow):
            return NonceUnknownError("the nonce was never issued (or has been purged)")
        return NonceReplayError("the nonce was already used")

    def purge_expired(self, older_than: datetime) -> int:
        """Deletes nonces that expired before ``older_than``; returns how many.

        Keep purged nonces' expiry well in the past (e.g. ``now - ttl``): a purged nonce
        presented again is reported as unknown rather than as a replay (refused either way).

        Raises:
            StorageError: the database failed.
        """
        return self._rows.purge_expired(older_than)

    def count_outstanding(self) -> int:
        """How many nonces are issued, unused and unexpired now (a metrics gauge).

        Raises:
            StorageError: the database failed.
        """
        return self._rows.count_outstanding(self._clock())
