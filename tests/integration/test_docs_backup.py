"""The backup and restore commands of docs/operations.md ("Backups"), on real databases.

docs/operations.md guards its PostgreSQL and key-file blocks with these tests (its SQLite
``.backup`` block runs as shown in tests/integration/test_docs.py). Each test fills a broker the
way people do (a party, a registered data key, audit records), backs it up with the documented
commands, loses or changes the live state, restores, and checks what matters after a restore:
the broker opens the database, the audit chain verifies and ends at the head taken with the
backup, and the data key unwraps to the same bytes with the restored KEK.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core import Broker
from broker.custody import plain_data_key
from broker.keyseal import seal_for_registration
from broker.model import Party
from pki.identity import SpiffeId
from sealing.keys import generate_recipient_key

DOMAIN = "cleanroom.local"
OPERATOR = SpiffeId(DOMAIN, "operator")


def _run(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}"


def _add_party(broker: Broker, name: str) -> None:
    public = generate_recipient_key().public_key()
    broker.add_party(OPERATOR, Party(name=name, kem=public.kem, public_key=public.raw))


def _register(broker: Broker, party: str, key_id: str) -> bytes:
    """Registers a fresh data key as ``party`` does (sealed to the registration key)."""
    data_key = secrets.token_bytes(32)
    sealed = seal_for_registration(
        broker.registration_key.public_key(), data_key, key_id=key_id, owner=party
    )
    broker.register_data_key(
        SpiffeId(DOMAIN, "party", party), key_id=key_id, sealed_data_key=sealed, description=""
    )
    return data_key


def _unwrapped(broker: Broker, key_id: str) -> bytes:
    record = broker.store.get_data_key(key_id)
    with plain_data_key(broker.keks.get(record.kek_ref), record) as key:
        return bytes(key)


def _assert_restored(broker: Broker, head: tuple[int, str], key_id: str, key: bytes) -> None:
    report = broker.audit.verify_chain()
    assert report.valid, report.problem
    assert broker.audit.head() == head
    assert _unwrapped(broker, key_id) == key


@pytest.mark.postgres
def test_pg_dump_and_restore_keep_the_broker_working(postgres_url: str, tmp_path: Path) -> None:
    config = BrokerConfig(database_url=postgres_url, state_dir=str(tmp_path / "broker-state"))
    # pg_dump and pg_restore take libpq's URL: the same without SQLAlchemy's "+psycopg".
    libpq_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with open_broker(config) as broker:
        _add_party(broker, "advertiser")
        key = _register(broker, "advertiser", "advertiser-data")
        head = broker.audit.head()

    _run("pg_dump", "--format=custom", "--file=broker.dump", libpq_url, cwd=tmp_path)

    # Life goes on after the backup: another key, more audit records.
    with open_broker(config) as broker:
        _register(broker, "advertiser", "advertiser-later")
        assert broker.audit.head()[0] > head[0]

    _run(
        "pg_restore",
        "--clean",
        "--if-exists",
        "--no-owner",
        f"--dbname={libpq_url}",
        "broker.dump",
        cwd=tmp_path,
    )
    with open_broker(config, migrate=False) as broker:
        _assert_restored(broker, head, "advertiser-data", key)
        assert [k.key_id for k in broker.store.list_data_keys()] == ["advertiser-data"]


def test_a_restored_sqlite_backup_and_key_files_release_the_same_keys(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    config = BrokerConfig(
        database_url=f"sqlite:///{live / 'broker.db'}", state_dir=str(live / "broker-state")
    )
    with open_broker(config) as broker:
        _add_party(broker, "advertiser")
        key = _register(broker, "advertiser", "advertiser-data")
        head = broker.audit.head()
        broker_public = broker.registration_key.public_key()

        # docs/operations.md: the online SQLite backup while the broker runs, then the key files.
        backup = tmp_path / "backup"
        _run("mkdir", "-m", "0700", str(backup))
        _run("sqlite3", str(live / "broker.db"), f".backup {backup / 'broker.db'}")
        _run("install", "-d", "-m", "0700", str(backup / "kek"))
        _run(
            "install",
            "-m",
            "0600",
            str(live / "broker-state" / "kek.key"),
            str(live / "broker-state" / "registration.key"),
            str(backup / "kek"),
        )

    # The machine is lost.
    shutil.rmtree(live)

    restored = tmp_path / "restored"
    (restored / "broker-state").mkdir(parents=True, mode=0o700)
    shutil.copy2(backup / "broker.db", restored / "broker.db")
    for name in ("kek.key", "registration.key"):
        shutil.copy2(backup / "kek" / name, restored / "broker-state" / name)
    config = BrokerConfig(
        database_url=f"sqlite:///{restored / 'broker.db'}",
        state_dir=str(restored / "broker-state"),
    )
    with open_broker(config, migrate=False) as broker:
        _assert_restored(broker, head, "advertiser-data", key)
        # The registration key came back too: a party that sealed to the published key before
        # the loss can still register.
        assert broker.registration_key.public_key().raw == broker_public.raw
        assert _register(broker, "advertiser", "advertiser-after") != key
