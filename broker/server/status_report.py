"""What ``GetStatus`` (``cleanroom admin status``) reports about a running broker process.

Read-only: one short read transaction for the counts and the schema revision, the recorded KEK
fingerprints, and this process's start time. Nothing secret is reported: the database URL has
its password masked (:func:`broker.storage.engine.safe_url`), KEKs appear by ref and fingerprint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cleanroom import __version__
from cleanroom.v1 import admin_pb2

if TYPE_CHECKING:
    from broker.core.operations import StoreStatus


@dataclass(frozen=True)
class ProcessInfo:
    """This broker process: when it started, and its place among ``processes`` siblings."""

    processes: int = 1
    index: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)


def status_pb(
    store: StoreStatus, process: ProcessInfo, *, default_kek: str, trust_domain: str
) -> admin_pb2.GetStatusResponse:
    """The status of a broker whose database is in ``store`` (:meth:`broker.core.operations.
    Operations.store_status`), as served by ``process``."""
    response = admin_pb2.GetStatusResponse(
        version=__version__,
        uptime_seconds=round(time.monotonic() - process.started_monotonic, 3),
        database=store.database,
        database_dialect=store.dialect,
        schema_revision=store.schema_revision,
        schema_head=store.schema_head,
        default_kek_ref=default_kek,
        processes=process.processes,
        process_index=process.index,
        pid=os.getpid(),
        counts=admin_pb2.StatusCounts(**store.counts),
        trust_domain=trust_domain,
    )
    response.started_at.FromDatetime(process.started_at)
    for ref, fingerprint in sorted(store.kek_fingerprints.items()):
        response.keks.add(kek_ref=ref, fingerprint=fingerprint)
    return response


__all__ = ["ProcessInfo", "status_pb"]
