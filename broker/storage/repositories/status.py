"""What ``GetStatus`` and the readiness probe ask of the database: its schema revision and the
number of rows in each table an operator reads."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from broker.errors import StorageError
from broker.storage import schema
from broker.storage.engine import Database

#: The tables ``GetStatus`` counts, by the names its ``StatusCounts`` gives them.
COUNTED_TABLES: dict[str, sa.Table] = {
    "eks": schema.eks,
    "aks": schema.aks,
    "parties": schema.parties,
    "data_keys": schema.data_keys,
    "approvals": schema.approvals,
    "golden_pcr_sets": schema.golden_sets,
    "audit_records": schema.audit_records,
}


@dataclass(frozen=True)
class SchemaCounts:
    """The database's schema revision (empty when it has none) and row counts."""

    revision: str
    #: Table name (as ``StatusCounts`` names it) -> rows.
    counts: dict[str, int]


class StatusRepository:
    """The schema revision and row counts."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def schema_counts(self) -> SchemaCounts:
        """The schema revision and the rows of each of :data:`COUNTED_TABLES`, read in one short
        read transaction.

        Raises:
            StorageError: the database failed.
        """
        # Alembic is imported on first use: a broker that is never asked its status or
        # readiness does not pay for it at start.
        from broker.storage import migrate

        db = self._db
        try:
            with db.engine.connect() as conn:
                revision = migrate.current_revision(conn) or ""
                counts = {
                    name: int(
                        conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                    )
                    for name, table in COUNTED_TABLES.items()
                }
                conn.rollback()
        except sa.exc.SQLAlchemyError as e:
            raise StorageError(f"status: the database {db.display_url} failed") from e
        return SchemaCounts(revision=revision, counts=counts)

    def schema_problem(self) -> str | None:
        """None when the database answers at this code's schema revision, else why not (one
        line, for a readiness probe)."""
        from broker.storage import migrate

        db = self._db
        try:
            with db.engine.connect() as conn:
                current = migrate.current_revision(conn)
                conn.rollback()
        except sa.exc.SQLAlchemyError as e:
            cause = getattr(e, "orig", None) or e
            return f"database {db.display_url} unreachable: {_first_line(str(cause))}"
        head = migrate.head_revision()
        if current != head:
            return f"database {db.display_url} is at schema {current or 'none'}, needs {head}"
        return None


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]
