"""Schema migrations: they build the schema the code expects, once, on both backends."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from tpm2_pytss import TPM2B_PUBLIC

from broker import tpmkeys
from broker.errors import StorageError
from broker.model import EkRecord
from broker.storage import Store
from broker.storage import __main__ as storage_cli
from broker.storage.engine import install_sqlite_hooks
from broker.storage.migrate import head_revision, upgrade
from broker.storage.schema import aks, eks, metadata
from tests.harness.reencode import reencode

VECTORS = Path(__file__).resolve().parents[2] / "vectors"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    url = request.getfixturevalue("postgres_url")
    assert isinstance(url, str)
    return url


def _tables(store: Store) -> set[str]:
    return set(sa.inspect(store.engine).get_table_names())


def test_migrations_build_every_table_on_an_empty_database(db_url: str) -> None:
    with Store.open(db_url) as store:
        assert _tables(store) == {t.name for t in metadata.sorted_tables} | {"alembic_version"}
        with store.engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            head = conn.execute(sa.text("SELECT sequence, record_hash FROM audit_head")).all()
        assert [v[0] for v in version] == [head_revision()]
        assert [tuple(h) for h in head] == [(0, "0" * 64)]


def test_migrated_schema_matches_the_code_metadata(db_url: str) -> None:
    with Store.open(db_url) as store, store.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata
        )
    assert diff == []


def test_opening_twice_is_idempotent_and_keeps_data(db_url: str) -> None:
    with Store.open(db_url) as store:
        store.add_ek(EkRecord("ek1", b"pub", None, datetime.now(UTC)))
    with Store.open(db_url, migrate=True) as store:
        assert [e.ek_id for e in store.list_eks()] == ["ek1"]
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert conn.execute(sa.text("SELECT count(*) FROM audit_head")).scalar() == 1
    with Store.open(db_url, migrate=False) as store:
        assert [e.ek_id for e in store.list_eks()] == ["ek1"]


def test_without_migrate_an_empty_database_is_refused(db_url: str) -> None:
    with pytest.raises(StorageError, match="revision none"):
        Store.open(db_url, migrate=False)


def test_a_database_newer_than_the_code_is_refused(db_url: str) -> None:
    with Store.open(db_url) as store, store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(StorageError, match="9999"):
        Store.open(db_url, migrate=False)
    with pytest.raises(StorageError, match="newer"):
        Store.open(db_url, migrate=True)


def test_the_upgrade_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert storage_cli.main(["current", url]) == 1
    assert "revision none" in capsys.readouterr().err
    assert storage_cli.main(["upgrade", url]) == 0
    assert storage_cli.main(["current", url]) == 0
    assert head_revision() in capsys.readouterr().out


# --- first open of a new SQLite file while another process writes to it --------------------
#
# Switching a file to WAL needs an exclusive lock, and SQLite refuses the pragma at once (no
# busy handler) while another connection holds a write transaction on a file still in the
# rollback journal: replicas starting together on a fresh file hit exactly this.


def _hold_write_lock(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS other_writer (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other_writer VALUES (1)")
    return holder


def test_first_open_waits_for_another_writer_to_finish(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    holder = _hold_write_lock(path)
    release = threading.Timer(0.3, holder.execute, args=("COMMIT",))
    release.start()
    try:
        with Store.open(f"sqlite:///{path}", busy_timeout_seconds=10) as store:
            store.list_eks()
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        holder.close()


def test_first_open_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    holder = _hold_write_lock(path)
    try:
        with pytest.raises(StorageError, match=r"cannot open database .*database is locked"):
            Store.open(f"sqlite:///{path}", busy_timeout_seconds=0.2)
    finally:
        holder.close()


def test_approvals_stored_before_0003_keep_no_launch_and_are_found_by_their_files(
    db_url: str,
) -> None:
    """Migration 0003 on a database with an approval made before launches were measured."""
    from broker.storage import migrate

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0002")
        with engine.begin() as conn:
            now = datetime.now(UTC)
            conn.execute(
                sa.text("INSERT INTO parties (name, kem, public_key) VALUES ('adv', 1, :k)"),
                {"k": b"k"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO approvals (approval_id, party, workload_name, manifest, "
                    "expected_pcrs, expected_pcr_sha256, key_ids, output_recipients, "
                    "golden_set, created_at, revoked) VALUES ('old', 'adv', 'w', :m, :e, :p, "
                    "'[]', '[]', NULL, :t, :r)"
                ),
                {
                    "m": '[{"path": "run.py", "size": 1, "digests": {"sha256": "'
                    + "11" * 32
                    + '"}}]',
                    "e": '{"sha256": "' + "22" * 32 + '"}',
                    "p": b"\x22" * 32,
                    "t": now,
                    "r": False,
                },
            )
    finally:
        engine.dispose()
    with Store.open(db_url) as store:
        old = store.get_approval("old")
        assert old.launch is None
        # Its PCR 23 covered its files only, so that value finds it by its files now.
        assert [
            a.approval_id
            for a in store.find_active_approvals(b"\xee" * 32, files_pcr_sha256=b"\x22" * 32)
        ] == ["old"]


# --- 0004: one EK, one identity ---------------------------------------------------------------
#
# Before revision 0004 an EK was named by the SHA-256 of its marshalled TPMT_PUBLIC, so one key
# sent with another encoding was a second EK that a revocation of the first did not reach.


def _database_at(url: str, revision: str) -> sa.Engine:
    """An engine on ``url`` with the schema at ``revision`` (and the store's SQLite hooks)."""
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        install_sqlite_hooks(engine, busy_timeout_ms=5000, synchronous="NORMAL")
    with engine.connect() as conn:
        upgrade(conn, revision)
    return engine


def _tpmt_id(public: bytes) -> str:
    return hashlib.sha256(bytes(TPM2B_PUBLIC.unmarshal(public)[0].publicArea.marshal())).hexdigest()


def test_0004_merges_two_encodings_of_one_ek_keeping_the_revocation(db_url: str) -> None:
    real = bytes.fromhex(json.loads((VECTORS / "key-rsa-createek.json").read_text())["public"])
    forged = reencode(real, "exponent-65537")
    other = bytes.fromhex(json.loads((VECTORS / "key-ecc-createek.json").read_text())["public"])
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    engine = _database_at(db_url, "0002")
    try:
        with engine.begin() as conn:
            rows = [
                # The real encoding, enrolled first and revoked by the operator...
                (_tpmt_id(real), real, b"cert", t0, True, "stolen"),
                # ...and the re-encoding that enrolled afterwards, unrevoked.
                (_tpmt_id(forged), forged, None, t0 + timedelta(hours=1), False, ""),
                (_tpmt_id(other), other, None, t0, False, ""),
                ("not-a-public", b"pub", None, t0, False, ""),
            ]
            for ek_id, public, cert, when, revoked, reason in rows:
                conn.execute(
                    sa.insert(eks).values(
                        ek_id=ek_id,
                        public=public,
                        certificate=cert,
                        enrolled_at=when,
                        revoked=revoked,
                        revoked_reason=reason,
                    )
                )
            for name, ek_id, revoked, reason in (
                ("000bold", _tpmt_id(real), True, "EK revoked: stolen"),
                ("000bnew", _tpmt_id(forged), False, ""),
                ("000bother", _tpmt_id(other), False, ""),
            ):
                conn.execute(
                    sa.insert(aks).values(
                        ak_name=name,
                        public=b"akpub",
                        ek_id=ek_id,
                        enrolled_by="credential-activation",
                        enrolled_at=t0,
                        revoked=revoked,
                        revoked_reason=reason,
                    )
                )
            conn.execute(
                sa.text(
                    "INSERT INTO credential_challenges (enrollment_id, ak_name, ak_public, ek_id,"
                    " secret_digest, expires_at) VALUES ('e1', '000bx', :p, 'x', :d, :t)"
                ),
                {"p": b"ak", "d": b"d" * 32, "t": t0},
            )
    finally:
        engine.dispose()

    with Store.open(db_url) as store:
        listed = {e.ek_id: e for e in store.list_eks()}
        canonical = tpmkeys.load_public(real).spki_sha256
        assert canonical == tpmkeys.load_public(forged).spki_sha256
        # One row per key: the two encodings are one EK, revoked, with the first enrollment.
        assert sorted(listed) == sorted(
            [canonical, tpmkeys.load_public(other).spki_sha256, "not-a-public"]
        )
        merged = listed[canonical]
        assert merged.revoked and merged.revoked_reason == "stolen"
        assert merged.public == real and merged.certificate == b"cert"
        assert merged.enrolled_at == t0
        # Both AKs are under it now, and both are out: the forged encoding's AK is revoked too.
        for name in ("000bold", "000bnew"):
            ak, ek = store.get_attester(name)
            assert ak.ek_id == canonical and ak.revoked and ek is not None and ek.revoked
        assert store.get_ak("000bnew").revoked_reason == "EK revoked: stolen"
        assert not store.get_ak("000bother").revoked
        assert store.get_ak("000bother").ek_id == tpmkeys.load_public(other).spki_sha256
        # Outstanding challenges (which lack the EK and the requester) are gone.
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM credential_challenges")).scalar() == 0


# --- 0007: batch sequencing of the audit chain ------------------------------------------------


def test_0007_continues_the_chain_that_0004_left(db_url: str) -> None:
    """A chain written before 0007 goes on from its head after it, on both backends (on
    PostgreSQL the new sequence of record numbers starts after the head)."""
    from broker import auditchain
    from broker.audit import AuditLog
    from broker.model import AuditEntry
    from broker.storage import migrate
    from broker.storage import rows as codec

    entries = [
        AuditEntry(actor="op", action="party.add", subject=f"p{i}", decision="allow")
        for i in range(3)
    ]
    old = auditchain.seal_all(entries, (0, auditchain.GENESIS_HASH), [datetime.now(UTC)] * 3)
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0004")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO audit_records (sequence, recorded_at, actor, action, subject, "
                    "decision, reason, evidence_digest, parties, previous_hash, record_hash) "
                    "VALUES (:sequence, :recorded_at, :actor, :action, :subject, :decision, "
                    ":reason, :evidence_digest, :parties, :previous_hash, :record_hash)"
                ),
                [codec.audit_record_values(r) for r in old],
            )
            conn.execute(
                sa.text("UPDATE audit_head SET sequence = 3, record_hash = :h"),
                {"h": old[-1].record_hash},
            )
    finally:
        engine.dispose()
    with Store.open(db_url) as store:
        log = AuditLog(store)
        with store.fast_unit_of_work("after 0007") as uow:
            new = log.append_in(uow, [AuditEntry("op", "party.add", "p9", "allow")])
        assert new[0].sequence == 4
        report = log.verify_chain()
        assert report.valid and report.records_checked == 4
        assert log.head() == (4, log.list_records(after_sequence=3)[0].record_hash)
