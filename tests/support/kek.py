"""A reference KEK for the tests: the Kek protocol's simplest faithful implementation."""

from __future__ import annotations

from pathlib import Path

from broker.custody import LocalKek


class RefKek:
    """A real KEK under another ref: a LocalKek with its own key file, standing in for a
    provider that serves many refs (as the Azure Key Vault provider will)."""

    def __init__(self, ref: str, path: Path) -> None:
        self._ref = ref
        self._inner = LocalKek.open(path)

    @property
    def ref(self) -> str:
        return self._ref

    def wrap(self, data_key: bytes | bytearray, *, key_id: str, owner: str) -> bytes:
        return self._inner.wrap(data_key, key_id=key_id, owner=owner)

    def unwrap(self, wrapped: bytes, *, key_id: str, owner: str) -> bytes:
        return self._inner.unwrap(wrapped, key_id=key_id, owner=owner)
