"""Release sealing: data keys sealed to the sidecar's ephemeral key, bound to session and key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.custody import KekRegistry
from broker.errors import CustodyError, KekError
from broker.keyseal import open_release, registration_info, release_info, seal_release
from broker.model import DataKeyRecord
from broker.release import seal_records
from sealing.hpke import seal
from sealing.keys import KEM_MLKEM768_X25519, KEM_X25519, generate_recipient_key

DATA_KEY = bytes(range(100, 132))
KEMS = [KEM_X25519, KEM_MLKEM768_X25519]


@pytest.mark.parametrize("kem", KEMS)
def test_release_round_trip(kem: int) -> None:
    with generate_recipient_key(kem) as ephemeral:
        sealed = seal_release(
            ephemeral.public_key(), DATA_KEY, session_id="s1", key_id="k1", owner="alice"
        )
        assert DATA_KEY not in sealed
        opened = open_release(ephemeral, sealed, session_id="s1", key_id="k1", owner="alice")
    assert opened == DATA_KEY


@pytest.mark.parametrize("kem", KEMS)
@pytest.mark.parametrize(
    ("session_id", "key_id", "owner"),
    [("s2", "k1", "alice"), ("s1", "k2", "alice"), ("s1", "k1", "bob"), ("s1k1", "", "alice")],
)
def test_release_for_another_session_key_or_owner_does_not_open(
    kem: int, session_id: str, key_id: str, owner: str
) -> None:
    ephemeral = generate_recipient_key(kem)
    sealed = seal_release(
        ephemeral.public_key(), DATA_KEY, session_id="s1", key_id="k1", owner="alice"
    )
    with pytest.raises(CustodyError) as info:
        open_release(ephemeral, sealed, session_id=session_id, key_id=key_id, owner=owner)
    assert DATA_KEY.hex() not in str(info.value)


@pytest.mark.parametrize("kem", KEMS)
def test_release_to_another_ephemeral_key_does_not_open(kem: int) -> None:
    sealed = seal_release(
        generate_recipient_key(kem).public_key(),
        DATA_KEY,
        session_id="s1",
        key_id="k1",
        owner="alice",
    )
    with pytest.raises(CustodyError, match="does not open"):
        open_release(
            generate_recipient_key(kem), sealed, session_id="s1", key_id="k1", owner="alice"
        )


def test_tampered_release_does_not_open() -> None:
    ephemeral = generate_recipient_key()
    sealed = bytearray(
        seal_release(ephemeral.public_key(), DATA_KEY, session_id="s1", key_id="k1", owner="a")
    )
    sealed[-1] ^= 0x80
    with pytest.raises(CustodyError):
        open_release(ephemeral, bytes(sealed), session_id="s1", key_id="k1", owner="a")


def test_registration_seal_is_not_a_release() -> None:
    # Domain separation: a registration message for the same names never opens as a release.
    ephemeral = generate_recipient_key()
    sealed = seal(ephemeral.public_key(), DATA_KEY, info=registration_info("k1", "alice"))
    with pytest.raises(CustodyError):
        open_release(ephemeral, sealed, session_id="s1", key_id="k1", owner="alice")


def test_release_info_layout() -> None:
    assert release_info(session_id="s1", key_id="k1", owner="alice") == (
        b"cleanroom/v1 release\x00\x00\x00\x00\x02s1\x00\x00\x00\x02k1\x00\x00\x00\x05alice"
    )
    with pytest.raises(CustodyError, match="empty field"):
        release_info(session_id="", key_id="k1", owner="alice")


def test_only_32_byte_keys_are_released_or_accepted() -> None:
    ephemeral = generate_recipient_key()
    with pytest.raises(CustodyError, match="must be 32 bytes, got 31"):
        seal_release(ephemeral.public_key(), bytes(31), session_id="s", key_id="k", owner="o")
    short = seal(
        ephemeral.public_key(), bytes(16), info=release_info(session_id="s", key_id="k", owner="o")
    )
    with pytest.raises(CustodyError, match="must be 32 bytes, got 16"):
        open_release(ephemeral, short, session_id="s", key_id="k", owner="o")


@pytest.mark.parametrize("kem", KEMS)
def test_seal_records_unwraps_and_seals_each_granted_key(tmp_path: Path, kem: int) -> None:
    now = datetime.now(UTC)
    keys = {"alice-k1": DATA_KEY, "bob-k1": bytes(range(32))}
    owners = {"alice-k1": "alice", "bob-k1": "bob"}
    with KekRegistry.open_local(tmp_path) as registry:
        records = [
            DataKeyRecord(
                key_id=key_id,
                owner=owners[key_id],
                wrapped_key=registry.default.wrap(key, key_id=key_id, owner=owners[key_id]),
                kek_ref="local",
                created_at=now,
            )
            for key_id, key in keys.items()
        ]
        ephemeral = generate_recipient_key(kem)
        sealed = seal_records(registry, records, ephemeral.public_key(), session_id="s1")
    assert [(s.key_id, s.owner) for s in sealed] == [("alice-k1", "alice"), ("bob-k1", "bob")]
    for s in sealed:
        opened = open_release(ephemeral, s.sealed, session_id="s1", key_id=s.key_id, owner=s.owner)
        assert opened == keys[s.key_id]


def test_seal_records_refuses_a_key_moved_to_another_owner(tmp_path: Path) -> None:
    with KekRegistry.open_local(tmp_path) as registry:
        wrapped = registry.default.wrap(DATA_KEY, key_id="k1", owner="alice")
        moved = DataKeyRecord("k1", "mallory", wrapped, "local", datetime.now(UTC))
        with pytest.raises(KekError):
            seal_records(registry, [moved], generate_recipient_key().public_key(), session_id="s")
        unknown = DataKeyRecord("k1", "alice", wrapped, "azurekv:x", datetime.now(UTC))
        with pytest.raises(KekError, match="no KEK is configured"):
            seal_records(registry, [unknown], generate_recipient_key().public_key(), session_id="s")
