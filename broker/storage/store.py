"""The broker's store: one :class:`~broker.storage.engine.Database` and the repositories that
run on it, one per area (:mod:`broker.storage.repositories`).

``Store`` is the facade the rest of the broker holds: the database's transactions and units of
work are its own (it is a ``Database``), each repository is an attribute (``store.attesters``,
``store.parties``, ``store.policy``, ``store.sessions``, ``store.keks``, ``store.nonces``,
``store.audit``, ``store.status``), and each repository method is also reachable on the store
under its own name (``store.get_ak`` is ``store.attesters.get_ak``), as callers have always used
it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

from sqlalchemy.engine import Engine

from broker.model import APPROVAL_INDEX_BANK
from broker.storage.engine import Database
from broker.storage.repositories.attesters import AttesterRepository
from broker.storage.repositories.audit import AuditRepository
from broker.storage.repositories.keks import KekRepository
from broker.storage.repositories.nonces import NonceRepository
from broker.storage.repositories.parties import PartyRepository
from broker.storage.repositories.policy import PolicyRepository
from broker.storage.repositories.sessions import SessionRepository
from broker.storage.repositories.status import StatusRepository

log = logging.getLogger(__name__)

#: How often a store's background sealer looks for pending audit records (PostgreSQL).
SEAL_INTERVAL_SECONDS: Final = 0.1

#: How often it looks even when this store committed none (records of a replica that stopped,
#: a gap to settle), and how long it leaves the sealing to another replica's sealer that it
#: found at work.
SEAL_IDLE_SECONDS: Final = 1.0


class Store(Database):
    """The broker's database with its repositories (see the module docstring).

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
        super().__init__(
            engine=engine,
            display_url=display_url,
            fast_engine=fast_engine,
            write_lock_timeout_seconds=write_lock_timeout_seconds,
        )
        self.attesters = AttesterRepository(self)
        self.parties = PartyRepository(self)
        self.policy = PolicyRepository(self)
        self.sessions = SessionRepository(self)
        self.keks = KekRepository(self)
        self.nonces = NonceRepository(self)
        self.audit = AuditRepository(self)
        self.status = StatusRepository(self)
        self._sealer: threading.Thread | None = None
        self._sealer_lock = threading.Lock()
        self._sealer_stop = threading.Event()
        self._dirty = threading.Event()
        # attesters
        self.add_ek = self.attesters.add_ek
        self.get_ek = self.attesters.get_ek
        self.list_eks = self.attesters.list_eks
        self.revoke_ek = self.attesters.revoke_ek
        self.add_ak = self.attesters.add_ak
        self.get_ak = self.attesters.get_ak
        self.list_aks = self.attesters.list_aks
        self.revoke_ak = self.attesters.revoke_ak
        self.readmit_ek = self.attesters.readmit_ek
        self.get_attester = self.attesters.get_attester
        self.add_activated_ak = self.attesters.add_activated_ak
        self.put_credential_challenge = self.attesters.put_credential_challenge
        self.take_credential_challenge = self.attesters.take_credential_challenge
        self.purge_credential_challenges = self.attesters.purge_credential_challenges
        # parties
        self.add_party = self.parties.add_party
        self.get_party = self.parties.get_party
        self.list_parties = self.parties.list_parties
        self.add_data_key = self.parties.add_data_key
        self.get_data_key = self.parties.get_data_key
        self.get_data_keys = self.parties.get_data_keys
        self.list_data_keys = self.parties.list_data_keys
        self.rewrap_data_key = self.parties.rewrap_data_key
        # policy
        self.put_golden_set = self.policy.put_golden_set
        self.get_golden_set = self.policy.get_golden_set
        self.list_golden_sets = self.policy.list_golden_sets
        self.delete_golden_set = self.policy.delete_golden_set
        self.add_approval = self.policy.add_approval
        self.get_approval = self.policy.get_approval
        self.list_approvals = self.policy.list_approvals
        self.revoke_approval = self.policy.revoke_approval
        self.find_active_approvals = self.policy.find_active_approvals
        self.still_active = self.policy.still_active
        # sessions
        self.add_session = self.sessions.add_session
        self.session_errors = self.sessions.session_errors
        self.insert_session = self.sessions.insert_session
        self.end_session = self.sessions.end_session
        self.get_session = self.sessions.get_session
        # keks
        self.kek_fingerprints = self.keks.kek_fingerprints
        self.record_kek_fingerprint = self.keks.record_kek_fingerprint
        self.replace_kek_fingerprint = self.keks.replace_kek_fingerprint
        self.set_party_kek = self.keks.set_party_kek
        self.get_party_kek = self.keks.get_party_kek
        self.list_party_keks = self.keks.list_party_keks
        # status
        self.schema_counts = self.status.schema_counts
        self.schema_problem = self.status.schema_problem

    def records_committed(self) -> None:
        """Marks that a unit of work committed pending audit records (PostgreSQL), starting
        this store's background sealer on first use."""
        self._dirty.set()
        if self._sealer is not None:
            return
        with self._sealer_lock:
            if self._sealer is None and not self._sealer_stop.is_set():
                self._sealer = threading.Thread(
                    target=self._seal_loop, name="audit-sealer", daemon=True
                )
                self._sealer.start()

    def _seal_loop(self) -> None:
        # Seals what this store (and, on the way, every other replica) committed, a batch per
        # tick; only one replica's sealer works at a time (the others skip the locked head).
        # A replica that finds another one sealing backs off for a while, so that many replicas
        # do not all poll the head row (each attempt is a transaction) while one does the work.
        last = time.monotonic()
        pause = SEAL_INTERVAL_SECONDS
        while not self._sealer_stop.wait(pause):
            pause = SEAL_INTERVAL_SECONDS
            if not self._dirty.is_set() and time.monotonic() - last < SEAL_IDLE_SECONDS:
                continue
            self._dirty.clear()
            last = time.monotonic()
            try:
                sealed = self.audit.try_seal()
                if sealed is None:
                    self._dirty.set()
                    pause = SEAL_IDLE_SECONDS
                elif sealed:
                    self._dirty.set()  # more may have come meanwhile
            except Exception:
                # A database that is down now will be up later; readers seal too.
                log.warning("sealing audit records failed; will retry", exc_info=True)
                self._dirty.set()

    def close(self) -> None:
        """Stops the background sealer (sealing what it can first) and closes every pooled
        connection. The Store cannot be used afterwards."""
        self._sealer_stop.set()
        sealer = self._sealer
        if sealer is not None:
            sealer.join(timeout=10)
            try:
                self.audit.seal(wait=False)
            except Exception:
                log.warning("sealing audit records at close failed", exc_info=True)
        super().close()


__all__ = ["APPROVAL_INDEX_BANK", "Store"]
