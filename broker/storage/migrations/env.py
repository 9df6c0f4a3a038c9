"""Alembic's environment for the broker's database.

There is no ``alembic.ini``: :mod:`broker.storage.migrate` builds the Alembic configuration in
code and hands over an open connection, already inside the transaction (and lock) that the
upgrade runs in, as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from broker.storage.schema import metadata


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "the broker's migrations run through broker.storage.migrate, not the alembic CLI"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode recreates tables instead, which
        # future revisions need for anything beyond adding a column.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
