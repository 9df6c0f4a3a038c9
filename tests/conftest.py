"""Fixtures shared by every test: real swtpm and PostgreSQL servers on loopback.

These fixtures never skip: a test that needs swtpm or PostgreSQL fails when it cannot have one,
so a machine without them cannot pass the suite by skipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.postgres import Postgres, start_postgres
from tests.harness.swtpm import Swtpm, manufacture, running_copy

# Azurite and the local Key Vault double live in their own plugin module.
pytest_plugins = ["tests.harness.azure_fixtures"]


@pytest.fixture(scope="session")
def swtpm_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manufactured TPM state (sha1+sha256 banks, EK certificates), made once per session."""
    state = tmp_path_factory.mktemp("swtpm-template")
    manufacture(state)
    return state


@pytest.fixture
def swtpm(swtpm_template: Path, tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh, running swtpm for one test (a copy of the session's manufactured state)."""
    with running_copy(swtpm_template, tmp_path / "swtpm-state") as tpm:
        yield tpm


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the session."""
    pg = start_postgres()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> Iterator[str]:
    """A URL to a fresh, empty database on the session's PostgreSQL server."""
    import uuid

    import sqlalchemy as sa

    name = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(postgres_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh broker database: a SQLite file, then (marked ``postgres``) an empty
    PostgreSQL database; a test that takes it runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    url = request.getfixturevalue("postgres_url")
    assert isinstance(url, str)
    return url
