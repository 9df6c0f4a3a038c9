"""The hash-chained audit log, and its verification against direct tampering with the table."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from broker.audit import (
    MAX_LIST_LIMIT,
    AuditLog,
    ChainReport,
    canonical_bytes,
    compute_record_hash,
)
from broker.errors import AuditChainError, StorageError
from broker.model import AuditEntry, AuditRecord
from broker.storage import Store
from broker.storage.fast import FastCursor
from broker.storage.schema import nonces

GENESIS = "0" * 64


class Clock:
    """Ticks one millisecond per reading, so that records have distinct, known times."""

    def __init__(self) -> None:
        self.now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(microseconds=1001)
        return self.now


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


@pytest.fixture
def log(store: Store) -> AuditLog:
    return AuditLog(store, clock=Clock())


def entry(i: int, *parties: str) -> AuditEntry:
    return AuditEntry(
        actor="spiffe://cleanroom.local/operator",
        action="key.release",
        subject=f"key-{i}",
        decision="allow" if i % 2 else "deny",
        reason=f'reason {i}: ünïcode and "quotes"\n',
        evidence_digest=hashlib.sha256(str(i).encode()).hexdigest(),
        parties=parties,
    )


def fill(log: AuditLog, n: int) -> list[AuditRecord]:
    return [log.append(entry(i, "adv") if i % 3 == 0 else entry(i)) for i in range(1, n + 1)]


def sql(store: Store, statement: str, **params: object) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text(statement), params)


# --- the record format ---------------------------------------------------------------------


def test_record_hash_regression_vector() -> None:
    """Guards the documented encoding (docs/storage.md): changing it breaks old chains."""
    record = AuditRecord(
        sequence=7,
        time=datetime(2025, 1, 2, 3, 4, 5, 60, tzinfo=UTC),
        actor="broker",
        action="attest",
        subject="000b11",
        decision="deny",
        reason='nonce "x" é',
        evidence_digest="ab",
        parties=("pub", "adv"),
        previous_hash="f" * 64,
        record_hash="",
    )
    expected_text = (
        '{"action":"attest","actor":"broker","decision":"deny","evidence_digest":"ab",'
        '"parties":["pub","adv"],"previous_hash":"' + "f" * 64 + '","reason":"nonce \\"x\\" é",'
        '"sequence":7,"subject":"000b11","time":"2025-01-02T03:04:05.000060Z","v":1}'
    )
    assert canonical_bytes(record) == expected_text.encode("utf-8")
    assert compute_record_hash(record) == hashlib.sha256(expected_text.encode()).hexdigest()


def test_first_record_links_to_genesis_and_the_rest_chain(log: AuditLog) -> None:
    records = fill(log, 5)
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
    assert records[0].previous_hash == GENESIS
    for prev, cur in itertools.pairwise(records):
        assert cur.previous_hash == prev.record_hash
        assert cur.time > prev.time
    for r in records:
        assert r.record_hash == compute_record_hash(r)
    assert log.head() == (5, records[-1].record_hash)


def test_append_many_writes_consecutive_records(log: AuditLog) -> None:
    first = log.append(entry(1))
    batch = log.append_many([entry(2, "adv", "pub"), entry(3), entry(4, "pub", "pub")])
    assert [r.sequence for r in batch] == [2, 3, 4]
    assert batch[0].previous_hash == first.record_hash
    assert log.append_many([]) == []
    assert log.list_records() == [first, *batch]
    assert log.verify_chain() == ChainReport(valid=True, records_checked=4)


def test_append_many_runs_within_in_the_same_transaction(store: Store, log: AuditLog) -> None:
    insert = store.fast.prepare(sa.insert(nonces))
    when = datetime(2025, 6, 1, tzinfo=UTC)

    def row(n: int) -> dict[str, object]:
        return {
            "nonce": bytes([n]) * 32,
            "ak_name": "ak-a",
            "issued_at": when,
            "expires_at": when,
            "used_at": None,
        }

    def count() -> int:
        with store.transaction("count nonces") as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(nonces)).scalar_one())

    (record,) = log.append_many([entry(1)], within=lambda cur: cur.execute(insert, row(1)))
    assert count() == 1 and log.head() == (1, record.record_hash)

    def fail(cur: FastCursor) -> None:
        cur.execute(insert, row(2))
        raise StorageError("the caller's statement failed")

    # A failure inside the transaction keeps neither the caller's row nor the records.
    with pytest.raises(StorageError, match="the caller's statement failed"):
        log.append_many([entry(2)], within=fail)
    assert count() == 1 and log.head() == (1, record.record_hash)
    # And a record that cannot be encoded rolls back what ``within`` wrote.
    with pytest.raises(StorageError, match="cannot be encoded"):
        log.append_many(
            [replace(entry(3), reason="\ud800")], within=lambda cur: cur.execute(insert, row(3))
        )
    assert count() == 1 and log.verify_chain().valid


def test_records_read_back_exactly_as_appended(log: AuditLog) -> None:
    appended = fill(log, 7)
    assert log.list_records() == appended
    assert log.list_records(after_sequence=5) == appended[5:]
    assert log.list_records(after_sequence=2, limit=2) == appended[2:4]
    assert log.list_records(after_sequence=7) == []


def test_party_filter(log: AuditLog) -> None:
    log.append(entry(1, "adv"))
    log.append(entry(2, "pub"))
    log.append(entry(3, "pub", "adv"))
    log.append(entry(4))
    assert [r.sequence for r in log.list_records(party="adv")] == [1, 3]
    assert [r.sequence for r in log.list_records(party="pub")] == [2, 3]
    assert [r.sequence for r in log.list_records(party="pub", after_sequence=2)] == [3]
    assert [r.sequence for r in log.list_records(party="adv", limit=1)] == [1]
    assert log.list_records(party="nobody") == []
    assert log.list_records(party="pub")[1].parties == ("pub", "adv")


def test_list_limit_bounds(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="limit"):
        log.list_records(limit=0)
    log.append_many([entry(i) for i in range(MAX_LIST_LIMIT + 5)])
    assert len(log.list_records(limit=10**6)) == MAX_LIST_LIMIT


# --- verification --------------------------------------------------------------------------


def test_an_empty_and_an_intact_chain_verify(log: AuditLog) -> None:
    assert log.verify_chain() == ChainReport(valid=True, records_checked=0)
    fill(log, 12)
    assert log.verify_chain_or_raise() == ChainReport(valid=True, records_checked=12)


def test_a_deleted_record_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 6)
    sql(store, "DELETE FROM audit_records WHERE sequence = 3")
    report = log.verify_chain()
    assert not report.valid
    assert report.first_bad_sequence == 3 and "missing" in report.problem
    assert report.records_checked == 2
    with pytest.raises(AuditChainError, match="record 3"):
        log.verify_chain_or_raise()


def test_a_deleted_first_record_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 3)
    sql(store, "DELETE FROM audit_records WHERE sequence = 1")
    assert log.verify_chain().first_bad_sequence == 1


def test_a_truncated_tail_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 5)
    sql(store, "DELETE FROM audit_records WHERE sequence >= 4")
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 4
    assert "truncated" in report.problem


def test_a_deleted_and_renumbered_record_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 5)
    # Remove record 3 and close the gap, head included: only the hashes can tell.
    sql(store, "DELETE FROM audit_records WHERE sequence = 3")
    for seq in (4, 5):
        sql(
            store,
            "UPDATE audit_records SET sequence = :new WHERE sequence = :old",
            new=seq - 1,
            old=seq,
        )
    sql(store, "UPDATE audit_head SET sequence = 4")
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 3


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("reason", "nothing to see here"),
        ("decision", "allow"),
        ("actor", "spiffe://cleanroom.local/party/adv"),
        ("evidence_digest", "00"),
        ("parties", '["adv"]'),
    ],
)
def test_a_modified_record_is_found(store: Store, log: AuditLog, column: str, value: str) -> None:
    fill(log, 5)
    sql(store, f"UPDATE audit_records SET {column} = :v WHERE sequence = 4", v=value)  # noqa: S608
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 4, report
    assert "modified" in report.problem or "party index" in report.problem


def test_a_modified_time_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 3)
    with store.engine.begin() as conn:
        t = conn.execute(sa.text("SELECT recorded_at FROM audit_records WHERE sequence = 2"))
        old = t.scalar_one()
        if isinstance(old, str):  # SQLite keeps text
            new: object = old[:-1] + ("1" if old[-1] != "1" else "2")
        else:
            new = old + timedelta(microseconds=1)
        conn.execute(
            sa.text("UPDATE audit_records SET recorded_at = :t WHERE sequence = 2"), {"t": new}
        )
    report = log.verify_chain()
    assert report.first_bad_sequence == 2 and "modified" in report.problem


def test_a_modified_record_with_a_recomputed_hash_breaks_the_next_link(
    store: Store, log: AuditLog
) -> None:
    records = fill(log, 5)
    forged = replace(records[2], reason="rewritten")
    forged = replace(forged, record_hash=compute_record_hash(forged))
    sql(
        store,
        "UPDATE audit_records SET reason = :r, record_hash = :h WHERE sequence = 3",
        r=forged.reason,
        h=forged.record_hash,
    )
    report = log.verify_chain()
    assert report.first_bad_sequence == 4 and "previous_hash" in report.problem


def test_an_inserted_record_is_found(store: Store, log: AuditLog) -> None:
    # No parties: the party index's foreign key would refuse the renumbering below.
    records = log.append_many([entry(i) for i in range(1, 5)])
    # Shift records 3.. up by one and slip a well-formed record in at 3.
    for seq in (4, 3):
        sql(
            store,
            "UPDATE audit_records SET sequence = :new WHERE sequence = :old",
            new=seq + 1,
            old=seq,
        )
    forged = AuditRecord(
        sequence=3,
        time=records[1].time + timedelta(microseconds=1),
        actor="broker",
        action="key.release",
        subject="key-x",
        decision="allow",
        reason="",
        evidence_digest="",
        parties=(),
        previous_hash=records[1].record_hash,
        record_hash="",
    )
    forged = replace(forged, record_hash=compute_record_hash(forged))
    _insert(store, forged)
    sql(store, "UPDATE audit_head SET sequence = 5")
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 4


def test_a_record_appended_behind_the_logs_back_is_found(store: Store, log: AuditLog) -> None:
    records = fill(log, 3)
    forged = AuditRecord(
        sequence=4,
        time=records[-1].time + timedelta(seconds=1),
        actor="broker",
        action="key.release",
        subject="key-x",
        decision="allow",
        reason="",
        evidence_digest="",
        parties=(),
        previous_hash=records[-1].record_hash,
        record_hash="",
    )
    forged = replace(forged, record_hash=compute_record_hash(forged))
    _insert(store, forged)
    report = log.verify_chain()
    assert not report.valid and report.first_bad_sequence == 4
    assert "outside the log" in report.problem


def test_a_tampered_party_index_is_found(store: Store, log: AuditLog) -> None:
    fill(log, 4)
    sql(store, "INSERT INTO audit_parties (party, sequence) VALUES ('pub', 2)")
    report = log.verify_chain()
    assert report.first_bad_sequence == 2 and "party index" in report.problem


def test_a_missing_head_is_reported(store: Store, log: AuditLog) -> None:
    fill(log, 2)
    sql(store, "DELETE FROM audit_head")
    assert not log.verify_chain().valid
    with pytest.raises(StorageError, match="head"):
        log.append(entry(9))


def test_records_are_json_in_the_table_not_pickles(store: Store, log: AuditLog) -> None:
    log.append(entry(1, "adv", "pub"))
    with store.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT parties FROM audit_records")).scalar_one()
    assert json.loads(raw) == ["adv", "pub"]


def _insert(store: Store, r: AuditRecord) -> None:
    from broker.storage.schema import audit_records

    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(audit_records).values(
                sequence=r.sequence,
                recorded_at=r.time,
                actor=r.actor,
                action=r.action,
                subject=r.subject,
                decision=r.decision,
                reason=r.reason,
                evidence_digest=r.evidence_digest,
                parties=json.dumps(list(r.parties)),
                previous_hash=r.previous_hash,
                record_hash=r.record_hash,
            )
        )
