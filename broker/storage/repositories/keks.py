"""The KEK fingerprints ``cleanroom broker init`` records and the KEK each party imported."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from broker.errors import UnknownPolicyObjectError
from broker.model import PartyKek
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.schema import kek_fingerprints, party_keks
from broker.storage.unit import UnitOfWork


class KekRepository:
    """KEK fingerprints and party KEKs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def kek_fingerprints(self) -> dict[str, str]:
        """The fingerprint recorded for each KEK ref (see ``cleanroom broker init``).

        Raises:
            StorageError: the database failed.
        """
        with self._db.transaction("read KEK fingerprints") as conn:
            rows = conn.execute(sa.select(kek_fingerprints)).all()
        return {r.kek_ref: r.fingerprint for r in rows}

    def record_kek_fingerprint(
        self, kek_ref: str, fingerprint: str, *, at: datetime, uow: UnitOfWork | None = None
    ) -> str:
        """Records ``fingerprint`` for ``kek_ref`` unless one is recorded already; returns the
        fingerprint recorded (the earlier one, when there was one: the caller compares).

        Raises:
            StorageError: the database failed.
        """
        t = kek_fingerprints
        with self._db.write("record KEK fingerprint", uow) as conn:
            found = conn.execute(sa.select(t.c.fingerprint).where(t.c.kek_ref == kek_ref)).first()
            if found is not None:
                return str(found.fingerprint)
            conn.execute(
                sa.insert(t).values(kek_ref=kek_ref, fingerprint=fingerprint, recorded_at=at)
            )
        return fingerprint

    def replace_kek_fingerprint(
        self, kek_ref: str, fingerprint: str, *, at: datetime, uow: UnitOfWork | None = None
    ) -> None:
        """Replaces the fingerprint recorded for ``kek_ref`` (a rotation of that KEK: the one
        change of a recorded fingerprint, which :meth:`record_kek_fingerprint` never makes).

        Raises:
            StorageError: the database failed.
        """
        t = kek_fingerprints
        with self._db.write("replace KEK fingerprint", uow) as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.kek_ref == kek_ref)
                .values(fingerprint=fingerprint, recorded_at=at)
            )

    def set_party_kek(
        self,
        party: str,
        kek_ref: str,
        *,
        checked_key: str,
        updated_at: datetime,
        uow: UnitOfWork | None = None,
    ) -> None:
        """Records (or replaces) the KEK that wraps ``party``'s new data keys.

        ``checked_key`` is what the broker's check of the KEK found (the versioned Key Vault key
        id); it is kept for the operator's reference only.

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        values = {
            "party": party,
            "kek_ref": kek_ref,
            "checked_key": checked_key,
            "updated_at": updated_at,
        }
        with self._db.write(
            "set party KEK",
            uow,
            missing_reference=UnknownPolicyObjectError(f"party {party!r} does not exist"),
        ) as conn:
            conn.execute(self._db.upsert(party_keks, values, ["party"]))

    def get_party_kek(self, party: str) -> PartyKek | None:
        """The KEK recorded for ``party``, or None when none was.

        Raises:
            StorageError: the database failed.
        """
        with self._db.transaction("get party KEK") as conn:
            row = conn.execute(sa.select(party_keks).where(party_keks.c.party == party)).first()
        return codec.party_kek(row) if row is not None else None

    def list_party_keks(self) -> list[PartyKek]:
        """Every recorded party KEK, by party.

        Raises:
            StorageError: the database failed.
        """
        return self._db.select_all(
            "list party KEKs", sa.select(party_keks).order_by(party_keks.c.party), codec.party_kek
        )
