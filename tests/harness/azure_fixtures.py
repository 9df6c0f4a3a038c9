"""Pytest fixtures for the Azure backends: a real Azurite and the local Key Vault server.

Registered as a plugin (``pytest_plugins = ["tests.harness.azure_fixtures"]`` in
``tests/conftest.py``, or ``-p tests.harness.azure_fixtures`` on the command line). Like the
other service fixtures they never skip: a missing Azurite fails the test with the install hint.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from blobstore.config import BlobConfig
from broker.kek_azure import KeyVaultConfig
from cleanroom.app.emulators.keyvault import FakeKeyVault, start_fake_key_vault
from tests.harness.azurite import Azurite, start_azurite


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite blob service for the session."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azurite_connection_string(azurite: Azurite) -> str:
    """A connection string for Azurite's development account."""
    return azurite.connection_string()


@pytest.fixture
def blob_config(azurite: Azurite) -> BlobConfig:
    """A :class:`BlobConfig` for Azurite, with small blocks so tests go multi-block quickly."""
    return BlobConfig(
        connection_string=azurite.connection_string(),
        block_size=256 << 10,
        read_chunk_size=256 << 10,
    )


@pytest.fixture
def blob_container(azurite: Azurite) -> Iterator[str]:
    """A fresh, empty container; yields its ``azure://`` URL (deleted afterwards)."""
    name = f"t-{secrets.token_hex(8)}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        service.create_container(name)
        yield f"azure://{azurite.account}/{name}"
        service.delete_container(name)
    finally:
        service.close()


@pytest.fixture
def key_vault(tmp_path: Path) -> Iterator[FakeKeyVault]:
    """A local HTTPS server speaking the Key Vault calls the KEK provider uses."""
    vault = start_fake_key_vault(tmp_path)
    try:
        yield vault
    finally:
        vault.stop()


@pytest.fixture
def key_vault_config(key_vault: FakeKeyVault) -> KeyVaultConfig:
    """A :class:`KeyVaultConfig` for the local vault: its CA trusted, challenge resource check
    off (the vault is 127.0.0.1, not *.vault.azure.net), no unwrap cache, quick retries."""
    return KeyVaultConfig(
        credential="static-token",
        access_token=key_vault.token,
        ca_file=str(key_vault.ca_file),
        verify_challenge_resource=False,
        unwrap_cache_seconds=0,
        retry_total=3,
        retry_backoff_max_seconds=1.0,
        timeout_seconds=5.0,
    )
