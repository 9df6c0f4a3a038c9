"""Nonces: single use, bound to one AK, expiring; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from broker.audit import AuditLog
from broker.errors import (
    NonceBindingError,
    NonceExpiredError,
    NonceReplayError,
    NonceUnknownError,
    StorageError,
)
from broker.model import AuditEntry
from broker.nonces import NONCE_BYTES, NonceService, nonce_digest
from broker.storage import Store


class Clock:
    """A clock the test moves by hand (the service under test reads it; nothing is faked)."""

    def __init__(self) -> None:
        self.now = datetime(2025, 6, 1, 12, 0, 0, 250000, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: Store, clock: Clock) -> NonceService:
    return NonceService(store, ttl_seconds=30, clock=clock)


def test_issue_gives_fresh_random_nonces_with_an_expiry(
    service: NonceService, clock: Clock
) -> None:
    n1, exp = service.issue("ak-a")
    n2, _ = service.issue("ak-a")
    assert len(n1) == NONCE_BYTES == 32
    assert n1 != n2
    assert exp == clock.now + timedelta(seconds=30)
    assert service.count_outstanding() == 2


def test_a_nonce_is_accepted_exactly_once(service: NonceService) -> None:
    nonce, _ = service.issue("ak-a")
    service.consume(nonce, "ak-a")
    with pytest.raises(NonceReplayError):
        service.consume(nonce, "ak-a")
    assert service.count_outstanding() == 0


def test_unknown_and_malformed_nonces(service: NonceService) -> None:
    with pytest.raises(NonceUnknownError):
        service.consume(b"\x00" * 32, "ak-a")
    with pytest.raises(NonceUnknownError):
        service.consume(b"short", "ak-a")


def test_another_aks_nonce_is_refused_and_burned(service: NonceService) -> None:
    nonce, _ = service.issue("ak-a")
    with pytest.raises(NonceBindingError):
        service.consume(nonce, "ak-b")
    # Burned: its owner cannot use it any more either.
    with pytest.raises(NonceReplayError):
        service.consume(nonce, "ak-a")


def test_an_expired_nonce_is_refused(service: NonceService, clock: Clock) -> None:
    nonce, _ = service.issue("ak-a")
    clock.advance(29.999)
    other, _ = service.issue("ak-a")
    service.consume(nonce, "ak-a")  # just in time
    clock.advance(30)
    with pytest.raises(NonceExpiredError):
        service.consume(other, "ak-a")
    with pytest.raises(NonceReplayError):
        service.consume(other, "ak-a")


def test_expiry_is_at_exactly_the_ttl(service: NonceService, clock: Clock) -> None:
    nonce, _ = service.issue("ak-a")
    clock.advance(30)
    with pytest.raises(NonceExpiredError):
        service.consume(nonce, "ak-a")


def test_purge_removes_only_long_expired_nonces(service: NonceService, clock: Clock) -> None:
    old, _ = service.issue("ak-a")
    clock.advance(100)
    fresh, _ = service.issue("ak-a")
    assert service.count_outstanding() == 1
    assert service.purge_expired(clock.now) == 1
    with pytest.raises(NonceUnknownError):
        service.consume(old, "ak-a")
    service.consume(fresh, "ak-a")


def test_nonces_are_kept_in_the_database(store: Store, service: NonceService, clock: Clock) -> None:
    # A second service on the same store (as another replica would be) sees the same state.
    nonce, _ = service.issue("ak-a")
    other = NonceService(store, ttl_seconds=30, clock=clock)
    other.consume(nonce, "ak-a")
    with pytest.raises(NonceReplayError):
        service.consume(nonce, "ak-a")
    with store.engine.connect() as conn:
        used = conn.execute(sa.text("SELECT count(*) FROM nonces WHERE used_at IS NOT NULL"))
        assert used.scalar() == 1


def test_ttl_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError, match="positive"):
        NonceService(store, ttl_seconds=0)


def _challenge_entry(digest: str) -> AuditEntry:
    return AuditEntry(
        actor="spiffe://cleanroom.local/sidecar/s1",
        action="challenge",
        subject="ak-a",
        decision="allow",
        reason="nonce issued",
        evidence_digest=digest,
    )


def test_issue_recorded_stores_the_nonce_and_its_record_with_the_digest_only(
    store: Store, service: NonceService, clock: Clock
) -> None:
    audit = AuditLog(store, clock=clock)
    nonce, expires = service.issue_recorded("ak-a", audit=audit, entry=_challenge_entry)
    assert expires == clock.now + timedelta(seconds=30)
    (record,) = audit.list_records()
    assert record.evidence_digest == nonce_digest(nonce) == hashlib.sha256(nonce).hexdigest()
    assert nonce.hex() not in record.reason + record.subject + record.evidence_digest
    service.consume(nonce, "ak-a")  # the nonce is a real, usable one
    assert audit.verify_chain().valid


def test_issue_recorded_stores_neither_when_the_record_fails(
    store: Store, service: NonceService, clock: Clock
) -> None:
    audit = AuditLog(store, clock=clock)

    def unencodable(digest: str) -> AuditEntry:
        # A lone surrogate cannot be encoded as UTF-8: the append fails after the nonce's
        # insert ran in the same transaction, which must then be rolled back with it.
        return replace(_challenge_entry(digest), reason="\ud800")

    with pytest.raises(StorageError, match="cannot be encoded"):
        service.issue_recorded("ak-a", audit=audit, entry=unencodable)
    assert service.count_outstanding() == 0
    assert audit.list_records() == []
