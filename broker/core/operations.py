"""Running the broker: what its transport needs besides the use cases.

The gRPC server records the refusals it makes itself (unauthenticated callers, the authorization
table) in the audit log, counts outstanding nonces for a gauge, purges expired nonces and
credential challenges, reports its status and answers readiness probes. It does all of that
through :class:`Operations`, so that nothing above the core reaches the store, the nonces or the
audit log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from broker.audit import AuditLog
from broker.config import BrokerConfig
from broker.core.trail import Clock, utcnow
from broker.model import AuditEntry, AuditRecord
from broker.nonces import NonceService
from broker.storage import Store


@dataclass(frozen=True)
class StoreStatus:
    """What ``GetStatus`` reports of the database: where it is, its schema and its contents."""

    database: str
    dialect: str
    schema_revision: str
    schema_head: str
    #: Table name (as ``StatusCounts`` names it) -> rows.
    counts: Mapping[str, int]
    #: KEK ref -> the fingerprint the database records.
    kek_fingerprints: Mapping[str, str]


class Operations:
    """The transport's access to the broker's state: refusal records, nonce upkeep, status.

    Its collaborators: the store, the nonces, the audit log, the clock and the nonce TTL of the
    configuration.
    """

    def __init__(
        self,
        *,
        store: Store,
        nonces: NonceService,
        audit: AuditLog,
        config: BrokerConfig,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._nonces = nonces
        self._audit = audit
        self._clock = clock
        self._nonce_ttl = timedelta(seconds=config.nonce_ttl_seconds)

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Records a refusal that the transport made (the call guard's audit sink).

        Raises:
            StorageError, AuditChainError: the record could not be written.
        """
        return self._audit.append(entry)

    def outstanding_nonces(self) -> int:
        """How many nonces are issued, unused and unexpired now.

        Raises:
            StorageError: the database failed.
        """
        return self._nonces.count_outstanding()

    def purge_expired(self) -> int:
        """Deletes nonces expired for longer than their TTL and expired credential challenges;
        returns how many. A purged nonce presented again is still refused (as unknown).

        Raises:
            StorageError: the database failed.
        """
        now = self._clock()
        purged = self._nonces.purge_expired(now - self._nonce_ttl)
        return purged + self._store.purge_credential_challenges(now)

    def store_status(self) -> StoreStatus:
        """The database's place, schema revision, row counts and KEK fingerprints, read in one
        short read transaction (the fingerprints in a second).

        Raises:
            StorageError: the database failed.
        """
        # Alembic is imported on first use: a broker that is never asked its status or
        # readiness does not pay for it at start.
        from broker.storage import migrate

        store = self._store
        found = store.schema_counts()
        return StoreStatus(
            database=store.display_url,
            dialect=store.dialect,
            schema_revision=found.revision,
            schema_head=migrate.head_revision(),
            counts=found.counts,
            kek_fingerprints=store.kek_fingerprints(),
        )

    def database_problem(self) -> str | None:
        """None when the database answers at this code's schema revision, else why not (one
        line, for a readiness probe)."""
        return self._store.schema_problem()


__all__ = ["Operations", "StoreStatus"]
