"""``cleanroom broker migrate --config FILE``: upgrade (or, with ``--check``, only inspect) the
schema of the database a broker configuration names.

``cleanroom broker init`` creates the database at the current revision and ``broker serve``
upgrades an existing one when it starts; this command is for operators who upgrade explicitly,
for example once before rolling a new version out to several replicas, or who want a deployment
step to fail when the schema is behind (``--check``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _current_revision(url: str) -> str | None:
    """The database's schema revision, None when it has none (or, for SQLite, does not exist:
    nothing is created here).

    Raises:
        StorageError: the database cannot be reached.
    """
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from broker.errors import StorageError
    from broker.storage import migrate
    from broker.storage.engine import safe_url

    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as e:
        raise StorageError("invalid database URL") from e
    if parsed.get_backend_name() == "sqlite" and not Path(str(parsed.database)).is_file():
        return None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(parsed, hide_parameters=True)
    try:
        with engine.connect() as conn:
            revision = migrate.current_revision(conn)
            conn.rollback()
            return revision
    except sa.exc.SQLAlchemyError as e:
        cause = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open database {safe_url(parsed)}: {cause}") from e
    finally:
        engine.dispose()


def _migrate(args: argparse.Namespace) -> int:
    from broker.config import load_broker_config
    from broker.storage import migrate
    from broker.storage.engine import safe_url
    from broker.storage.store import Store

    config = load_broker_config(args.config)
    url = config.database_url
    shown = safe_url(url)
    head = migrate.head_revision()
    before = _current_revision(url)
    if args.check:
        if before == head:
            print(f"database {shown} is at revision {head} (current)")
            return 0
        print(f"database {shown} is at revision {before or 'none'}; this broker needs {head}")
        return 1
    # require_existing: a database is created by `broker init`, never by a migration.
    with Store.open(url, migrate=True, require_existing=True) as store:
        shown = store.display_url
    if before == head:
        print(f"database {shown} is at revision {head}: nothing to do")
    else:
        print(f"database {shown} upgraded from revision {before or 'none'} to {head}")
    return 0


def register_migrate(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``broker migrate`` to the ``broker`` command group."""
    p = group.add_parser(
        "migrate",
        help="upgrade the broker's database schema (or --check it)",
        description=(
            "Upgrades the database that broker.toml names to this broker's schema revision, in "
            "one transaction behind a lock (replicas migrating together upgrade it once). "
            "Creates nothing: `broker init` creates the database."
        ),
    )
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        required=True,
        help="broker TOML file; a relative SQLite path in it is relative to its directory",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 when the schema is not at this broker's revision",
    )
    p.set_defaults(func=_migrate)


__all__ = ["register_migrate"]
