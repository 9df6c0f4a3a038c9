"""Batch sequencing of the audit chain on PostgreSQL (docs/storage.md "Batch sequencing").

Decisions number their records and commit them without the chain head; a sealer chains them
later. These tests hold the design to its promises against a real PostgreSQL: an append never
waits for the head, appenders on several engines make one chain that verifies, a tampered
record is still found, a number whose transaction died becomes a void record (and a late
commit of a number is never voided), and what is committed is in the per-party views at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from broker.audit import AuditLog
from broker.model import AkRecord, Approval, AuditEntry, AuditRecord, Party
from broker.storage import Store
from broker.storage.repositories.audit import GAP_GRACE_SECONDS, VOID_ACTION

pytestmark = pytest.mark.postgres


def _entry(actor: str, i: int, party: str = "adv") -> AuditEntry:
    return AuditEntry(
        actor=actor, action="key.release", subject=f"k{i}", decision="allow", parties=(party,)
    )


def _decide(store: Store, log: AuditLog, entries: list[AuditEntry]) -> list[AuditRecord]:
    """What an attestation does: its records in a hot-path unit of work."""
    with store.fast_unit_of_work("test decision") as uow:
        records = log.append_in(uow, entries)
    return records


def _driver_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    with Store.open(postgres_url) as s:
        yield s


def test_a_decision_commits_while_another_transaction_holds_the_chain_head(
    store: Store, postgres_url: str
) -> None:
    # Before batch sequencing, every decision locked the head row first, so one transaction
    # holding it stopped every replica. Now only sealers take it.
    log = AuditLog(store)
    with psycopg.connect(_driver_url(postgres_url)) as holder:
        holder.execute("SELECT * FROM audit_head WHERE id = 1 FOR UPDATE")
        done: list[list[AuditRecord]] = []
        t = threading.Thread(target=lambda: done.append(_decide(store, log, [_entry("a", 1)])))
        t.start()
        t.join(timeout=10)
        assert done, "the decision waited for the chain head"
        assert done[0][0].sequence == 1
        holder.rollback()
    assert log.verify_chain().valid
    assert [r.subject for r in log.list_records()] == ["k1"]


def test_appenders_on_several_engines_make_one_chain_that_verifies(postgres_url: str) -> None:
    engines = 4
    per_engine = 60
    Store.open(postgres_url).close()  # creates the schema
    stores = [Store.open(postgres_url, migrate=False, pool_size=2) for _ in range(engines)]
    try:

        def run(n: int) -> list[tuple[int, str]]:
            log = AuditLog(stores[n])
            got: list[tuple[int, str]] = []
            for i in range(per_engine):
                entries = [_entry(f"engine-{n}", i, party=f"p{n}")]
                if i % 5 == 0:  # a release: several records in one unit
                    entries.append(_entry(f"engine-{n}", 1000 + i, party=f"p{n}"))
                for r in _decide(stores[n], log, entries):
                    got.append((r.sequence, f"engine-{n}/{r.subject}"))
            return got

        with ThreadPoolExecutor(engines) as pool:
            pointers = [p for got in pool.map(run, range(engines)) for p in got]
        log = AuditLog(stores[0])
        report = log.verify_chain()
        assert report.valid, report
        records = {r.sequence: r for r in _all(log)}
        assert report.records_checked == len(records) == len(pointers)
        # Every sequence number a decision was given points at that decision's record.
        for sequence, what in pointers:
            r = records[sequence]
            assert f"{r.actor}/{r.subject}" == what
        assert not any(r.action == VOID_ACTION for r in records.values())
        # Each engine's party view holds exactly its records.
        for n in range(engines):
            view = log.list_records(party=f"p{n}", limit=1000)
            assert {r.actor for r in view} == {f"engine-{n}"}
            assert len(view) == sum(1 for _, w in pointers if w.startswith(f"engine-{n}/"))
    finally:
        for s in stores:
            s.close()


def _all(log: AuditLog) -> list[AuditRecord]:
    out: list[AuditRecord] = []
    after = 0
    while page := log.list_records(after_sequence=after, limit=1000):
        out.extend(page)
        after = page[-1].sequence
    return out


def test_a_tampered_sealed_record_is_found(store: Store) -> None:
    log = AuditLog(store)
    for i in range(6):
        _decide(store, log, [_entry("a", i)])
    assert log.verify_chain().valid
    with store.transaction("tamper", write=True) as conn:
        conn.execute(sa.text("UPDATE audit_records SET reason = 'nothing' WHERE sequence = 4"))
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 4
    assert "modified" in report.problem


def test_a_number_whose_transaction_died_becomes_a_void_record(
    store: Store, postgres_url: str
) -> None:
    log = AuditLog(store)
    _decide(store, log, [_entry("a", 1)])
    # A transaction that took a number and was killed before committing (its broker got
    # kill -9): the number is never committed.
    with psycopg.connect(_driver_url(postgres_url)) as dead:
        taken = dead.execute("SELECT nextval('audit_tickets')").fetchone()
        assert taken is not None and taken[0] == 2
        dead.rollback()
    _decide(store, log, [_entry("a", 3)])
    started = time.monotonic()
    report = log.verify_chain()
    assert report.valid and report.records_checked == 3
    # The gap was given its grace before it was voided.
    assert time.monotonic() - started >= GAP_GRACE_SECONDS * 0.9
    records = log.list_records()
    assert [r.action for r in records] == ["key.release", VOID_ACTION, "key.release"]
    assert records[1].decision == "void" and records[1].parties == ()
    # A void record is chained like any other: tampering with it is found.
    with store.transaction("tamper", write=True) as conn:
        conn.execute(sa.text("UPDATE audit_records SET action = 'key.release' WHERE sequence = 2"))
    assert log.verify_chain().first_bad_sequence == 2


def test_a_slow_commit_is_sealed_and_never_voided(store: Store, postgres_url: str) -> None:
    # A decision that took its number and has not committed yet, while later decisions have:
    # the sealer waits for it (past the grace, its void insert waits on the row) and seals
    # the decision's own record, so a decision is never left without its record.
    log = AuditLog(store)
    with psycopg.connect(_driver_url(postgres_url)) as slow:
        slow.execute(
            "INSERT INTO audit_pending (sequence, recorded_at, actor, action, subject, decision,"
            " reason, evidence_digest, parties) VALUES (nextval('audit_tickets'), now(), 'slow',"
            " 'key.release', 'k-slow', 'allow', '', '', '[\"adv\"]')"
        )
        later = _decide(store, log, [_entry("a", 2)])
        assert later[0].sequence == 2
        sealed: list[int] = []
        sealer = threading.Thread(target=lambda: sealed.append(log.seal()))
        sealer.start()
        time.sleep(GAP_GRACE_SECONDS * 2)  # past the grace: the sealer waits on the row now
        assert sealer.is_alive()
        slow.commit()
        sealer.join(timeout=10)
        assert not sealer.is_alive()
    records = log.list_records()
    assert [(r.sequence, r.actor) for r in records] == [(1, "slow"), (2, "a")]
    assert log.verify_chain().valid


def test_committed_records_are_in_the_party_views_at_once(store: Store) -> None:
    # No background sealer has run yet: the views seal what is committed before reading.
    log = AuditLog(store)
    _decide(store, log, [_entry("a", 1, party="adv"), _entry("a", 2, party="pub")])
    assert [r.subject for r in log.list_records(party="pub")] == ["k2"]
    assert log.head()[0] == 2


def test_a_background_sealer_seals_without_readers(store: Store) -> None:
    log = AuditLog(store)
    _decide(store, log, [_entry("a", 1)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with store.transaction("peek") as conn:
            pending = conn.execute(sa.text("SELECT count(*) FROM audit_pending")).scalar_one()
        if pending == 0:
            break
        time.sleep(0.05)
    assert pending == 0


def _policy(store: Store) -> None:
    now = datetime.now(UTC)
    store.add_party(Party(name="adv", kem=1, public_key=b"k"))
    store.add_ak(
        AkRecord(ak_name="ak1", public=b"p", ek_id=None, enrolled_by="operator", enrolled_at=now)
    )
    store.add_approval(
        Approval(
            approval_id="a1",
            party="adv",
            workload_name="w",
            manifest=(),
            expected_pcrs={"sha256": b"\x01" * 32},
            key_ids=(),
            output_recipients=(),
            golden_set=None,
            created_at=now,
        )
    )


@pytest.mark.parametrize(
    "revoke",
    [
        pytest.param(lambda s, u: s.revoke_approval("a1", uow=u), id="approval"),
        pytest.param(lambda s, u: s.revoke_ak("ak1", "leaked", uow=u), id="ak"),
    ],
)
def test_a_revocation_during_a_release_is_chained_after_it(
    store: Store, postgres_url: str, revoke: Callable[[Store, object], object]
) -> None:
    # No chain lock orders a release and a revocation on PostgreSQL any more: the release's
    # re-check locks its AK and approvals FOR SHARE, so a revocation from another replica
    # waits for the release, and its record is numbered after the release's. Without the row
    # locks the revocation would commit first, with the lower number, and the chain would show
    # the release citing an approval after the approval's revocation.
    _policy(store)
    log = AuditLog(store)
    done: list[list[AuditRecord]] = []
    with Store.open(postgres_url, migrate=False) as replica:

        def revoke_elsewhere() -> None:
            with replica.unit_of_work("revoke") as uow:
                revoke(replica, uow)
                done.append(
                    AuditLog(replica).append_in(uow, [AuditEntry("op", "revoke", "a1", "allow")])
                )

        with store.fast_unit_of_work("release") as uow:
            ak_ok, active = store.still_active(uow, ak_name="ak1", approval_ids=["a1"])
            assert ak_ok and active == {"a1"}
            other = threading.Thread(target=revoke_elsewhere)
            other.start()
            other.join(timeout=1.0)
            assert other.is_alive() and not done, "the revocation did not wait for the release"
            released = log.append_in(
                uow, [AuditEntry("sidecar", "key.release", "k1", "allow", "approval a1")]
            )
        other.join(timeout=10)
    assert done and done[0][0].sequence > released[0].sequence
    assert [r.action for r in log.list_records()] == ["key.release", "revoke"]
    assert log.verify_chain().valid
