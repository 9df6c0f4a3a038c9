"""Schema migrations with Alembic, configured in code (no ``alembic.ini`` at run time).

The revisions live in ``broker/storage/migrations/versions`` and ship inside the package.
:func:`upgrade` runs them on an open connection inside one transaction that first takes a lock,
so that several broker replicas starting at once against one PostgreSQL database upgrade it
exactly once (the others wait, then find it current):

* PostgreSQL: ``pg_advisory_xact_lock`` (PostgreSQL has transactional DDL, so a failed upgrade
  leaves nothing behind);
* SQLite: ``BEGIN IMMEDIATE`` (the write lock of the database file); SQLite's DDL is
  transactional as well once the driver's own transaction handling is off, as it is here.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

#: Where the revisions are (a directory inside this package).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Key of the PostgreSQL advisory lock held while migrating ("cleanroom" in ASCII, as a bigint).
MIGRATION_LOCK_KEY = 0x636C65616E726F6F


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of the broker's database, built in code.

    Developers can hand it to ``alembic.command.revision(cfg, message, autogenerate=True)``
    (with a connection to a database at head) to write a new revision.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision that this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the broker ships at least one revision"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrades the database to ``revision`` inside one locked transaction.

    ``connection`` must not be in a transaction yet; on SQLite it must come from the store's
    engine (whose ``begin`` hook issues ``BEGIN IMMEDIATE`` when asked to).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused a statement (the caller wraps it).
    """
    if connection.dialect.name == "sqlite":
        connection.execution_options(cleanroom_sqlite_begin="IMMEDIATE")
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        # Alembic sees the connection already in a transaction and runs inside it.
        command.upgrade(alembic_config(connection), revision)
