"""BlobConfig: safe defaults, validation, TOML and environment, and no secrets in repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobstore.config import DEFAULT_BLOCK_SIZE, BlobConfig, load_blob_config
from cleanroom.config import ConfigError


def test_defaults_use_the_identity_chain_and_4_mib_blocks() -> None:
    config = BlobConfig()
    assert config.effective_auth == "identity"
    assert config.block_size == config.read_chunk_size == DEFAULT_BLOCK_SIZE == 4 << 20


def test_auto_picks_connection_string_then_sas() -> None:
    assert BlobConfig(sas_token="sv=1").effective_auth == "sas"
    both = BlobConfig(connection_string="AccountName=x", sas_token="sv=1")
    assert both.effective_auth == "connection-string"


def test_secrets_are_not_in_repr() -> None:
    config = BlobConfig(connection_string="AccountKey=SECRET1", sas_token="sig=SECRET2")
    assert "SECRET" not in repr(config)


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[blob]\nblock_size = 1048576\naccount_url = "https://{account}.example"\n')
    env = {
        "CLEANROOM_BLOB_CONNECTION_STRING": "AccountName=x",
        "CLEANROOM_BLOB_MAX_CONCURRENCY": "4",
    }
    config = load_blob_config(path, env=env)
    assert config.block_size == 1 << 20 and config.max_concurrency == 4
    assert config.account_url == "https://{account}.example"
    assert config.effective_auth == "connection-string"


@pytest.mark.parametrize(
    "fields",
    [
        {"auth": "password"},
        {"auth": "sas"},
        {"auth": "connection-string"},
        {"block_size": 1000},
        {"read_chunk_size": 1 << 30},
        {"max_concurrency": 0},
        {"read_timeout_seconds": 0},
        {"retry_total": -1},
    ],
)
def test_invalid_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BlobConfig(**fields)  # type: ignore[arg-type]
