"""Explicit, verifiable broker state: ``cleanroom broker init`` makes it, ``serve`` only uses it.

The real ``cleanroom`` command in subprocesses, SQLite in ``tmp_path``: paths in the broker's
configuration are relative to the file (not to the working directory); ``serve`` refuses a
missing database or KEK, names it and creates nothing; ``init`` says where everything is and
records the KEK's fingerprint; a broker whose KEK is not the recorded one (a replica with its
own state directory, a replaced key file) refuses to start, saying so; the start-up log names
the database and the KEK fingerprint.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.app import init_broker, open_broker
from broker.config import BrokerConfig, load_broker_config
from broker.custody import LocalKek, kek_fingerprint
from broker.errors import BrokerError, KekError, StorageError
from broker.kek_azure import KeyVaultConfig, KeyVaultKek
from pki.ca import init_pki
from tests.support.broker import CLEANROOM, clean_env, spawn_broker

CONFIG = """\
[broker]
database_url = "sqlite:///{db}"
state_dir = "{state}"

[broker.tls]
listen = "127.0.0.1:0"
cert_file = "pki/broker.crt"
key_file = "pki/broker.key"
ca_file = "pki/ca.crt"

[broker.metrics]
enabled = false
"""


def _config(directory: Path, db: str = "broker.db", state: str = "broker-state") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "broker.toml"
    path.write_text(CONFIG.format(db=db, state=state))
    return path


def _with(config: Path, extra: str) -> Path:
    config.write_text(config.read_text() + extra)
    return config


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLEANROOM), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


def _listing(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def test_config_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "etc")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_broker_config(Path("../etc/broker.toml"))
    etc = tmp_path / "etc"
    assert loaded.database_url == f"sqlite:///{etc / 'broker.db'}"
    assert loaded.state_dir == str(etc / "broker-state")
    assert loaded.tls.cert_file == str(etc / "pki/broker.crt")
    assert loaded.tls.ca_file == str(etc / "pki/ca.crt")
    with_roots = load_broker_config(
        _with(config, '\n[broker.azure_snp]\ntrusted_root_files = ["amd/ark.pem"]\n')
    )
    assert with_roots.azure_snp.trusted_root_files == (str(etc / "amd/ark.pem"),)
    assert config.exists()


def test_serve_refuses_a_missing_database_names_it_and_creates_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path / "etc")
    init_pki(tmp_path / "etc" / "pki", parties=(), sidecars=())
    (tmp_path / "elsewhere").mkdir()
    before = _listing(tmp_path)
    try:
        done = _cli(tmp_path / "elsewhere", "broker", "serve", "--config", str(config))
    except subprocess.TimeoutExpired:
        pytest.fail("broker serve started on a missing database")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(tmp_path / "etc" / "broker.db") in lines[0] and "does not exist" in lines[0]
    assert "broker init" in lines[0]
    assert _listing(tmp_path) == before, "a failed start left files behind"


def test_serve_refuses_a_missing_kek_and_creates_nothing(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    config = _config(etc)
    init_pki(etc / "pki", parties=(), sidecars=())
    assert _cli(tmp_path, "broker", "init", "--config", str(config)).returncode == 0
    (etc / "broker-state" / "kek.key").unlink()
    before = _listing(tmp_path)
    done = _cli(tmp_path, "broker", "serve", "--config", str(config))
    assert done.returncode != 0
    assert str(etc / "broker-state" / "kek.key") in done.stderr
    assert "does not exist" in done.stderr
    assert _listing(tmp_path) == before


def test_init_says_where_and_serve_logs_the_database_and_the_kek_fingerprint(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "etc"
    config = _config(etc)
    init_pki(etc / "pki", parties=(), sidecars=())
    first = _cli(tmp_path, "broker", "init", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert f"database: sqlite:///{etc / 'broker.db'}" in first.stdout
    assert f"local KEK: {etc / 'broker-state' / 'kek.key'}" in first.stdout
    fingerprint = first.stdout.split("KEK local: fingerprint ", 1)[1].split()[0]
    kek_file = etc / "broker-state" / "kek.key"
    assert fingerprint.startswith("local:hmac-sha256:")
    assert kek_file.read_bytes().hex() not in first.stdout
    assert "created:" in first.stdout
    again = _cli(tmp_path, "broker", "init", "--config", str(config))
    assert again.returncode == 0 and "nothing to create" in again.stdout
    assert fingerprint in again.stdout

    broker = spawn_broker(config, tmp_path, init=False)
    try:
        log = broker.stderr_path.read_text()
    finally:
        broker.kill_all()
    assert f"sqlite:///{etc / 'broker.db'}" in log and fingerprint in log


def test_a_replica_with_another_kek_refuses_to_start(tmp_path: Path) -> None:
    # Two replicas share one database; the second has its own state directory.
    db = tmp_path / "shared.db"
    first = BrokerConfig(database_url=f"sqlite:///{db}", state_dir=str(tmp_path / "a"))
    second = BrokerConfig(database_url=f"sqlite:///{db}", state_dir=str(tmp_path / "b"))
    init_broker(first)

    # init on the replica does not make a second KEK: it says to copy the first one.
    with pytest.raises(KekError, match="copy that KEK file"):
        init_broker(second)
    assert not (tmp_path / "b").exists()
    # serve (create=False) refuses the missing state, naming it.
    with pytest.raises(BrokerError, match=re.escape(str(tmp_path / "b"))):
        open_broker(second, create=False)
    assert not (tmp_path / "b").exists()

    # A replica whose KEK file holds another key refuses to start, saying so.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    other = tmp_path / "b" / "kek.key"
    other.unlink()
    fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    with pytest.raises(KekError, match=r"fingerprint .* but the database .* records"):
        open_broker(second, create=False)
    with pytest.raises(KekError, match="not the KEK that wrapped"):
        init_broker(second)

    # With the same KEK (copied), it starts.
    shutil.copy2(tmp_path / "a" / "kek.key", other)
    with open_broker(second, create=False) as broker:
        assert broker.store.kek_fingerprints()["local"].startswith("local:hmac-sha256:")


def test_serve_refuses_a_database_without_schema(tmp_path: Path) -> None:
    # An empty file (or an empty PostgreSQL database) is not an initialized broker database.
    (tmp_path / "empty.db").write_bytes(b"")
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'empty.db'}", state_dir=str(tmp_path / "s")
    )
    with pytest.raises(StorageError, match="has no broker schema"):
        open_broker(config, create=False)


def test_kek_fingerprints_identify_without_revealing() -> None:
    key = secrets.token_bytes(32)
    local = LocalKek(key=key)
    assert kek_fingerprint(local) == kek_fingerprint(LocalKek(key=key))
    assert kek_fingerprint(local) != kek_fingerprint(LocalKek(key=secrets.token_bytes(32)))
    assert key.hex()[:16] not in kek_fingerprint(local)
    vault = KeyVaultKek(
        ref="azurekv:https://Vault-1.vault.azure.net/keys/party-kek/0123456789abcdef0123456789abcdef",
        credential=None,  # type: ignore[arg-type]  # never used: no call reaches Key Vault
    )
    # The Key Vault key id without its version: a rotation inside the key keeps it.
    assert kek_fingerprint(vault) == "azurekv:https://vault-1.vault.azure.net/keys/party-kek"


def test_a_key_vault_default_kek_is_recorded_and_another_one_refused(tmp_path: Path) -> None:
    # Resolving a Key Vault KEK and taking its fingerprint contacts no vault.
    vault = KeyVaultConfig(credential="static-token", access_token="unused")
    kek_a = "azurekv:https://vault-a.vault.azure.net/keys/broker-kek"
    kek_b = "azurekv:https://vault-b.vault.azure.net/keys/broker-kek"
    db = f"sqlite:///{tmp_path / 'broker.db'}"
    first = BrokerConfig(database_url=db, state_dir=str(tmp_path / "s"), default_kek=kek_a)
    state = init_broker(first, key_vault=vault)
    assert state.kek_fingerprints[kek_a] == kek_a
    with open_broker(first, create=False, key_vault=vault) as broker:
        assert broker.store.kek_fingerprints()[kek_a] == kek_a
    # A replica configured with another vault's key refuses to start until init records it.
    other = BrokerConfig(database_url=db, state_dir=str(tmp_path / "s"), default_kek=kek_b)
    with pytest.raises(KekError, match="records no fingerprint for KEK"):
        open_broker(other, create=False, key_vault=vault)
