"""The Key Vault KEK provider's pure parts: refs, configuration, and refusals that happen before
any call to Key Vault (malformed or foreign wrapped keys)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from broker.custody import KekRegistry
from broker.errors import KekError
from broker.kek_azure import (
    KEYVAULT_REF_PREFIX,
    KeyVaultConfig,
    KeyVaultKek,
    KeyVaultKekProvider,
    KeyVaultKeyId,
    load_key_vault_config,
    make_credential,
    parse_ref,
    register_key_vault_provider,
)
from cleanroom.config import ConfigError

VAULT = "https://cleanroom-kv.vault.azure.net"


class NoNetworkCredential:
    """A credential that fails the test if anything asks it for a token."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("no Key Vault call was expected")


def _kek(ref: str = f"azurekv:{VAULT}/keys/broker-kek") -> KeyVaultKek:
    return KeyVaultKek(ref=ref, credential=NoNetworkCredential())


def test_refs_with_and_without_a_version() -> None:
    unversioned = parse_ref(f"azurekv:{VAULT}/keys/broker-kek")
    assert unversioned == KeyVaultKeyId(VAULT, "broker-kek", None)
    pinned = parse_ref(f"azurekv:{VAULT.upper().replace('HTTPS', 'https')}/keys/broker-kek/0a1b2c")
    assert pinned == KeyVaultKeyId(VAULT, "broker-kek", "0a1b2c")
    assert pinned.url == f"{VAULT}/keys/broker-kek/0a1b2c"
    assert unversioned.covers(pinned) and pinned.covers(pinned)
    assert not pinned.covers(KeyVaultKeyId(VAULT, "broker-kek", "ffff"))
    assert not unversioned.covers(KeyVaultKeyId("https://other.vault.azure.net", "broker-kek", "1"))
    assert not unversioned.covers(KeyVaultKeyId(VAULT, "other-kek", "1"))


@pytest.mark.parametrize(
    "ref",
    [
        f"{VAULT}/keys/k",
        "azurekv:http://kv.vault.azure.net/keys/k",
        f"azurekv:{VAULT}/secrets/k",
        f"azurekv:{VAULT}/keys",
        f"azurekv:{VAULT}/keys/k/v/extra",
        f"azurekv:{VAULT}/keys/k_underscore",
        f"azurekv:{VAULT}/keys/k/v-1",
        f"azurekv:{VAULT}/keys/k?api-version=7.4",
        "azurekv:https://user:pw@kv.vault.azure.net/keys/k",
    ],
)
def test_malformed_refs_are_refused(ref: str) -> None:
    with pytest.raises(KekError):
        parse_ref(ref)
    with pytest.raises(KekError):
        _kek(ref)


def test_config_validation_and_loading(tmp_path: Path) -> None:
    assert KeyVaultConfig().credential == "default"
    for fields in (
        {"credential": "password"},
        {"credential": "client-secret", "tenant_id": "t"},
        {"credential": "static-token"},
        {"timeout_seconds": 0},
        {"retry_total": 11},
        {"unwrap_cache_seconds": -1},
    ):
        with pytest.raises(ConfigError):
            KeyVaultConfig(**fields)
    path = tmp_path / "broker.toml"
    path.write_text('[keyvault]\ncredential = "client-secret"\ntenant_id = "t"\nclient_id = "c"\n')
    config = load_key_vault_config(path, env={"CLEANROOM_KEYVAULT_CLIENT_SECRET": "s3cret"})
    assert config.client_secret == "s3cret" and "s3cret" not in repr(config)
    token = KeyVaultConfig(credential="static-token", access_token="tok")
    assert make_credential(token).get_token("https://vault.azure.net/.default").token == "tok"


def _blob(kid: str, *, alg: str = "RSA-OAEP-256", tail: int = 60, version: int = 1) -> bytes:
    fields = [kid.encode(), alg.encode(), b"\x01" * 256]
    body = b"".join(struct.pack(">H", len(f)) + f for f in fields)
    return bytes([version]) + body + b"\x00" * tail


@pytest.mark.parametrize(
    ("wrapped", "why"),
    [
        (b"", "not a Key Vault wrapped key"),
        (b"\x01" + b"\x00" * 40, "malformed"),
        (bytes([1]) + b"\x00\x05abc", "malformed"),
        (_blob(f"{VAULT}/keys/broker-kek/01", tail=59), "trailing bytes"),
        (_blob(f"{VAULT}/keys/broker-kek/01", version=2), "format 2"),
        (_blob(f"{VAULT}/keys/other-kek/01"), "which is not"),
        (_blob("https://evil.example/keys/broker-kek/01"), "which is not"),
        (_blob(f"{VAULT}/keys/broker-kek"), "which is not"),
        (_blob("not a url"), "malformed Key Vault key id"),
        (_blob(f"{VAULT}/keys/broker-kek/01", alg="RSA1_5"), "wrap algorithm"),
    ],
)
def test_foreign_or_malformed_wrapped_keys_are_refused_without_asking_key_vault(
    wrapped: bytes, why: str
) -> None:
    with _kek() as kek, pytest.raises(KekError, match=why):
        kek.unwrap(wrapped, key_id="k1", owner="advertiser")


def test_a_pinned_ref_refuses_other_versions() -> None:
    with _kek(f"azurekv:{VAULT}/keys/broker-kek/aaaa") as kek:
        with pytest.raises(KekError, match="which is not"):
            kek.unwrap(_blob(f"{VAULT}/keys/broker-kek/bbbb"), key_id="k", owner="o")


def test_the_registry_builds_one_kek_per_ref_and_refuses_a_second_provider(
    tmp_path: Path,
) -> None:
    with KekRegistry.open_local(tmp_path) as registry:
        provider = register_key_vault_provider(
            registry,
            credential=NoNetworkCredential(),
        )
        ref = f"{KEYVAULT_REF_PREFIX}{VAULT}/keys/broker-kek"
        kek = registry.get(ref)
        assert isinstance(kek, KeyVaultKek) and kek.ref == ref
        assert registry.get(ref) is kek
        assert registry.get("local").ref == "local"
        with pytest.raises(KekError, match="already registered"):
            register_key_vault_provider(registry)
        with pytest.raises(KekError):
            registry.get(f"{KEYVAULT_REF_PREFIX}not-a-url")
        provider.close()
    with pytest.raises(KekError, match="closed"):
        kek.current_key()


def test_the_provider_makes_its_credential_from_config_once() -> None:
    provider = KeyVaultKekProvider(
        config=KeyVaultConfig(credential="static-token", access_token="tok")
    )
    assert provider.credential() is provider.credential()
    kek = provider(f"azurekv:{VAULT}/keys/k")
    assert kek.config.credential == "static-token"
    provider.close()
