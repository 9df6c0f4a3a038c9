"""Initial schema: keys, challenges, policy objects, sessions, nonces and the audit chain.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.storage.schema import GENESIS_HASH, UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _seq() -> sa.types.TypeEngine[int]:
    # INTEGER PRIMARY KEY is SQLite's rowid; 64-bit elsewhere (as in broker.storage.schema).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "eks",
        sa.Column("ek_id", sa.Text, nullable=False),
        sa.Column("public", sa.LargeBinary, nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=True),
        sa.Column("enrolled_at", UtcDateTime, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("revoked_reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("ek_id", name="pk_eks"),
    )
    op.create_table(
        "aks",
        sa.Column("ak_name", sa.Text, nullable=False),
        sa.Column("public", sa.LargeBinary, nullable=False),
        sa.Column("ek_id", sa.Text, nullable=True),
        sa.Column("enrolled_by", sa.Text, nullable=False),
        sa.Column("enrolled_at", UtcDateTime, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("revoked_reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("ak_name", name="pk_aks"),
        sa.ForeignKeyConstraint(["ek_id"], ["eks.ek_id"], name="fk_aks_ek_id_eks"),
    )
    op.create_index("ix_aks_ek_id", "aks", ["ek_id"])
    op.create_table(
        "credential_challenges",
        sa.Column("enrollment_id", sa.Text, nullable=False),
        sa.Column("ak_name", sa.Text, nullable=False),
        sa.Column("ak_public", sa.LargeBinary, nullable=False),
        sa.Column("ek_id", sa.Text, nullable=False),
        sa.Column("secret_digest", sa.LargeBinary, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("enrollment_id", name="pk_credential_challenges"),
        sa.UniqueConstraint("ak_name", name="uq_credential_challenges_ak_name"),
    )
    op.create_index("ix_credential_challenges_expires_at", "credential_challenges", ["expires_at"])
    op.create_table(
        "golden_sets",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("accepted", sa.Text, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_golden_sets"),
    )
    op.create_table(
        "parties",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kem", sa.Integer, nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_parties"),
    )
    op.create_table(
        "data_keys",
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("kek_ref", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("key_id", name="pk_data_keys"),
        sa.ForeignKeyConstraint(["owner"], ["parties.name"], name="fk_data_keys_owner_parties"),
    )
    op.create_index("ix_data_keys_owner", "data_keys", ["owner"])
    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.Text, nullable=False),
        sa.Column("party", sa.Text, nullable=False),
        sa.Column("workload_name", sa.Text, nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("expected_pcrs", sa.Text, nullable=False),
        sa.Column("expected_pcr_sha256", sa.LargeBinary, nullable=False),
        sa.Column("key_ids", sa.Text, nullable=False),
        sa.Column("output_recipients", sa.Text, nullable=False),
        sa.Column("golden_set", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("approval_id", name="pk_approvals"),
        sa.ForeignKeyConstraint(["party"], ["parties.name"], name="fk_approvals_party_parties"),
    )
    op.create_index("ix_approvals_party", "approvals", ["party"])
    op.create_index("ix_approvals_expected_pcr_sha256", "approvals", ["expected_pcr_sha256"])
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("ak_name", sa.Text, nullable=False),
        sa.Column("peer", sa.Text, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("released_key_ids", sa.Text, nullable=False),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.PrimaryKeyConstraint("session_id", name="pk_sessions"),
        sa.ForeignKeyConstraint(["ak_name"], ["aks.ak_name"], name="fk_sessions_ak_name_aks"),
    )
    op.create_index("ix_sessions_ak_name", "sessions", ["ak_name"])
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ak_name", sa.Text, nullable=False),
        sa.Column("issued_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("used_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("nonce", name="pk_nonces"),
    )
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])
    op.create_table(
        "audit_records",
        sa.Column("sequence", _seq(), nullable=False, autoincrement=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("evidence_digest", sa.Text, nullable=False),
        sa.Column("parties", sa.Text, nullable=False),
        sa.Column("previous_hash", sa.Text, nullable=False),
        sa.Column("record_hash", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("sequence", name="pk_audit_records"),
        sa.UniqueConstraint("record_hash", name="uq_audit_records_record_hash"),
    )
    op.create_table(
        "audit_parties",
        sa.Column("party", sa.Text, nullable=False),
        sa.Column("sequence", _seq(), nullable=False, autoincrement=False),
        sa.PrimaryKeyConstraint("party", "sequence", name="pk_audit_parties"),
        sa.ForeignKeyConstraint(
            ["sequence"],
            ["audit_records.sequence"],
            name="fk_audit_parties_sequence_audit_records",
            ondelete="CASCADE",
        ),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("sequence", _seq(), nullable=False),
        sa.Column("record_hash", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
        sa.CheckConstraint("id = 1", name="ck_audit_head_single_row"),
    )
    # The chain starts empty: sequence 0 and the genesis hash.
    op.bulk_insert(head, [{"id": 1, "sequence": 0, "record_hash": GENESIS_HASH}])


def downgrade() -> None:
    for table in (
        "audit_head",
        "audit_parties",
        "audit_records",
        "nonces",
        "sessions",
        "approvals",
        "data_keys",
        "parties",
        "golden_sets",
        "credential_challenges",
        "aks",
        "eks",
    ):
        op.drop_table(table)
