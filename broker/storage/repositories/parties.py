"""Parties and their wrapped data keys."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from broker.errors import DuplicateError, UnknownPolicyObjectError
from broker.model import DataKeyRecord, Party
from broker.storage import rows as codec
from broker.storage.engine import Database
from broker.storage.schema import data_keys, parties
from broker.storage.unit import UnitOfWork


class PartyRepository:
    """Parties and data keys."""

    def __init__(self, db: Database) -> None:
        self._db = db
        fast = db.fast
        self._get_party = fast.prepare(
            sa.select(parties).where(parties.c.name == sa.bindparam("name"))
        )
        self._get_data_key = fast.prepare(
            sa.select(data_keys).where(data_keys.c.key_id == sa.bindparam("key_id"))
        )

    def add_party(self, party: Party, *, uow: UnitOfWork | None = None) -> None:
        """Registers a party.

        Raises:
            DuplicateError: a party of this name exists.
            StorageError: the database failed.
        """
        with self._db.write(
            "add party", uow, duplicate=DuplicateError(f"party {party.name!r} exists")
        ) as conn:
            conn.execute(sa.insert(parties).values(codec.values(party)))

    def get_party(self, name: str) -> Party:
        """The party of this name.

        Raises:
            UnknownPolicyObjectError: no such party.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get party",
            self._get_party,
            {"name": name},
            UnknownPolicyObjectError(f"party {name!r} does not exist"),
        )
        return codec.party(row)

    def list_parties(self) -> list[Party]:
        """Every party, by name.

        Raises:
            StorageError: the database failed.
        """
        return self._db.select_all(
            "list parties", sa.select(parties).order_by(parties.c.name), codec.party
        )

    def add_data_key(self, record: DataKeyRecord, *, uow: UnitOfWork | None = None) -> None:
        """Stores a party's wrapped data key.

        Raises:
            DuplicateError: a key with this id exists.
            UnknownPolicyObjectError: the owner is not a registered party.
            StorageError: the database failed.
        """
        with self._db.write(
            "add data key",
            uow,
            duplicate=DuplicateError(f"data key {record.key_id!r} exists"),
            missing_reference=UnknownPolicyObjectError(f"party {record.owner!r} does not exist"),
        ) as conn:
            conn.execute(sa.insert(data_keys).values(codec.values(record)))

    def get_data_key(self, key_id: str) -> DataKeyRecord:
        """The data key with this id (still wrapped).

        Raises:
            UnknownPolicyObjectError: no such key.
            StorageError: the database failed.
        """
        row = self._db.fetch_one(
            "get data key",
            self._get_data_key,
            {"key_id": key_id},
            UnknownPolicyObjectError(f"data key {key_id!r} does not exist"),
        )
        return codec.data_key(row)

    def get_data_keys(self, key_ids: Sequence[str]) -> list[DataKeyRecord]:
        """Several data keys in one statement, in the order asked.

        Raises:
            UnknownPolicyObjectError: one of them does not exist.
            StorageError: the database failed.
        """
        if not key_ids:
            return []
        with self._db.transaction("get data keys") as conn:
            rows = conn.execute(
                sa.select(data_keys).where(data_keys.c.key_id.in_(set(key_ids)))
            ).all()
        found = {r.key_id: codec.data_key(r) for r in rows}
        for key_id in key_ids:
            if key_id not in found:
                raise UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
        return [found[k] for k in key_ids]

    def list_data_keys(self, owner: str | None = None) -> list[DataKeyRecord]:
        """Every data key (or one owner's), by id.

        Raises:
            StorageError: the database failed.
        """
        stmt = sa.select(data_keys).order_by(data_keys.c.key_id)
        if owner is not None:
            stmt = stmt.where(data_keys.c.owner == owner)
        return self._db.select_all("list data keys", stmt, codec.data_key)

    def rewrap_data_key(
        self, key_id: str, wrapped_key: bytes, kek_ref: str, *, uow: UnitOfWork | None = None
    ) -> None:
        """Replaces a key's wrapping (KEK rotation): the same data key under another KEK.

        Raises:
            UnknownPolicyObjectError: no such key.
            StorageError: the database failed.
        """
        with self._db.write("rewrap data key", uow) as conn:
            n = conn.execute(
                sa.update(data_keys)
                .where(data_keys.c.key_id == key_id)
                .values(wrapped_key=wrapped_key, kek_ref=kek_ref)
            ).rowcount
        if n == 0:
            raise UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
