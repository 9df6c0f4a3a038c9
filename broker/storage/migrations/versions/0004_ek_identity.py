"""Canonical EK identity: EKs re-keyed by the SHA-256 of their SubjectPublicKeyInfo, duplicates
merged; credential challenges hold the EK and the requesting identity until activation.

Before this revision an EK was named by the SHA-256 of its marshalled TPMT_PUBLIC, so one TPM's
EK sent with another encoding (the RSA exponent written as 65537, another authPolicy, an extra
attribute) was a second EK, which a revocation of the first did not reach. Every row is re-keyed
to the SHA-256 of the key's DER SubjectPublicKeyInfo (the encoding an EK certificate uses, the
same for every encoding of one key). Rows of one key are merged into one:

* it is revoked if any of them was, with the reasons of every revoked row;
* it keeps the earliest enrollment (its public area and time) and the first certificate;
* its AKs point at it, and when it is revoked every AK under it is revoked too (with the reason
  ``EK revoked: ...``), as ``revoke_ek`` would have done had the rows been one.

A row whose public area does not parse (none that the broker wrote) keeps its id. Outstanding
credential challenges are dropped (they live for minutes; the sidecar asks again), because they
lack the EK, what vouched for it and the requester that a challenge now carries.

Revision ID: 0004
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import sqlalchemy as sa
from alembic import op
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC

revision: str = "0004"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# The tables as this revision knows them (a migration must not change when the schema module
# does).
_eks = sa.table(
    "eks",
    sa.column("ek_id", sa.Text),
    sa.column("public", sa.LargeBinary),
    sa.column("certificate", sa.LargeBinary),
    sa.column("enrolled_at", sa.DateTime),
    sa.column("revoked", sa.Boolean),
    sa.column("revoked_reason", sa.Text),
)
_aks = sa.table(
    "aks",
    sa.column("ek_id", sa.Text),
    sa.column("revoked", sa.Boolean),
    sa.column("revoked_reason", sa.Text),
)


def _spki_id(public: bytes) -> str | None:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of a marshalled TPM2B_PUBLIC, or None."""
    try:
        parsed, consumed = TPM2B_PUBLIC.unmarshal(bytes(public))
        if consumed != len(public):
            return None
        key = serialization.load_der_public_key(parsed.publicArea.to_der())
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:  # tpm2-pytss and cryptography raise several types on foreign bytes
        return None
    return hashlib.sha256(der).hexdigest()


def _tpmt_id(public: bytes) -> str | None:
    """Hex SHA-256 of the marshalled TPMT_PUBLIC (the id before this revision), or None."""
    try:
        parsed, consumed = TPM2B_PUBLIC.unmarshal(bytes(public))
    except Exception:  # as above
        return None
    if consumed != len(public):
        return None
    return hashlib.sha256(bytes(parsed.publicArea.marshal())).hexdigest()


def _rekey(conn: sa.Connection, new_id_of: Any, *, merge_revocations: bool) -> None:
    rows = conn.execute(sa.select(_eks).order_by(_eks.c.enrolled_at, _eks.c.ek_id)).all()
    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(new_id_of(bytes(row.public)) or row.ek_id, []).append(row)
    for new_id, members in groups.items():
        old_ids = [m.ek_id for m in members]
        if old_ids == [new_id]:
            continue
        first = members[0]
        revoked = [m for m in members if m.revoked]
        reason = "; ".join(dict.fromkeys(m.revoked_reason or "revoked" for m in revoked))
        certificate = next((m.certificate for m in members if m.certificate is not None), None)
        if new_id not in old_ids:
            conn.execute(
                sa.insert(_eks).values(
                    ek_id=new_id,
                    public=first.public,
                    certificate=certificate,
                    enrolled_at=first.enrolled_at,
                    revoked=bool(revoked),
                    revoked_reason=reason,
                )
            )
        else:
            conn.execute(
                sa.update(_eks)
                .where(_eks.c.ek_id == new_id)
                .values(
                    public=first.public,
                    certificate=certificate,
                    enrolled_at=first.enrolled_at,
                    revoked=bool(revoked),
                    revoked_reason=reason,
                )
            )
        others = [i for i in old_ids if i != new_id]
        conn.execute(sa.update(_aks).where(_aks.c.ek_id.in_(others)).values(ek_id=new_id))
        conn.execute(sa.delete(_eks).where(_eks.c.ek_id.in_(others)))
        if revoked and merge_revocations:
            conn.execute(
                sa.update(_aks)
                .where(_aks.c.ek_id == new_id, _aks.c.revoked.is_(False))
                .values(revoked=True, revoked_reason=f"EK revoked: {reason}")
            )


def upgrade() -> None:
    conn = op.get_bind()
    # Challenges last minutes; the ones outstanding lack the EK and the requester.
    conn.execute(sa.text("DELETE FROM credential_challenges"))
    # SQLite cannot add a NOT NULL column without a default in place: the batch copies the
    # (now empty) table instead; PostgreSQL alters it.
    recreate: Literal["always", "auto"] = "always" if conn.dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("credential_challenges", recreate=recreate) as batch:
        batch.add_column(sa.Column("ek_public", sa.LargeBinary, nullable=False))
        batch.add_column(sa.Column("ek_certificate", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("ek_basis", sa.Text, nullable=False))
        batch.add_column(sa.Column("requester", sa.Text, nullable=False))
    _rekey(conn, _spki_id, merge_revocations=True)


def downgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("DELETE FROM credential_challenges"))
    with op.batch_alter_table("credential_challenges") as batch:
        batch.drop_column("requester")
        batch.drop_column("ek_basis")
        batch.drop_column("ek_certificate")
        batch.drop_column("ek_public")
    # Back to the old ids of the stored public areas; merged rows stay merged.
    _rekey(conn, _tpmt_id, merge_revocations=False)
