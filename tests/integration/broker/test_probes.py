"""``cleanroom admin status`` and the probes of a real ``cleanroom broker serve``: ``/healthz``
and ``/readyz`` on the metrics listener, without a client certificate; 404 elsewhere;
``/readyz`` turns 503, naming the database, when its PostgreSQL server goes away, and comes back
when it returns.

The PostgreSQL server stopped here is one this module starts for itself (never the session's
shared server, which other tests use).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from pki.ca import PkiLayout, init_pki
from tests.harness.postgres import Postgres, _run_as, start_postgres
from tests.support.broker import CLEANROOM, Spawned, clean_env, spawn_broker
from tests.support.probes import write_config


def get(address: str, path: str) -> tuple[int, str]:
    """``GET http://address/path`` -> (status, body), whatever the status."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def pki(tmp_path: Path) -> PkiLayout:
    return init_pki(tmp_path / "pki", parties=("advertiser",), sidecars=())


@pytest.fixture
def sqlite_broker(tmp_path: Path, pki: PkiLayout) -> Iterator[Spawned]:
    config = write_config(tmp_path / "broker.toml", pki, f"sqlite:///{tmp_path / 'broker.db'}")
    spawned = spawn_broker(config, tmp_path)
    yield spawned
    spawned.kill_all()


def test_probes_answer_without_a_certificate_and_other_paths_are_404(
    sqlite_broker: Spawned,
) -> None:
    address = sqlite_broker.metrics[0]
    assert get(address, "/healthz") == (200, "ok\n")
    assert get(address, "/readyz") == (200, "ready\n")
    status, body = get(address, "/metrics")
    assert status == 200 and "cleanroom_broker_rpc_duration_seconds" in body
    for path in ("/", "/health", "/healthz/", "/metrics/x", "/readyz?x", "/admin"):
        status, body = get(address, path)
        if path == "/readyz?x":
            # The query string is not part of the path: still the readiness probe.
            assert status == 200, body
        else:
            assert (status, body) == (404, "not found\n"), path


@pytest.fixture
def own_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[Postgres]:
    # A server of this test's own, even when the session uses one given by the environment:
    # this test stops it.
    monkeypatch.delenv("CLEANROOM_TEST_POSTGRES_URL", raising=False)
    pg = start_postgres()
    assert pg._datadir is not None
    yield pg
    pg.stop()


@pytest.mark.postgres
def test_readyz_turns_503_when_postgres_stops_and_back_when_it_returns(
    tmp_path: Path, pki: PkiLayout, own_postgres: Postgres
) -> None:
    config = write_config(tmp_path / "broker.toml", pki, own_postgres.url)
    spawned = spawn_broker(config, tmp_path)
    try:
        address = spawned.metrics[0]
        assert get(address, "/readyz") == (200, "ready\n")
        assert own_postgres._bindir is not None and own_postgres._datadir is not None
        pg_ctl = [str(own_postgres._bindir / "pg_ctl"), "-D", str(own_postgres._datadir)]
        _run_as(own_postgres._user, [*pg_ctl, "-m", "immediate", "stop"])
        status, body = get(address, "/readyz")
        assert status == 503, body
        assert body.startswith("not ready: database postgresql+psycopg://cleanroom@127.0.0.1:")
        assert "unreachable" in body and body.count("\n") == 1
        # Liveness does not depend on the database: the process is alive.
        assert get(address, "/healthz") == (200, "ok\n")
        port = own_postgres.url.rsplit(":", 1)[1].split("/")[0]
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} "
            f"-c unix_socket_directories={own_postgres._datadir.parent} -c fsync=off"
        )
        log = str(own_postgres._datadir.parent / "log")
        _run_as(own_postgres._user, [*pg_ctl, "-o", options, "-l", log, "-w", "start"])
        status, body = get(address, "/readyz")
        if status != 200:  # The pool may hand out one dead connection first.
            status, body = get(address, "/readyz")
        assert (status, body) == (200, "ready\n")
        assert spawned.proc.poll() is None
    finally:
        spawned.kill_all()


def admin(
    spawned: Spawned, pki: PkiLayout, *args: str, kind: str = "operator"
) -> CompletedProcess[str]:
    cert, key = pki.cert_and_key(kind, "advertiser" if kind == "party" else "")
    return subprocess.run(
        [
            str(CLEANROOM),
            "admin",
            "--broker",
            spawned.grpc_address,
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--ca",
            str(pki.ca_cert),
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


def test_admin_status_shows_the_kek_fingerprint_database_schema_and_counts(
    tmp_path: Path, pki: PkiLayout, sqlite_broker: Spawned
) -> None:
    from broker.storage.migrate import head_revision
    from broker.storage.store import Store

    proc = admin(sqlite_broker, pki, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    with Store.open(f"sqlite:///{tmp_path / 'broker.db'}", migrate=False) as store:
        recorded = store.kek_fingerprints()
    assert {k["kek_ref"]: k["fingerprint"] for k in doc["keks"]} == recorded
    assert doc["default_kek"] == "local" and recorded["local"]
    assert doc["database"] == f"sqlite:///{tmp_path / 'broker.db'}"
    assert doc["schema_revision"] == doc["schema_head"] == head_revision()
    assert doc["processes"] == 1 and doc["pid"] == sqlite_broker.proc.pid
    assert doc["counts"]["audit_records"] >= 1 and doc["counts"]["aks"] == 0
    assert doc["uptime_seconds"] > 0
    text = admin(sqlite_broker, pki, "status")
    assert text.returncode == 0, text.stderr
    assert "KEK local:" in text.stdout and recorded["local"] in text.stdout
    assert "(current)" in text.stdout


def test_admin_status_is_the_operators_only(pki: PkiLayout, sqlite_broker: Spawned) -> None:
    proc = admin(sqlite_broker, pki, "status", kind="party")
    assert proc.returncode == 1
    assert "PERMISSION_DENIED" in proc.stderr or "not allowed" in proc.stderr, proc.stderr


@pytest.mark.postgres
def test_admin_status_hides_the_database_password(
    tmp_path: Path, pki: PkiLayout, postgres_url: str
) -> None:
    url = postgres_url.replace(
        "postgresql+psycopg://cleanroom@", "postgresql+psycopg://cleanroom:s3cret-pw@"
    )
    config = write_config(tmp_path / "broker.toml", pki, url)
    spawned = spawn_broker(config, tmp_path)
    try:
        proc = admin(spawned, pki, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        assert "s3cret-pw" not in proc.stdout
        assert json.loads(proc.stdout)["database_dialect"] == "postgresql"
    finally:
        spawned.kill_all()


def test_a_wrong_ca_file_says_the_brokers_certificate_is_not_signed_by_it(
    tmp_path: Path, pki: PkiLayout, sqlite_broker: Spawned
) -> None:
    # The client's own certificate and CA file agree (the client checks that itself, naming
    # the file); the broker's certificate comes from another CA.
    other = init_pki(tmp_path / "other-pki", parties=(), sidecars=())
    cert, key = other.cert_and_key("operator")
    proc = subprocess.run(
        [
            str(CLEANROOM),
            "admin",
            "--broker",
            sqlite_broker.grpc_address,
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--ca",
            str(other.ca_cert),
            "--timeout",
            "3",
            "status",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # no gRPC C-core lines
    assert "the broker's certificate is not signed by the CA in the CA file" in lines[0]
