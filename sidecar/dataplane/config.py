"""Limits of the sidecar's data path, loaded from TOML (``[dataplane]``) and the environment.

``load_dataplane_config(path)`` reads the ``[dataplane]`` table of a sidecar configuration file
and then ``CLEANROOM_SIDECAR_DATAPLANE_<FIELD>`` variables
(``CLEANROOM_SIDECAR_DATAPLANE_MAX_MESSAGE_SIZE=8388608``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATAPLANE_ENV_PREFIX",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DataPlaneConfig",
    "load_dataplane_config",
]

#: Prefix of the environment variables that override :class:`DataPlaneConfig` fields.
DATAPLANE_ENV_PREFIX = "CLEANROOM_SIDECAR_DATAPLANE"

#: Plaintext bytes per ReadInput message. 1 MiB matches the sealing format's default segment,
#: so each segment is decrypted straight into the message buffer; larger chunks did not move
#: more data per second in bench/bench_datapath.py.
DEFAULT_CHUNK_SIZE = 1 << 20

#: Largest gRPC message the workload socket accepts or sends, in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 4 << 20

# The protobuf framing of a chunk (tag, length, end flag) must fit beside it in one message.
_FRAMING_ALLOWANCE = 64


@dataclass(frozen=True)
class DataPlaneConfig:
    """Limits of the workload socket.

    Attributes:
        chunk_size: plaintext bytes per ReadInput message.
        max_message_size: largest gRPC message received or sent (WriteOutput chunks included).
        max_workers: threads serving calls; also the limit of concurrent calls (more are refused
            with RESOURCE_EXHAUSTED rather than queued, so a stuck stream cannot block others).
        max_connections: workload connections open at once.
        pipe_size: kernel pipe size the gate splices through, per direction and connection.
        socket_name: the workload socket's file name inside the socket directory.

    Raises:
        ValueError: a limit is out of range.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_workers: int = 16
    max_connections: int = 64
    pipe_size: int = 1 << 20
    socket_name: str = "workload.sock"

    def __post_init__(self) -> None:
        if self.chunk_size < 4096:
            raise ValueError("chunk_size must be at least 4096 bytes")
        if self.max_message_size < self.chunk_size + _FRAMING_ALLOWANCE:
            raise ValueError("max_message_size must exceed chunk_size by at least 64 bytes")
        if self.max_workers < 1 or self.max_connections < 1:
            raise ValueError("max_workers and max_connections must be at least 1")
        if self.pipe_size < 4096:
            raise ValueError("pipe_size must be at least 4096 bytes")
        if not self.socket_name or "/" in self.socket_name or self.socket_name in (".", ".."):
            raise ValueError("socket_name must be a plain file name")


def load_dataplane_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> DataPlaneConfig:
    """Loads :class:`DataPlaneConfig` from the ``[dataplane]`` table of ``path`` and the
    environment.

    Raises:
        cleanroom.config.ConfigError: the file cannot be read or a setting is malformed or out
            of range.
    """
    from cleanroom.config import ConfigError, load_config

    try:
        return load_config(
            DataPlaneConfig,
            Path(path) if path is not None else None,
            env_prefix=DATAPLANE_ENV_PREFIX,
            section="dataplane",
            env=os.environ if env is None else env,
        )
    except ValueError as e:
        raise ConfigError(f"[dataplane] {e}") from e
