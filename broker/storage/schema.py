"""The broker's tables, as SQLAlchemy Core metadata.

This module is what the repository queries against. The migration scripts under
``migrations/versions`` create the same tables with explicit DDL (a migration must not change
when this module does); a test compares the two with Alembic's autogenerate.

Conventions:

* identifiers and free text are ``TEXT``; raw bytes (public areas, digests, nonces, wrapped keys)
  are ``BLOB``/``bytea``;
* every time is a timezone-aware UTC datetime (:class:`UtcDateTime`);
* small structured values (a golden set's accepted values, an approval's manifest and key list)
  are canonical JSON in ``TEXT`` columns, read and written whole, so that the attestation hot
  path fetches each object with one indexed single-row ``SELECT``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from broker import auditchain

#: Constraint and index names are derived from these patterns so that the metadata, the
#: migrations and the live database agree on every name (Alembic compares them by name).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The hash that precedes the first audit record (the chain's own, from broker.auditchain).
GENESIS_HASH = auditchain.GENESIS_HASH


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, stored with microseconds on every backend.

    PostgreSQL keeps it as ``timestamptz``. SQLite has no time type: SQLAlchemy stores a
    fixed-width ``YYYY-MM-DD HH:MM:SS.ffffff`` string, which sorts and compares correctly as
    long as every value is in the same zone, so values are converted to UTC and stored naive.
    Naive datetimes are refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to the broker's storage; use an aware UTC time")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _sequence_type() -> sa.types.TypeEngine[int]:
    # On SQLite an INTEGER PRIMARY KEY is the rowid itself, which makes the audit table's
    # primary key free; elsewhere a 64-bit integer.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# An EK is named by its canonical identity: the SHA-256 of its SubjectPublicKeyInfo (revision
# 0004 re-keyed older rows, which used the marshalled public area, and merged the duplicates).
eks = sa.Table(
    "eks",
    metadata,
    sa.Column("ek_id", sa.Text, primary_key=True),
    sa.Column("public", sa.LargeBinary, nullable=False),
    sa.Column("certificate", sa.LargeBinary, nullable=True),
    sa.Column("enrolled_at", UtcDateTime, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("revoked_reason", sa.Text, nullable=False),
)

aks = sa.Table(
    "aks",
    metadata,
    sa.Column("ak_name", sa.Text, primary_key=True),
    sa.Column("public", sa.LargeBinary, nullable=False),
    sa.Column("ek_id", sa.Text, sa.ForeignKey("eks.ek_id"), nullable=True, index=True),
    sa.Column("enrolled_by", sa.Text, nullable=False),
    sa.Column("enrolled_at", UtcDateTime, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("revoked_reason", sa.Text, nullable=False),
)

# No foreign key to aks: the AK is enrolled only once its challenge is answered.
credential_challenges = sa.Table(
    "credential_challenges",
    metadata,
    sa.Column("enrollment_id", sa.Text, primary_key=True),
    # One outstanding challenge per AK; put_credential_challenge replaces the old one.
    sa.Column("ak_name", sa.Text, nullable=False, unique=True),
    sa.Column("ak_public", sa.LargeBinary, nullable=False),
    sa.Column("ek_id", sa.Text, nullable=False),
    sa.Column("secret_digest", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False, index=True),
    # The EK waits here, not in eks, until its activation succeeds.
    sa.Column("ek_public", sa.LargeBinary, nullable=False),
    sa.Column("ek_certificate", sa.LargeBinary, nullable=True),
    # What vouched for a new EK (certificate, SEV-SNP report, configuration), for its record.
    sa.Column("ek_basis", sa.Text, nullable=False),
    # The SPIFFE ID that started the enrollment: only it may complete it.
    sa.Column("requester", sa.Text, nullable=False),
)

golden_sets = sa.Table(
    "golden_sets",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    # JSON: [{"index": 23, "bank": "sha256", "values": ["<hex>", ...]}, ...], sorted.
    sa.Column("accepted", sa.Text, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

parties = sa.Table(
    "parties",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("kem", sa.Integer, nullable=False),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
)

# The KEK an operator imported for a party (``cleanroom admin kek import``): it wraps the
# party's newly registered data keys, in preference to the configuration's ``party_keks`` and
# ``default_kek``. A separate table, so that a party record stays immutable (the broker caches
# parties) while its KEK may change.
party_keks = sa.Table(
    "party_keks",
    metadata,
    sa.Column("party", sa.Text, sa.ForeignKey("parties.name"), primary_key=True),
    sa.Column("kek_ref", sa.Text, nullable=False),
    # The versioned key id the broker used when it checked the KEK ("local" for the local KEK).
    sa.Column("checked_key", sa.Text, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

data_keys = sa.Table(
    "data_keys",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, sa.ForeignKey("parties.name"), nullable=False, index=True),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("kek_ref", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("approval_id", sa.Text, primary_key=True),
    sa.Column("party", sa.Text, sa.ForeignKey("parties.name"), nullable=False, index=True),
    sa.Column("workload_name", sa.Text, nullable=False),
    # JSON: [{"path": ..., "size": ..., "digests": {"sha256": "<hex>", ...}}, ...]
    sa.Column("manifest", sa.Text, nullable=False),
    # JSON: {"sha1": "<hex>", "sha256": "<hex>"}
    sa.Column("expected_pcrs", sa.Text, nullable=False),
    # The sha256 PCR 23 value again, as an indexed column: the attestation hot path looks
    # approvals up by the quoted value (find_active_approvals).
    sa.Column("expected_pcr_sha256", sa.LargeBinary, nullable=False, index=True),
    sa.Column("key_ids", sa.Text, nullable=False),  # JSON list, in the party's order
    sa.Column("output_recipients", sa.Text, nullable=False),  # JSON list
    sa.Column("golden_set", sa.Text, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    # Approvals made before revision 0006 did not demand the SEV-SNP hardware root.
    sa.Column("require_snp", sa.Boolean, nullable=False, server_default=sa.false()),
    # JSON: {"argv": [...], "executable": ..., "executable_sha256": "<hex>", "env": [[name,
    # value], ...], "cwd": ...}; NULL for approvals stored before launches were measured
    # (migration 0003), which never match.
    sa.Column("launch", sa.Text, nullable=True),
    # The sha256 PCR 23 value of the files alone (before the launch event), indexed: an
    # attestation whose files match but whose launch differs finds the approval by it, so
    # that the audit reason can say what in the launch differs.
    sa.Column("files_pcr_sha256", sa.LargeBinary, nullable=True, index=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_id", sa.Text, primary_key=True),
    sa.Column("ak_name", sa.Text, sa.ForeignKey("aks.ak_name"), nullable=False, index=True),
    sa.Column("peer", sa.Text, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("released_key_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("ended_at", UtcDateTime, nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=True),
)

# Nonces are stored raw, not hashed: a nonce is a public challenge (it travels in clear inside
# the quote), it is useless without the AK it is bound to, and it is burned on first use.
# Keeping it raw lets the single conditional UPDATE find it by primary key.
nonces = sa.Table(
    "nonces",
    metadata,
    sa.Column("nonce", sa.LargeBinary, primary_key=True),
    sa.Column("ak_name", sa.Text, nullable=False),
    sa.Column("issued_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False, index=True),
    sa.Column("used_at", UtcDateTime, nullable=True),
)

audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("sequence", _sequence_type(), primary_key=True, autoincrement=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence_digest", sa.Text, nullable=False),
    sa.Column("parties", sa.Text, nullable=False),  # JSON list, in the caller's order (hashed)
    sa.Column("previous_hash", sa.Text, nullable=False),
    sa.Column("record_hash", sa.Text, nullable=False, unique=True),
)

# An index of audit_records.parties for list_records(party=...). It is derived data, written in
# the same transaction as the record; verify_chain checks that it agrees with the hashed column.
audit_parties = sa.Table(
    "audit_parties",
    metadata,
    sa.Column("party", sa.Text, primary_key=True),
    sa.Column(
        "sequence",
        _sequence_type(),
        sa.ForeignKey("audit_records.sequence", ondelete="CASCADE"),
        primary_key=True,
    ),
)

# The chain head: one row holding the last sequence and hash. Appenders lock it (SELECT ... FOR
# UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) so that appends serialize across replicas,
# and verify_chain compares it with the last record, which detects a truncated tail.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sequence", _sequence_type(), nullable=False),
    sa.Column("record_hash", sa.Text, nullable=False),
    sa.CheckConstraint("id = 1", name="single_row"),
)

# Records of decisions committed on PostgreSQL and not yet sealed into the chain (revision
# 0007, docs/storage.md "Batch sequencing"). A decision's transaction inserts its records here,
# each with the next value of the ``audit_tickets`` sequence as its final chain sequence
# number, instead of locking the chain head; the sealer moves them into audit_records in
# sequence order, hashing them onto the head, many per transaction. SQLite appends to the chain
# directly (its writers are serialized anyway) and leaves this table empty.
audit_pending = sa.Table(
    "audit_pending",
    metadata,
    sa.Column("sequence", _sequence_type(), primary_key=True, autoincrement=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence_digest", sa.Text, nullable=False),
    sa.Column("parties", sa.Text, nullable=False),  # JSON list, in the caller's order
)

#: The sequence that numbers PostgreSQL's pending records (created by revision 0007 on
#: PostgreSQL only, started after the chain head).
AUDIT_TICKETS = "audit_tickets"

# The fingerprint of each KEK the broker uses (see broker.custody.kek_fingerprint): recorded by
# ``cleanroom broker init``, compared by every broker and replica at start, so that one with
# another KEK (its own state directory, a copied database) refuses to start instead of wrapping
# keys the others cannot unwrap.
kek_fingerprints = sa.Table(
    "kek_fingerprints",
    metadata,
    sa.Column("kek_ref", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
)
