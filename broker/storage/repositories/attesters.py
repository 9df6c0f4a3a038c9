"""Endorsement keys, attestation keys and the credential challenges that enroll them."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import sqlalchemy as sa

from broker.errors import (
    BrokerError,
    CredentialError,
    DuplicateError,
    RevokedKeyError,
    UnknownKeyError,
)
from broker.model import AkRecord, CredentialChallenge, EkRecord
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.schema import aks, credential_challenges, eks
from broker.storage.unit import UnitOfWork


class AttesterRepository:
    """EKs, AKs and credential challenges."""

    def __init__(self, db: Database) -> None:
        self._db = db
        fast = db.fast
        self._get_ek = fast.prepare(sa.select(eks).where(eks.c.ek_id == sa.bindparam("ek_id")))
        self._get_ak = fast.prepare(sa.select(aks).where(aks.c.ak_name == sa.bindparam("ak_name")))
        # The AK and its EK in one round trip (LEFT JOIN: an operator's AK may have no EK).
        self._get_attester = fast.prepare(
            sa.select(
                aks,
                *(c.label(f"ek_{c.name}") for c in eks.c),
            )
            .select_from(aks.outerjoin(eks, aks.c.ek_id == eks.c.ek_id))
            .where(aks.c.ak_name == sa.bindparam("ak_name"))
        )

    def add_ek(self, record: EkRecord, *, uow: UnitOfWork | None = None) -> None:
        """Enrolls an EK.

        Raises:
            DuplicateError: an EK with this id is already enrolled.
            StorageError: the database failed.
        """
        with self._db.write(
            "add EK", uow, duplicate=DuplicateError(f"EK {record.ek_id} is already enrolled")
        ) as conn:
            conn.execute(sa.insert(eks).values(codec.values(record)))

    def get_ek(self, ek_id: str) -> EkRecord:
        """The EK with this id (revoked or not).

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get EK", self._get_ek, {"ek_id": ek_id}, UnknownKeyError(f"EK {ek_id} is not enrolled")
        )
        return codec.ek(row)

    def list_eks(self) -> list[EkRecord]:
        """Every EK, by id.

        Raises:
            StorageError: the database failed.
        """
        return self._db.select_all("list EKs", sa.select(eks).order_by(eks.c.ek_id), codec.ek)

    def revoke_ek(self, ek_id: str, reason: str, *, uow: UnitOfWork | None = None) -> None:
        """Revokes an EK and every AK enrolled under it, in one transaction.

        ``ek_id`` is the canonical identity (``broker.tpmkeys.ek_identity``), so the revocation
        reaches every encoding of the key. Already revoked keys keep their first reason. The AKs
        get the reason ``"EK revoked: <reason>"``.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with self._db.write("revoke EK", uow) as conn:
            # The row lock makes a concurrent add_ak under this EK (which takes a share lock
            # on it) finish first, so that the AK update below sees its AK.
            found = conn.execute(
                sa.select(eks.c.ek_id).where(eks.c.ek_id == ek_id).with_for_update()
            ).one_or_none()
            if found is not None:
                conn.execute(
                    sa.update(eks)
                    .where(eks.c.ek_id == ek_id, eks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=reason)
                )
                conn.execute(
                    sa.update(aks)
                    .where(aks.c.ek_id == ek_id, aks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=f"EK revoked: {reason}")
                )
        if found is None:
            raise UnknownKeyError(f"EK {ek_id} is not enrolled")

    def add_ak(self, record: AkRecord, *, uow: UnitOfWork | None = None) -> None:
        """Enrolls an AK, under an EK or (``ek_id`` None) directly by the operator.

        Raises:
            DuplicateError: an AK with this name is already enrolled.
            UnknownKeyError: its EK is not enrolled.
            RevokedKeyError: its EK is revoked.
            StorageError: the database failed.
        """
        with self._db.write(
            "add AK",
            uow,
            duplicate=DuplicateError(f"AK {record.ak_name} is already enrolled"),
            missing_reference=UnknownKeyError(f"EK {record.ek_id} is not enrolled"),
        ) as conn:
            problem: BrokerError | None = None
            if record.ek_id is not None:
                # A share lock: revoke_ek cannot slip in between this check and the insert.
                ek_revoked = conn.execute(
                    sa.select(eks.c.revoked)
                    .where(eks.c.ek_id == record.ek_id)
                    .with_for_update(read=True)
                ).scalar_one_or_none()
                if ek_revoked is None:
                    problem = UnknownKeyError(f"EK {record.ek_id} is not enrolled")
                elif ek_revoked:
                    problem = RevokedKeyError(f"EK {record.ek_id} is revoked")
            if problem is None:
                conn.execute(sa.insert(aks).values(codec.values(record)))
        if problem is not None:
            raise problem

    def get_ak(self, ak_name: str) -> AkRecord:
        """The AK with this name (revoked or not: callers check ``revoked``).

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get AK",
            self._get_ak,
            {"ak_name": ak_name},
            UnknownKeyError(f"AK {ak_name} is not enrolled"),
        )
        return codec.ak(row)

    def list_aks(self) -> list[AkRecord]:
        """Every AK, by name.

        Raises:
            StorageError: the database failed.
        """
        return self._db.select_all("list AKs", sa.select(aks).order_by(aks.c.ak_name), codec.ak)

    def revoke_ak(self, ak_name: str, reason: str, *, uow: UnitOfWork | None = None) -> str | None:
        """Revokes an AK (an already revoked one keeps its first reason) and, in the same
        transaction, keeps its EK out: the EK is marked revoked with the reason
        ``"AK <name> revoked: <reason>"`` (unless it is revoked already), so that the TPM enrolls
        no other AK until the operator re-admits the EK (:meth:`readmit_ek`).

        Returns the id of the EK it kept out, or None (no EK, or the EK was revoked already).

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        with self._db.write("revoke AK", uow) as conn:
            row = conn.execute(sa.select(aks.c.ek_id).where(aks.c.ak_name == ak_name)).one_or_none()
            blocked: str | None = None
            if row is not None:
                conn.execute(
                    sa.update(aks)
                    .where(aks.c.ak_name == ak_name, aks.c.revoked.is_(False))
                    .values(revoked=True, revoked_reason=reason)
                )
                if row.ek_id is not None:
                    updated = conn.execute(
                        sa.update(eks)
                        .where(eks.c.ek_id == row.ek_id, eks.c.revoked.is_(False))
                        .values(revoked=True, revoked_reason=f"AK {ak_name} revoked: {reason}")
                    ).rowcount
                    blocked = row.ek_id if updated else None
        if row is None:
            raise UnknownKeyError(f"AK {ak_name} is not enrolled")
        return blocked

    def readmit_ek(self, ek_id: str, *, uow: UnitOfWork | None = None) -> str | None:
        """Lifts an EK's revocation (by ``ek revoke`` or by the revocation of one of its AKs), so
        that its TPM may enroll AKs again. AKs revoked before stay revoked.

        Returns the reason of the revocation it lifted, or None when the EK was not revoked.

        Raises:
            UnknownKeyError: no such EK.
            StorageError: the database failed.
        """
        with self._db.write("re-admit EK", uow) as conn:
            row = conn.execute(
                sa.select(eks.c.revoked, eks.c.revoked_reason)
                .where(eks.c.ek_id == ek_id)
                .with_for_update()
            ).one_or_none()
            if row is not None and row.revoked:
                conn.execute(
                    sa.update(eks)
                    .where(eks.c.ek_id == ek_id)
                    .values(revoked=False, revoked_reason="")
                )
        if row is None:
            raise UnknownKeyError(f"EK {ek_id} is not enrolled")
        return str(row.revoked_reason or "revoked") if row.revoked else None

    def get_attester(self, ak_name: str) -> tuple[AkRecord, EkRecord | None]:
        """The AK with this name and the EK it is bound to (None for an AK without one), read in
        one statement: the challenge and attestation paths check both for revocation.

        Raises:
            UnknownKeyError: no such AK.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get AK",
            self._get_attester,
            {"ak_name": ak_name},
            UnknownKeyError(f"AK {ak_name} is not enrolled"),
        )
        ak = codec.ak(row)
        if row.ek_ek_id is None:
            return ak, None
        return ak, codec.ek(row, prefix="ek_")

    def add_activated_ak(
        self, ek: EkRecord, ak: AkRecord, *, uow: UnitOfWork | None = None
    ) -> bool:
        """Enrolls an AK whose credential activation under ``ek`` succeeded, enrolling the EK in
        the same transaction when it is not enrolled yet: an EK is recorded only together with
        the first AK proven to live beside it.

        Returns whether the EK was enrolled now.

        Raises:
            RevokedKeyError: the EK is revoked (or kept out after an AK revocation).
            DuplicateError: an AK with this name is already enrolled.
            StorageError: the database failed.
        """
        with self._db.write(
            "add activated AK",
            uow,
            duplicate=DuplicateError(f"AK {ak.ak_name} is already enrolled"),
        ) as conn:
            # An update lock (PostgreSQL) so that revoke_ek and readmit_ek wait for this
            # enrollment or this enrollment for them; SQLite's write lock already serializes.
            revoked = conn.execute(
                sa.select(eks.c.revoked).where(eks.c.ek_id == ek.ek_id).with_for_update()
            ).scalar_one_or_none()
            created = revoked is None
            if created:
                conn.execute(
                    sa.insert(eks).values(
                        codec.values(replace(ek, revoked=False, revoked_reason=""))
                    )
                )
            if not revoked:
                conn.execute(
                    sa.insert(aks).values(
                        codec.values(replace(ak, ek_id=ek.ek_id, revoked=False, revoked_reason=""))
                    )
                )
        if revoked:
            raise RevokedKeyError(f"EK {ek.ek_id} is revoked")
        return created

    def put_credential_challenge(
        self, challenge: CredentialChallenge, *, uow: UnitOfWork | None = None
    ) -> None:
        """Stores a challenge, replacing any outstanding one for the same AK (one per AK).

        Raises:
            DuplicateError: another AK's challenge has this enrollment id.
            StorageError: the database failed.
        """
        values = {
            "enrollment_id": challenge.enrollment_id,
            "ak_name": challenge.ak_name,
            "ak_public": challenge.ak_public,
            "ek_id": challenge.ek_id,
            "secret_digest": challenge.secret_digest,
            "expires_at": challenge.expires_at,
            "ek_public": challenge.ek_public,
            "ek_certificate": challenge.ek_certificate,
            "ek_basis": challenge.ek_basis,
            "requester": challenge.requester,
        }
        with self._db.write(
            "put credential challenge",
            uow,
            duplicate=DuplicateError(f"enrollment id {challenge.enrollment_id} is in use"),
        ) as conn:
            # One statement, so that two replicas replacing the same AK's challenge at once
            # cannot both insert: the AK's unique index decides, the later write wins.
            stmt = self._db.upsert(credential_challenges, values, ["ak_name"])
            conn.execute(stmt)

    def take_credential_challenge(
        self,
        enrollment_id: str,
        now: datetime,
        requester: str,
        *,
        uow: UnitOfWork | None = None,
    ) -> CredentialChallenge:
        """Removes and returns the challenge that ``requester`` started, atomically (a second
        take finds nothing). A challenge that another identity started is left in place.

        Raises:
            CredentialError: no such challenge (never issued, replaced, or already taken), it
                belongs to another identity, or it expired (it is removed all the same).
            StorageError: the database failed.
        """
        t = credential_challenges
        with self._db.write("take credential challenge", uow) as conn:
            row = conn.execute(
                sa.delete(t)
                .where(t.c.enrollment_id == enrollment_id, t.c.requester == requester)
                .returning(*t.c)
            ).one_or_none()
            owner = (
                conn.execute(
                    sa.select(t.c.requester).where(t.c.enrollment_id == enrollment_id)
                ).scalar_one_or_none()
                if row is None
                else None
            )
        if owner is not None:
            raise CredentialError(
                f"the credential challenge was issued to {owner}, not to {requester}"
            )
        if row is None:
            raise CredentialError("unknown credential challenge (never issued, replaced or used)")
        challenge = codec.challenge(row)
        if now >= challenge.expires_at:
            raise CredentialError("the credential challenge expired")
        return challenge

    def purge_credential_challenges(self, now: datetime) -> int:
        """Deletes challenges expired at ``now``; returns how many.

        Raises:
            StorageError: the database failed.
        """
        t = credential_challenges
        with self._db.transaction("purge credential challenges", write=True) as conn:
            return conn.execute(sa.delete(t).where(t.c.expires_at <= now)).rowcount
