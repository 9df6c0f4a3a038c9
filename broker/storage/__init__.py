"""The broker's storage: SQLAlchemy Core over SQLite (default) or PostgreSQL, with migrations.

:class:`Store` is the repository of enrolled keys, credential challenges, golden PCR sets,
parties, data keys, approvals and sessions; ``broker.nonces`` and ``broker.audit`` build the
nonce service and the hash-chained audit log on its transactions. See docs/storage.md.
"""

from __future__ import annotations

from broker.errors import UnknownSessionError
from broker.model import PartyKek
from broker.storage.engine import safe_url
from broker.storage.store import APPROVAL_INDEX_BANK, Store

__all__ = ["APPROVAL_INDEX_BANK", "PartyKek", "Store", "UnknownSessionError", "safe_url"]
