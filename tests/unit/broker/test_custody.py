"""Key custody: the local KEK file and wrap format, the KEK registry, registration sealing."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.custody import KekRegistry, LocalKek, load_or_create_registration_key, plain_data_key
from broker.errors import CustodyError, KekError
from broker.keyseal import (
    DATA_KEY_SIZE,
    open_registered_key,
    registration_info,
    seal_for_registration,
)
from broker.model import DataKeyRecord
from sealing.hpke import seal
from sealing.keys import KEM_MLKEM768_X25519, KEM_X25519, generate_recipient_key
from tests.support.kek import RefKek

DATA_KEY = bytes(range(32))


@pytest.fixture
def kek(tmp_path: Path) -> Iterator[LocalKek]:
    with LocalKek.open(tmp_path / "state" / "kek.key") as k:
        yield k


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- LocalKek -------------------------------------------------------------------------------


def test_local_kek_round_trip(kek: LocalKek) -> None:
    wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    assert DATA_KEY not in wrapped
    assert kek.unwrap(wrapped, key_id="k1", owner="alice") == DATA_KEY
    assert kek.ref == "local"


def test_wrapped_format_is_versioned_with_a_fresh_nonce(kek: LocalKek) -> None:
    first = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    second = kek.wrap(bytearray(DATA_KEY), key_id="k1", owner="alice")
    # version || 12-byte nonce || 32-byte ciphertext || 16-byte tag
    assert len(first) == 1 + 12 + 32 + 16
    assert first[0] == 1
    assert first[1:13] != second[1:13]


def test_key_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "kek.key"
    old = os.umask(0)  # a permissive umask must not widen the key file
    try:
        LocalKek.open(path).close()
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert path.stat().st_size == 32
    # No temporary file is left behind.
    assert [p.name for p in path.parent.iterdir()] == ["kek.key"]


def test_reopened_kek_unwraps_what_the_first_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    with LocalKek.open(path) as first:
        wrapped = first.wrap(DATA_KEY, key_id="k1", owner="alice")
    with LocalKek.open(path, create=False) as second:
        assert second.unwrap(wrapped, key_id="k1", owner="alice") == DATA_KEY


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    keks: list[LocalKek] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        try:
            keks.append(LocalKek.open(path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    wrapped = keks[0].wrap(DATA_KEY, key_id="k1", owner="alice")
    for k in keks:
        assert k.unwrap(wrapped, key_id="k1", owner="alice") == DATA_KEY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek.key"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(KekError, match=f"has mode {mode:04o}.*chmod 600"):
        LocalKek.open(path)
    # The refusal does not "fix" the file behind the operator's back.
    assert mode_of(path) == mode


def test_missing_key_file_is_not_created_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="does not exist"):
        LocalKek.open(tmp_path / "kek.key", create=False)
    assert not (tmp_path / "kek.key").exists()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "kek.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"\x01" * size)
    os.close(fd)
    with pytest.raises(KekError, match="exactly 32 bytes"):
        LocalKek.open(path)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    LocalKek.open(target).close()
    link = tmp_path / "kek.key"
    link.symlink_to(target)
    with pytest.raises(KekError):
        LocalKek.open(link)


def test_directory_as_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kek.key").mkdir(mode=0o700)
    with pytest.raises(KekError):
        LocalKek.open(tmp_path / "kek.key")


@pytest.mark.parametrize(
    ("key_id", "owner"), [("k2", "alice"), ("k1", "bob"), ("k1alice", ""), ("k", "1alice")]
)
def test_wrapped_key_moved_to_another_record_does_not_unwrap(
    kek: LocalKek, key_id: str, owner: str
) -> None:
    wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    with pytest.raises(KekError) as info:
        kek.unwrap(wrapped, key_id=key_id, owner=owner)
    assert DATA_KEY.hex() not in str(info.value)


@pytest.mark.parametrize("position", [0, 1, 12, 13, 40, 60])
def test_tampered_wrapped_key_does_not_unwrap(kek: LocalKek, position: int) -> None:
    wrapped = bytearray(kek.wrap(DATA_KEY, key_id="k1", owner="alice"))
    wrapped[position] ^= 0x01
    with pytest.raises(KekError):
        kek.unwrap(bytes(wrapped), key_id="k1", owner="alice")


def test_truncated_or_extended_wrapped_key_does_not_unwrap(kek: LocalKek) -> None:
    wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    for bad in (wrapped[:-1], wrapped + b"\x00", b""):
        with pytest.raises(KekError, match="expected 61"):
            kek.unwrap(bad, key_id="k1", owner="alice")


def test_another_kek_does_not_unwrap(kek: LocalKek, tmp_path: Path) -> None:
    wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    with LocalKek.open(tmp_path / "other.key") as other, pytest.raises(KekError):
        other.unwrap(wrapped, key_id="k1", owner="alice")


def test_only_32_byte_data_keys_are_wrapped(kek: LocalKek) -> None:
    with pytest.raises(CustodyError, match="must be 32 bytes, got 16"):
        kek.wrap(bytes(16), key_id="k1", owner="alice")
    with pytest.raises(CustodyError, match="empty field"):
        kek.wrap(DATA_KEY, key_id="", owner="alice")


def test_closed_kek_refuses_to_work(tmp_path: Path) -> None:
    kek = LocalKek.open(tmp_path / "kek.key")
    wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
    kek.close()
    with pytest.raises(KekError, match="closed"):
        kek.unwrap(wrapped, key_id="k1", owner="alice")


# --- registry -------------------------------------------------------------------------------


def test_registry_resolves_local_and_provider_refs(tmp_path: Path) -> None:
    built: list[str] = []

    def factory(ref: str) -> RefKek:
        built.append(ref)
        return RefKek(ref, tmp_path / f"{len(built)}.key")

    with KekRegistry.open_local(tmp_path / "state") as registry:
        registry.add_provider("azurekv:", factory)
        assert registry.default.ref == "local"
        assert registry.get("local") is registry.default
        ref = "azurekv:https://vault.example/keys/kek/1"
        kek = registry.get(ref)
        assert kek.ref == ref
        assert registry.get(ref) is kek  # cached: the provider builds each ref once
        assert built == [ref]
        wrapped = kek.wrap(DATA_KEY, key_id="k1", owner="alice")
        assert registry.get(ref).unwrap(wrapped, key_id="k1", owner="alice") == DATA_KEY
        with pytest.raises(KekError, match="no KEK is configured for ref 'hsm:1'"):
            registry.get("hsm:1")
    assert mode_of(tmp_path / "state" / "kek.key") == 0o600


def test_registry_default_ref_is_configurable(tmp_path: Path) -> None:
    registry = KekRegistry(
        default_ref="azurekv:k",
        providers={"azurekv:": lambda ref: RefKek(ref, tmp_path / "a.key")},
    )
    assert registry.default.ref == "azurekv:k"
    with pytest.raises(KekError, match="no KEK is configured"):
        KekRegistry(default_ref="local").default  # noqa: B018


def test_registry_wraps_provider_failures(tmp_path: Path) -> None:
    def broken(ref: str) -> RefKek:
        raise RuntimeError("vault unreachable")

    registry = KekRegistry(providers={"azurekv:": broken})
    with pytest.raises(KekError, match="provider for 'azurekv:x' failed: vault unreachable"):
        registry.get("azurekv:x")


def test_registry_refuses_duplicates(tmp_path: Path) -> None:
    with KekRegistry.open_local(tmp_path) as registry:
        with pytest.raises(KekError, match="already registered"):
            registry.add(LocalKek.open(tmp_path / "other.key"))
        registry.add_provider("azurekv:", lambda ref: RefKek(ref, tmp_path / "a.key"))
        with pytest.raises(KekError, match="already registered"):
            registry.add_provider("azurekv:", lambda ref: RefKek(ref, tmp_path / "b.key"))


def test_registry_close_drops_local_keys(tmp_path: Path) -> None:
    registry = KekRegistry.open_local(tmp_path)
    kek = registry.default
    registry.close()
    with pytest.raises(KekError, match="closed"):
        kek.wrap(DATA_KEY, key_id="k1", owner="alice")


def test_plain_data_key_is_zeroed_after_use(kek: LocalKek) -> None:
    record = DataKeyRecord(
        key_id="k1",
        owner="alice",
        wrapped_key=kek.wrap(DATA_KEY, key_id="k1", owner="alice"),
        kek_ref="local",
        created_at=datetime.now(UTC),
    )
    with plain_data_key(kek, record) as key:
        assert key == DATA_KEY
        held = key
    assert held == bytearray(DATA_KEY_SIZE)
    with pytest.raises(KekError, match="wrapped by 'azurekv:x'"):
        with plain_data_key(kek, DataKeyRecord("k1", "alice", b"", "azurekv:x", record.created_at)):
            pass


# --- registration ---------------------------------------------------------------------------


@pytest.mark.parametrize("kem", [KEM_X25519, KEM_MLKEM768_X25519])
def test_registration_round_trip(tmp_path: Path, kem: int) -> None:
    path = tmp_path / "state" / "registration.key"
    with load_or_create_registration_key(path, kem=kem) as broker_key:
        assert broker_key.kem == kem
        sealed = seal_for_registration(
            broker_key.public_key(), bytearray(DATA_KEY), key_id="k1", owner="alice"
        )
        assert open_registered_key(broker_key, sealed, key_id="k1", owner="alice") == DATA_KEY
    assert mode_of(path) == 0o600
    # The same key is loaded on the next start, whatever KEM is asked for then.
    with load_or_create_registration_key(path, kem=KEM_X25519) as again:
        assert again.public_key() == broker_key.public_key()
        assert open_registered_key(again, sealed, key_id="k1", owner="alice") == DATA_KEY


@pytest.mark.parametrize(("key_id", "owner"), [("k2", "alice"), ("k1", "bob")])
def test_registered_key_for_another_id_or_owner_does_not_open(
    tmp_path: Path, key_id: str, owner: str
) -> None:
    broker_key = load_or_create_registration_key(tmp_path / "registration.key")
    sealed = seal_for_registration(broker_key.public_key(), DATA_KEY, key_id="k1", owner="alice")
    with pytest.raises(CustodyError, match="does not open") as info:
        open_registered_key(broker_key, sealed, key_id=key_id, owner=owner)
    assert DATA_KEY.hex() not in str(info.value)


def test_registered_key_sealed_to_another_broker_does_not_open(tmp_path: Path) -> None:
    broker_key = load_or_create_registration_key(tmp_path / "registration.key")
    other = generate_recipient_key()
    sealed = seal_for_registration(other.public_key(), DATA_KEY, key_id="k1", owner="alice")
    with pytest.raises(CustodyError, match="does not open"):
        open_registered_key(broker_key, sealed, key_id="k1", owner="alice")


@pytest.mark.parametrize("size", [16, 31, 33, 64])
def test_registered_key_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    broker_key = load_or_create_registration_key(tmp_path / "registration.key")
    # A party tool that skips the size check: seal directly with the right info.
    sealed = seal(broker_key.public_key(), bytes(size), info=registration_info("k1", "alice"))
    with pytest.raises(CustodyError, match=f"must be 32 bytes, got {size}"):
        open_registered_key(broker_key, sealed, key_id="k1", owner="alice")
    with pytest.raises(CustodyError, match="must be 32 bytes"):
        seal_for_registration(broker_key.public_key(), bytes(size), key_id="k1", owner="alice")


def test_registration_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registration.key"
    load_or_create_registration_key(path).close()
    path.chmod(0o644)
    with pytest.raises(CustodyError, match="mode 0644"):
        load_or_create_registration_key(path)


def test_registration_key_is_not_created_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(CustodyError, match="does not exist"):
        load_or_create_registration_key(tmp_path / "registration.key", create=False)


def test_registration_info_is_unambiguous() -> None:
    assert registration_info("k1", "alice") == (
        b"cleanroom/v1 register-data-key\x00\x00\x00\x00\x02k1\x00\x00\x00\x05alice"
    )
    assert registration_info("ab", "c") != registration_info("a", "bc")
    with pytest.raises(CustodyError):
        registration_info("", "alice")
