"""``cleanroom broker migrate --config FILE``: upgrades a database at an older revision, says so,
is idempotent, ``--check`` changes nothing and fails when behind, and a missing database is
refused and not created (``broker init`` creates it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import sqlalchemy as sa

from broker.storage.engine import install_sqlite_hooks
from broker.storage.migrate import current_revision, head_revision, upgrade
from tests.support.broker import CLEANROOM, clean_env

CONFIG = """\
[broker]
database_url = "sqlite:///broker.db"
state_dir = "broker-state"
[broker.tls]
listen = "127.0.0.1:0"
cert_file = "broker.crt"
key_file = "broker.key"
ca_file = "ca.crt"
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLEANROOM), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


def _revision(db: Path) -> str | None:
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_migrate_upgrades_an_old_database_and_check_reports_it(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "broker.toml"
    config.parent.mkdir()
    config.write_text(CONFIG)
    db = config.parent / "broker.db"  # relative to the config file, not the working directory
    engine = sa.create_engine(f"sqlite:///{db}")
    install_sqlite_hooks(engine, busy_timeout_ms=5000, synchronous="NORMAL")
    with engine.connect() as conn:
        upgrade(conn, "0003")
    engine.dispose()

    check = _cli("broker", "migrate", "--config", str(config), "--check")
    assert check.returncode == 1
    assert check.stdout.strip() == (
        f"database sqlite:///{db} is at revision 0003; this broker needs {head_revision()}"
    )
    assert _revision(db) == "0003"

    done = _cli("broker", "migrate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"database sqlite:///{db} upgraded from revision 0003 to {head_revision()}"
    )
    assert _revision(db) == head_revision()

    again = _cli("broker", "migrate", "--config", str(config))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert _cli("broker", "migrate", "--config", str(config), "--check").returncode == 0


def test_migrate_creates_no_database(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    res = _cli("broker", "migrate", "--config", str(config))
    assert res.returncode == 1
    assert "does not exist" in res.stderr and "broker init" in res.stderr
    assert not (tmp_path / "broker.db").exists()
