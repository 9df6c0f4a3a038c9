"""Approvals that demand the AMD SEV-SNP hardware root (an Azure confidential VM's HCL report).

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Existing approvals did not demand it: they keep working as they did.
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(
            sa.Column("require_snp", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.drop_column("require_snp")
