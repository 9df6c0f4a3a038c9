"""Batch sequencing of the audit chain on PostgreSQL: the pending records table and the sequence
that numbers them (docs/storage.md "Batch sequencing").

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.storage.schema import UtcDateTime

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    sequence_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "audit_pending",
        sa.Column("sequence", sequence_type, nullable=False, autoincrement=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("evidence_digest", sa.Text, nullable=False),
        sa.Column("parties", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("sequence", name="pk_audit_pending"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # The sequence continues the chain: its next value is the head's sequence plus one.
        op.execute("CREATE SEQUENCE audit_tickets AS bigint MINVALUE 1")
        op.execute(
            "SELECT setval('audit_tickets', greatest(sequence, 1), sequence > 0) "
            "FROM audit_head WHERE id = 1"
        )


def downgrade() -> None:
    # Pending records are sealed by every read of the log; a downgrade with some left would
    # lose them, so it refuses.
    bind = op.get_bind()
    left = bind.execute(sa.text("SELECT count(*) FROM audit_pending")).scalar_one()
    if left:
        raise RuntimeError(f"{left} audit records are not sealed yet: run `audit verify` first")
    if bind.dialect.name == "postgresql":
        op.execute("DROP SEQUENCE audit_tickets")
    op.drop_table("audit_pending")
