"""The Key Vault KEK provider with the real azure-keyvault-keys client against a local HTTPS
server that speaks Key Vault's REST calls (no Key Vault emulator exists; see
cleanroom/app/emulators/keyvault.py). Real Key Vault was not reachable from these tests."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core import Broker
from broker.custody import KekRegistry, plain_data_key
from broker.errors import KekError, KekUnavailableError
from broker.kek_azure import (
    KeyVaultConfig,
    KeyVaultKek,
    register_key_vault_provider,
)
from broker.keyseal import seal_for_registration
from broker.model import DataKeyRecord, Party
from broker.rotation import ROTATION_ACTION, rotate_data_key, rotate_kek
from cleanroom.app.emulators.keyvault import VAULT_SCOPE, FakeKeyVault, StaticTokenCredential
from pki.identity import SpiffeId
from sealing.keys import generate_recipient_key

OPERATOR = SpiffeId.operator("cleanroom.local")
ADVERTISER = SpiffeId.party("cleanroom.local", "advertiser")


def _kek(vault: FakeKeyVault, config: KeyVaultConfig, name: str = "broker-kek") -> KeyVaultKek:
    return KeyVaultKek(
        ref=f"azurekv:{vault.key_url(name)}", credential=vault.credential(), config=config
    )


@contextmanager
def _kek_and_a_wrap(
    vault: FakeKeyVault, config: KeyVaultConfig, fill: bytes
) -> Iterator[tuple[KeyVaultKek, bytes]]:
    """A fresh ``broker-kek`` in the vault, a provider for it, and ``fill * 32`` wrapped by it."""
    vault.create_key("broker-kek")
    with _kek(vault, config) as kek:
        yield kek, kek.wrap(fill * 32, key_id="k", owner="o")


def test_wrap_and_unwrap_with_the_real_sdk(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    kid = key_vault.create_key("broker-kek")
    credential = key_vault.credential()
    data_key = secrets.token_bytes(32)
    with KeyVaultKek(
        ref=f"azurekv:{key_vault.key_url('broker-kek')}",
        credential=credential,
        config=key_vault_config,
    ) as kek:
        wrapped = kek.wrap(data_key, key_id="adv-data", owner="advertiser")
        assert data_key not in wrapped
        assert kid.encode() in wrapped
        assert kek.unwrap(wrapped, key_id="adv-data", owner="advertiser") == data_key
    # The SDK went through Key Vault's challenge: a 401 first, then a token for the vault scope
    # with the tenant named in the challenge.
    assert key_vault.requests[0].status == 401 and not key_vault.requests[0].authorized
    assert credential.requests and all(s == (VAULT_SCOPE,) for s, _ in credential.requests)
    assert {t for _, t in credential.requests} == {"72f988bf-86f1-41af-91ab-2d7cd011db47"}
    # Key Vault unwrapped the record key (the wrap is verified once, then the real unwrap).
    assert len(key_vault.recorded(method="POST", suffix="/unwrapkey")) == 2


def test_the_key_id_and_owner_are_bound(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    key_vault.create_key("broker-kek")
    with _kek(key_vault, key_vault_config) as kek:
        wrapped = kek.wrap(secrets.token_bytes(32), key_id="adv-data", owner="advertiser")
        for key_id, owner in (("pub-data", "advertiser"), ("adv-data", "publisher")):
            with pytest.raises(KekError, match="another key id or owner"):
                kek.unwrap(wrapped, key_id=key_id, owner=owner)
        altered = bytearray(wrapped)
        altered[-1] ^= 1
        with pytest.raises(KekError, match="altered"):
            kek.unwrap(bytes(altered), key_id="adv-data", owner="advertiser")
        # A wrapped record key that Key Vault cannot unwrap (altered RSA ciphertext).
        rsa_part = bytearray(wrapped)
        rsa_part[len(wrapped) - 61] ^= 1
        with pytest.raises(KekError):
            kek.unwrap(bytes(rsa_part), key_id="adv-data", owner="advertiser")


def test_a_versionless_ref_follows_rotation_and_old_wraps_keep_their_version(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    v1 = key_vault.create_key("broker-kek")
    with _kek(key_vault, key_vault_config) as kek:
        old = kek.wrap(b"\x01" * 32, key_id="k", owner="o")
        v2 = key_vault.rotate_key("broker-kek")
        new = kek.wrap(b"\x02" * 32, key_id="k", owner="o")
        assert v1.encode() in old and v2.encode() in new
        assert kek.check() == v2
        assert kek.unwrap(old, key_id="k", owner="o") == b"\x01" * 32
        assert kek.unwrap(new, key_id="k", owner="o") == b"\x02" * 32
    # A ref pinned to v1 keeps wrapping with v1 and refuses v2's wraps.
    pinned = KeyVaultKek(
        ref=f"azurekv:{v1}", credential=key_vault.credential(), config=key_vault_config
    )
    with pinned:
        assert v1.encode() in pinned.wrap(b"\x03" * 32, key_id="k", owner="o")
        with pytest.raises(KekError, match="which is not"):
            pinned.unwrap(new, key_id="k", owner="o")


def _permanent(info: pytest.ExceptionInfo[KekError]) -> bool:
    """Whether the error is one that needs someone to act (not worth retrying)."""
    return not isinstance(info.value, KekUnavailableError)


def _refused_permanently(
    kek: KeyVaultKek, wrapped: bytes, unwrap_match: str, wrap_match: str | None = None
) -> None:
    """Unwrapping ``wrapped`` and wrapping a new key both fail with a permanent KekError."""
    with pytest.raises(KekError, match=unwrap_match) as info:
        kek.unwrap(wrapped, key_id="k", owner="o")
    assert _permanent(info)
    with pytest.raises(KekError, match=wrap_match or unwrap_match) as info:
        kek.wrap(b"\x05" * 32, key_id="k", owner="o")
    assert _permanent(info)


def test_forbidden_not_found_and_disabled_are_named(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    with _kek_and_a_wrap(key_vault, key_vault_config, b"\x05") as (kek, wrapped):
        key_vault.forbidden = True
        _refused_permanently(
            kek, wrapped, r"^forbidden: .*ForbiddenByRbac.*Crypto User", r"^forbidden"
        )
        key_vault.forbidden = False
        key_vault.set_enabled("broker-kek", False)
        _refused_permanently(kek, wrapped, r"^key disabled")
        key_vault.set_enabled("broker-kek", True)
        assert kek.unwrap(wrapped, key_id="k", owner="o") == b"\x05" * 32
        key_vault.delete_key("broker-kek")
        _refused_permanently(kek, wrapped, r"^key not found")


def test_throttling_is_retried_after_the_retry_after_delay(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    with _kek_and_a_wrap(key_vault, key_vault_config, b"\x07") as (kek, wrapped):
        key_vault.throttle(1, retry_after=1)
        start = time.monotonic()
        assert kek.unwrap(wrapped, key_id="k", owner="o") == b"\x07" * 32
        elapsed = time.monotonic() - start
    unwraps = key_vault.recorded(method="POST", suffix="/unwrapkey")
    assert [r.status for r in unwraps[-2:]] == [429, 200]
    assert unwraps[-1].at - unwraps[-2].at >= 1.0
    assert elapsed >= 1.0


def test_throttling_that_does_not_end_is_a_clear_error(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    config = replace(key_vault_config, retry_total=1)
    with _kek_and_a_wrap(key_vault, config, b"\x08") as (kek, wrapped):
        key_vault.fail_next(429, "Throttled", times=2)
        with pytest.raises(KekUnavailableError, match=r"^throttled"):
            kek.unwrap(wrapped, key_id="k", owner="o")


@pytest.mark.parametrize("status", [500, 503, 504])
def test_server_errors_that_outlast_the_retries_are_transient(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig, status: int
) -> None:
    config = replace(key_vault_config, retry_total=1, retry_backoff_max_seconds=0.2)
    with _kek_and_a_wrap(key_vault, config, b"\x0b") as (kek, wrapped):
        key_vault.fail_next(status, "ServiceUnavailable", times=2)
        with pytest.raises(KekUnavailableError, match=rf"^unavailable: .*\({status} "):
            kek.unwrap(wrapped, key_id="k", owner="o")
        key_vault.fail_next(status, "ServiceUnavailable", times=2)
        with pytest.raises(KekUnavailableError, match=r"^unavailable: "):
            kek.wrap(b"\x0b" * 32, key_id="k", owner="o")
        # One failure is absorbed by the retry.
        key_vault.fail_next(status, "ServiceUnavailable", times=1)
        assert kek.unwrap(wrapped, key_id="k", owner="o") == b"\x0b" * 32


def test_a_bad_request_is_not_transient(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    with _kek_and_a_wrap(key_vault, key_vault_config, b"\x0c") as (kek, wrapped):
        key_vault.fail_next(400, "BadParameter")
        with pytest.raises(KekError, match=r"\(400 BadParameter\)") as info:
            kek.unwrap(wrapped, key_id="k", owner="o")
        assert _permanent(info)


def test_a_wrong_token_and_an_unreachable_vault(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    key_vault.create_key("broker-kek")
    with _kek(key_vault, key_vault_config) as kek:
        wrapped = kek.wrap(b"\x09" * 32, key_id="k", owner="o")
    wrong = KeyVaultKek(
        ref=f"azurekv:{key_vault.key_url('broker-kek')}",
        credential=StaticTokenCredential("not-the-token"),
        config=key_vault_config,
    )
    with wrong, pytest.raises(KekError, match=r"^unauthorized") as info:
        wrong.unwrap(wrapped, key_id="k", owner="o")
    assert _permanent(info)
    key_vault.stop()
    offline = replace(key_vault_config, retry_total=0, timeout_seconds=2)
    with _kek(key_vault, offline) as kek:
        with pytest.raises(KekUnavailableError, match=r"^unreachable"):
            kek.unwrap(wrapped, key_id="k", owner="o")
        with pytest.raises(KekUnavailableError, match=r"^unreachable"):
            kek.wrap(b"\x09" * 32, key_id="k", owner="o")


def test_the_unwrap_cache_saves_calls_and_expires(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    key_vault.create_key("broker-kek")
    now = [1000.0]
    config = replace(key_vault_config, unwrap_cache_seconds=60)
    kek = KeyVaultKek(
        ref=f"azurekv:{key_vault.key_url('broker-kek')}",
        credential=key_vault.credential(),
        config=config,
        clock=lambda: now[0],
    )
    with kek:
        wrapped = kek.wrap(b"\x0a" * 32, key_id="k", owner="o")
        calls = len(key_vault.requests)
        for _ in range(5):
            assert kek.unwrap(wrapped, key_id="k", owner="o") == b"\x0a" * 32
        assert len(key_vault.requests) == calls
        # The cache never bypasses the binding.
        with pytest.raises(KekError, match="another key id or owner"):
            kek.unwrap(wrapped, key_id="other", owner="o")
        # A key disabled in Key Vault takes effect once the cached entry expires.
        key_vault.set_enabled("broker-kek", False)
        assert kek.unwrap(wrapped, key_id="k", owner="o") == b"\x0a" * 32
        now[0] += 61
        with pytest.raises(KekError, match=r"^key disabled"):
            kek.unwrap(wrapped, key_id="k", owner="o")


def test_the_registry_resolves_azurekv_refs(
    key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig, tmp_path: Path
) -> None:
    key_vault.create_key("broker-kek")
    ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    with KekRegistry.open_local(tmp_path, default_ref=ref) as registry:
        provider = register_key_vault_provider(
            registry, config=key_vault_config, credential=key_vault.credential()
        )
        kek = registry.default
        assert kek is registry.get(ref) and kek.ref == ref
        record_key = secrets.token_bytes(32)
        record = DataKeyRecord(
            key_id="adv-data",
            owner="advertiser",
            wrapped_key=kek.wrap(record_key, key_id="adv-data", owner="advertiser"),
            kek_ref=kek.ref,
            created_at=datetime.now(UTC),
        )
        with plain_data_key(registry.get(record.kek_ref), record) as plain:
            assert bytes(plain) == record_key
        provider.close()


# --- the broker: registration with Key Vault as the default KEK, and rotation ---------------


@contextmanager
def _broker_with_key_vault(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig, **settings: Any
) -> Iterator[Broker]:
    """A broker on SQLite in ``tmp_path`` with the vault's provider and the advertiser added."""
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        **settings,
    )
    with open_broker(config) as b:
        provider = register_key_vault_provider(
            b.keks, config=key_vault_config, credential=key_vault.credential()
        )
        b.add_party(OPERATOR, _party())
        yield b
        provider.close()


@pytest.fixture
def broker(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> Iterator[Broker]:
    key_vault.create_key("broker-kek")
    with _broker_with_key_vault(tmp_path, key_vault, key_vault_config) as b:
        yield b


def _party() -> Party:
    public = generate_recipient_key().public_key()
    return Party(name="advertiser", kem=public.kem, public_key=public.raw)


def _register(broker: Broker, key_id: str, data_key: bytes) -> None:
    sealed = seal_for_registration(
        broker.registration_key.public_key(), data_key, key_id=key_id, owner="advertiser"
    )
    broker.register_data_key(ADVERTISER, key_id=key_id, sealed_data_key=sealed, description="")


def _plain(broker: Broker, key_id: str) -> bytes:
    record = broker.store.get_data_key(key_id)
    with plain_data_key(broker.keks.get(record.kek_ref), record) as key:
        return bytes(key)


def test_rotating_data_keys_from_the_local_kek_to_key_vault_and_back(
    broker: Broker, key_vault: FakeKeyVault
) -> None:
    keys = {f"adv-{i}": secrets.token_bytes(32) for i in range(3)}
    for key_id, data_key in keys.items():
        _register(broker, key_id, data_key)
    ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    rotated = rotate_data_key(broker, "adv-0", ref, actor=OPERATOR)
    assert rotated.kek_ref == ref
    stored = broker.store.get_data_key("adv-0")
    assert stored.kek_ref == ref and stored.wrapped_key == rotated.wrapped_key
    assert _plain(broker, "adv-0") == keys["adv-0"]
    assert [r.key_id for r in rotate_kek(broker, "local", ref, actor=OPERATOR)] == [
        "adv-1",
        "adv-2",
    ]
    assert all(_plain(broker, k) == v for k, v in keys.items())
    # After a rotation in Key Vault, rewrapping under the same versionless ref moves a key to
    # the current version.
    v2 = key_vault.rotate_key("broker-kek")
    assert v2.encode() in rotate_data_key(broker, "adv-1", ref).wrapped_key
    assert rotate_data_key(broker, "adv-1", "local").kek_ref == "local"
    assert _plain(broker, "adv-1") == keys["adv-1"]
    audit = [r for r in broker.audit.list_records(after_sequence=0, limit=100)]
    rewraps = [r for r in audit if r.action == ROTATION_ACTION]
    assert len(rewraps) == 5 and all(r.decision == "allow" for r in rewraps)
    assert rewraps[0].reason == f"rewrapped from local to {ref}"


def test_a_refused_rotation_changes_nothing_and_is_audited(
    broker: Broker, key_vault: FakeKeyVault
) -> None:
    _register(broker, "adv-0", b"\x42" * 32)
    before = broker.store.get_data_key("adv-0")
    key_vault.forbidden = True
    ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    with pytest.raises(KekError, match=r"^forbidden"):
        rotate_data_key(broker, "adv-0", ref, actor=OPERATOR)
    assert broker.store.get_data_key("adv-0") == before
    last = broker.audit.list_records(after_sequence=0, limit=100)[-1]
    assert (last.action, last.subject, last.decision) == (ROTATION_ACTION, "adv-0", "deny")
    assert "forbidden" in last.reason


def test_key_vault_as_the_default_kek_for_registration(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> None:
    key_vault.create_key("broker-kek")
    ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    with _broker_with_key_vault(tmp_path, key_vault, key_vault_config, default_kek=ref) as b:
        _register(b, "adv-data", b"\x24" * 32)
        assert b.store.get_data_key("adv-data").kek_ref == ref
        assert _plain(b, "adv-data") == b"\x24" * 32
        # Key Vault refusing to wrap refuses the registration (and audits it).
        key_vault.set_enabled("broker-kek", False)
        with pytest.raises(KekError, match=r"^key disabled"):
            _register(b, "adv-data-2", b"\x25" * 32)
        last = b.audit.list_records(after_sequence=0, limit=100)[-1]
        assert (last.action, last.decision) == ("key.register", "deny")
