"""Approval launches: the approved command, executable digest, environment and working
directory, and the files-only PCR 23 value approvals are also found by.

Approvals stored before this revision keep ``launch`` NULL: they approve no launch, and the
policy refuses them with a reason that says to approve the workload again with ``--command``
(docs/policy.md). Their PCR 23 value covered their files only, so it is copied into
``files_pcr_sha256``: an attestation of the same files then finds them and the audit log says
why they no longer grant anything.

Revision ID: 0003
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(sa.Column("launch", sa.Text, nullable=True))
        batch.add_column(sa.Column("files_pcr_sha256", sa.LargeBinary, nullable=True))
        batch.create_index("ix_approvals_files_pcr_sha256", ["files_pcr_sha256"])
    op.execute("UPDATE approvals SET files_pcr_sha256 = expected_pcr_sha256")


def downgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.drop_index("ix_approvals_files_pcr_sha256")
        batch.drop_column("files_pcr_sha256")
        batch.drop_column("launch")
