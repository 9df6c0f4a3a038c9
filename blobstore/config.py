"""Settings of the blob transport: how to authenticate, where the endpoint is, block sizes.

Loaded with :func:`load_blob_config` from the ``[blob]`` table of a TOML file and then from
``CLEANROOM_BLOB_<SETTING>`` environment variables (``CLEANROOM_BLOB_CONNECTION_STRING``).
Secrets (a connection string with an account key, a SAS token) belong in the environment or in
a file readable only by the service's user, not in a shared configuration file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cleanroom.config import ConfigError, load_config

__all__ = [
    "AUTH_MODES",
    "BLOB_ENV_PREFIX",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "BlobConfig",
    "load_blob_config",
]

#: Prefix of the environment variables that override :class:`BlobConfig` fields.
BLOB_ENV_PREFIX = "CLEANROOM_BLOB"

#: Bytes per staged block and per ranged read. 4 MiB keeps memory small and requests few.
DEFAULT_BLOCK_SIZE = 4 << 20

#: The service's largest block (4000 MiB); far larger than anything sensible here.
MAX_BLOCK_SIZE = 4000 << 20

#: How to authenticate. ``auto`` picks the connection string, else the SAS token, else the
#: Azure identity chain (managed identity on a VM).
AUTH_MODES = ("auto", "identity", "connection-string", "sas", "anonymous")


@dataclass(frozen=True)
class BlobConfig:
    """How blob URLs are reached.

    Attributes:
        auth: one of :data:`AUTH_MODES`.
        connection_string: an account connection string (Azurite, or an account key). Its
            ``BlobEndpoint`` decides the endpoint; the URL's account must match its account.
        sas_token: a SAS token (without the leading ``?``) used for every URL.
        account_url: the endpoint to use instead of ``https://<account>.blob.<suffix>``, with
            ``{account}`` replaced by the URL's account (a private endpoint, or an emulator).
        endpoint_suffix: the storage DNS suffix (``core.windows.net``; sovereign clouds differ).
        managed_identity_client_id: the client id of a user-assigned managed identity, for the
            identity chain; empty for the system-assigned identity.
        block_size: bytes per staged block when writing (also the memory a writer holds per
            block in flight).
        read_chunk_size: bytes per ranged GET when reading.
        max_concurrency: blocks staged in parallel by one writer (memory: that many blocks
            plus the one being filled).
        connect_timeout_seconds: TCP/TLS connect timeout per request.
        read_timeout_seconds: time to wait for response bytes per request.
        retry_total: retries per request on transient errors (the SDK's exponential policy).

    Raises:
        ConfigError: a setting is out of range or the auth mode is unknown.
    """

    auth: str = "auto"
    connection_string: str = field(default="", repr=False)
    sas_token: str = field(default="", repr=False)
    account_url: str = ""
    endpoint_suffix: str = "core.windows.net"
    managed_identity_client_id: str = ""
    block_size: int = DEFAULT_BLOCK_SIZE
    read_chunk_size: int = DEFAULT_BLOCK_SIZE
    max_concurrency: int = 2
    connect_timeout_seconds: float = 20.0
    read_timeout_seconds: float = 60.0
    retry_total: int = 5

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(
                f"blob.auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}"
            )
        if self.auth == "connection-string" and not self.connection_string:
            raise ConfigError("blob.auth is 'connection-string' but no connection_string is set")
        if self.auth == "sas" and not self.sas_token:
            raise ConfigError("blob.auth is 'sas' but no sas_token is set")
        if not 64 << 10 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(f"blob.block_size must be between 64 KiB and {MAX_BLOCK_SIZE} bytes")
        if not 64 << 10 <= self.read_chunk_size <= 256 << 20:
            raise ConfigError("blob.read_chunk_size must be between 64 KiB and 256 MiB")
        if not 1 <= self.max_concurrency <= 64:
            raise ConfigError("blob.max_concurrency must be between 1 and 64")
        if self.connect_timeout_seconds <= 0 or self.read_timeout_seconds <= 0:
            raise ConfigError("blob timeouts must be positive")
        if self.retry_total < 0:
            raise ConfigError("blob.retry_total must not be negative")

    @property
    def effective_auth(self) -> str:
        """The auth mode ``auto`` resolves to."""
        if self.auth != "auto":
            return self.auth
        if self.connection_string:
            return "connection-string"
        if self.sas_token:
            return "sas"
        return "identity"


def load_blob_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> BlobConfig:
    """Reads ``[blob]`` from ``path`` (if any) and ``CLEANROOM_BLOB_*`` from the environment.

    Raises:
        ConfigError: the file cannot be read, or a setting is unknown or invalid.
    """
    return load_config(
        BlobConfig,
        Path(path) if path is not None else None,
        env_prefix=BLOB_ENV_PREFIX,
        section="blob",
        env=env,
    )
