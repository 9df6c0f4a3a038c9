"""KEK fingerprints: the KEKs `cleanroom broker init` recorded, checked at every start.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.storage.schema import UtcDateTime

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "kek_fingerprints",
        sa.Column("kek_ref", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("kek_ref", name="pk_kek_fingerprints"),
    )


def downgrade() -> None:
    op.drop_table("kek_fingerprints")
