"""Golden PCR sets and workload approvals, with the release's re-check of what it cites."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa

from broker.errors import BrokerError, DuplicateError, PolicyError, UnknownPolicyObjectError
from broker.model import APPROVAL_INDEX_BANK, Approval, GoldenPcrSet
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.fast import FastStatement
from broker.storage.schema import approvals, data_keys, golden_sets, parties
from broker.storage.unit import UnitOfWork

#: The most decoded approvals one repository keeps (beyond it, approvals are decoded per lookup).
_MAX_CACHED_APPROVALS: Final = 10_000


class PolicyRepository:
    """Golden sets and approvals."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Decoded approvals by id, for find_active_approvals. An approval is never changed
        # once stored except for ``revoked``, which every lookup reads fresh from the database
        # (the query selects the ids of unrevoked approvals), so an entry never goes stale,
        # whichever process or replica revokes it. Only unrevoked approvals are cached.
        self._approvals: dict[str, Approval] = {}
        fast = db.fast
        self._get_golden_set = fast.prepare(
            sa.select(golden_sets).where(golden_sets.c.name == sa.bindparam("name"))
        )
        self._get_approval = fast.prepare(
            sa.select(approvals).where(approvals.c.approval_id == sa.bindparam("approval_id"))
        )
        # Only the ids: the rest of an unrevoked approval never changes (see _approvals).
        self._find_active_approval_ids = fast.prepare(
            sa.select(approvals.c.approval_id)
            .where(
                sa.or_(
                    approvals.c.expected_pcr_sha256 == sa.bindparam("pcr"),
                    approvals.c.files_pcr_sha256 == sa.bindparam("files_pcr"),
                ),
                approvals.c.revoked.is_(False),
            )
            .order_by(approvals.c.created_at, approvals.c.approval_id)
        )
        # Which of an AK (with its EK: an AK whose EK is revoked or kept out is not active)
        # and a list of approvals are still unrevoked, in one statement: the list is an array
        # on PostgreSQL and a JSON array on SQLite (a prepared statement cannot expand an IN
        # list).
        if fast.dialect == "postgresql":
            # FOR SHARE: a revocation (an UPDATE of the AK or approval row) that has not
            # committed makes the release wait for it and then see it; one that comes later
            # waits for the release. PostgreSQL's hot-path units take no chain lock (see
            # broker.storage.unit), so these row locks are what orders a release and a
            # revocation, and their records. Revoking an EK updates its AKs too, so locking
            # the AK row covers its EK. Locking clauses are not allowed with UNION, hence the
            # CTEs.
            sql = (
                "WITH ak AS (SELECT a.ak_name FROM aks a"
                " WHERE a.ak_name = %(ak)s AND a.revoked = false"
                " AND NOT EXISTS (SELECT 1 FROM eks e WHERE e.ek_id = a.ek_id AND e.revoked)"
                " FOR SHARE OF a),"
                " ap AS (SELECT approval_id FROM approvals"
                " WHERE approval_id = ANY(%(ids)s) AND revoked = false FOR SHARE)"
                " SELECT 'ak' AS kind, ak_name AS id FROM ak"
                " UNION ALL SELECT 'approval', approval_id FROM ap"
            )
        else:
            sql = (
                "SELECT 'ak' AS kind, a.ak_name AS id FROM aks a"
                " LEFT JOIN eks e ON e.ek_id = a.ek_id"
                " WHERE a.ak_name = :ak AND a.revoked = 0 AND coalesce(e.revoked, 0) = 0"
                " UNION ALL SELECT 'approval', approval_id FROM approvals"
                " WHERE approval_id IN (SELECT value FROM json_each(:ids)) AND revoked = 0"
            )
        self._still_active = FastStatement(
            sql, {}, namedtuple("ActiveRow", ["kind", "id"]), (None, None)
        )

    def put_golden_set(self, golden: GoldenPcrSet, *, uow: UnitOfWork | None = None) -> None:
        """Creates or replaces the golden set of this name.

        Raises:
            StorageError: the database failed.
        """
        values = {
            "name": golden.name,
            "accepted": codec.encode_accepted(golden.accepted),
            "updated_at": golden.updated_at,
        }
        with self._db.write("put golden set", uow) as conn:
            conn.execute(self._db.upsert(golden_sets, values, ["name"]))

    def get_golden_set(self, name: str) -> GoldenPcrSet:
        """The golden set of this name.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get golden set",
            self._get_golden_set,
            {"name": name},
            UnknownPolicyObjectError(f"golden set {name!r} does not exist"),
        )
        return codec.golden(row)

    def list_golden_sets(self) -> list[GoldenPcrSet]:
        """Every golden set, by name.

        Raises:
            StorageError: the database failed.
        """
        return self._db.select_all(
            "list golden sets", sa.select(golden_sets).order_by(golden_sets.c.name), codec.golden
        )

    def delete_golden_set(self, name: str, *, uow: UnitOfWork | None = None) -> None:
        """Deletes a golden set. Approvals that name it then fail closed at attestation.

        Raises:
            UnknownPolicyObjectError: no such golden set.
            StorageError: the database failed.
        """
        with self._db.write("delete golden set", uow) as conn:
            n = conn.execute(sa.delete(golden_sets).where(golden_sets.c.name == name)).rowcount
        if n == 0:
            raise UnknownPolicyObjectError(f"golden set {name!r} does not exist")

    def add_approval(self, approval: Approval, *, uow: UnitOfWork | None = None) -> None:
        """Stores a party's approval of a workload, after checking what it names.

        The party, every key, every output recipient and the golden set (when named) must
        exist; every key must be the party's own; ``expected_pcrs`` must hold a sha256 value
        (approvals are found by it at attestation).

        Raises:
            UnknownPolicyObjectError: the party, a key, a recipient or the golden set does not
                exist.
            PolicyError: a key belongs to another party, a key is named twice, or the sha256
                PCR value is missing or malformed.
            DuplicateError: an approval with this id exists.
            StorageError: the database failed.
        """
        sha256 = approval.expected_pcrs.get(APPROVAL_INDEX_BANK)
        if sha256 is None or len(sha256) != 32:
            raise PolicyError("an approval needs the expected sha256 PCR 23 value (32 bytes)")
        if len(set(approval.key_ids)) != len(approval.key_ids):
            raise PolicyError("an approval names a key twice")
        problem: BrokerError | None = None
        with self._db.write(
            "add approval",
            uow,
            duplicate=DuplicateError(f"approval {approval.approval_id!r} exists"),
        ) as conn:
            wanted_parties = {approval.party, *approval.output_recipients}
            known = set(
                conn.execute(
                    sa.select(parties.c.name).where(parties.c.name.in_(wanted_parties))
                ).scalars()
            )
            owners: dict[str, str] = {}
            if approval.key_ids:
                owners = {
                    r.key_id: r.owner
                    for r in conn.execute(
                        sa.select(data_keys.c.key_id, data_keys.c.owner).where(
                            data_keys.c.key_id.in_(approval.key_ids)
                        )
                    )
                }
            golden_exists = approval.golden_set is None or (
                conn.execute(
                    sa.select(golden_sets.c.name).where(golden_sets.c.name == approval.golden_set)
                ).first()
                is not None
            )
            problem = codec.approval_problem(approval, known, owners, golden_exists)
            if problem is None:
                conn.execute(sa.insert(approvals).values(**codec.approval_values(approval, sha256)))
        if problem is not None:
            raise problem

    def get_approval(self, approval_id: str) -> Approval:
        """The approval with this id (revoked or not).

        Raises:
            UnknownPolicyObjectError: no such approval.
            StorageError: the database failed.
        """
        row = self._db.select_one(
            "get approval",
            sa.select(approvals).where(approvals.c.approval_id == approval_id),
            UnknownPolicyObjectError(f"approval {approval_id!r} does not exist"),
        )
        return codec.approval(row)

    def list_approvals(
        self, party: str | None = None, include_revoked: bool = True
    ) -> list[Approval]:
        """Approvals (all, or one party's), oldest first.

        Raises:
            StorageError: the database failed.
        """
        stmt = sa.select(approvals).order_by(approvals.c.created_at, approvals.c.approval_id)
        if party is not None:
            stmt = stmt.where(approvals.c.party == party)
        if not include_revoked:
            stmt = stmt.where(approvals.c.revoked.is_(False))
        return self._db.select_all("list approvals", stmt, codec.approval)

    def revoke_approval(self, approval_id: str, *, uow: UnitOfWork | None = None) -> None:
        """Revokes an approval (idempotent).

        Raises:
            UnknownPolicyObjectError: no such approval.
            StorageError: the database failed.
        """
        with self._db.write("revoke approval", uow) as conn:
            n = conn.execute(
                sa.update(approvals)
                .where(approvals.c.approval_id == approval_id)
                .values(revoked=True)
            ).rowcount
        # Not needed for correctness (lookups read ``revoked`` fresh), only to free the entry.
        self._approvals.pop(approval_id, None)
        if n == 0:
            raise UnknownPolicyObjectError(f"approval {approval_id!r} does not exist")

    def find_active_approvals(
        self, expected_pcr_sha256: bytes, *, files_pcr_sha256: bytes | None = None
    ) -> list[Approval]:
        """Unrevoked approvals whose expected sha256 PCR 23 value is this one, or whose files
        alone give ``files_pcr_sha256`` (approvals of the same files with another launch),
        oldest first.

        This is the attestation hot path: one index lookup for the ids; the approvals
        themselves come from a cache (their contents never change, only ``revoked``).

        Raises:
            StorageError: the database failed.
        """
        with self._db.fast.session("find approvals") as cur:
            ids = cur.all(
                self._find_active_approval_ids,
                # A value no approval has stands for "no files value": the statement is prepared
                # once, with both parameters.
                {"pcr": expected_pcr_sha256, "files_pcr": files_pcr_sha256 or b""},
            )
            out: list[Approval] = []
            for (approval_id,) in ids:
                approval = self._approvals.get(approval_id)
                if approval is None:
                    row = cur.one(self._get_approval, {"approval_id": approval_id})
                    if row is None or row.revoked:
                        # Revoked between the two statements: it is not active.
                        continue
                    approval = codec.approval(row)
                    if len(self._approvals) < _MAX_CACHED_APPROVALS:
                        self._approvals[approval_id] = approval
                out.append(approval)
        return out

    def still_active(
        self, uow: UnitOfWork, *, ak_name: str, approval_ids: Sequence[str]
    ) -> tuple[bool, frozenset[str]]:
        """Inside a release's unit of work: whether the AK and its EK (if it has one) are still
        unrevoked, and which of ``approval_ids`` still are (one statement).

        On SQLite the unit holds the write lock, so this sees every revocation that committed
        before and none can commit until the unit has. On PostgreSQL it locks the rows it finds
        active (``FOR SHARE``): a revocation in progress is waited for and seen, a later one
        waits for the release, and the records of whichever commits second are numbered after
        the other's (units number their records as they finish). Either way the release and
        the revocations are ordered in the chain as they happened.

        Raises:
            sqlite3.Error, psycopg.Error: the driver's error (the unit maps it).
        """
        ids: Any = (
            list(approval_ids)
            if self._db.dialect == "postgresql"
            else codec.dumps(list(approval_ids))
        )
        rows = uow.cursor.all(self._still_active, {"ak": ak_name, "ids": ids})
        ak_ok = any(r.kind == "ak" for r in rows)
        return ak_ok, frozenset(r.id for r in rows if r.kind == "approval")
