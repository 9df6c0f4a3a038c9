"""Party KEKs: the KEK an operator imported for a party, used for its new data keys.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.storage.schema import UtcDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "party_keks",
        sa.Column("party", sa.Text, nullable=False),
        sa.Column("kek_ref", sa.Text, nullable=False),
        sa.Column("checked_key", sa.Text, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("party", name="pk_party_keks"),
        sa.ForeignKeyConstraint(["party"], ["parties.name"], name="fk_party_keks_party_parties"),
    )


def downgrade() -> None:
    op.drop_table("party_keks")
