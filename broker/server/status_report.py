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

import sqlalchemy as sa

from cleanroom import __version__
from cleanroom.v1 import admin_pb2

if TYPE_CHECKING:
    from broker.service import Broker


@dataclass(frozen=True)
class ProcessInfo:
    """This broker process: when it started, and its place among ``processes`` siblings."""

    processes: int = 1
    index: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)


def status_pb(broker: Broker, process: ProcessInfo) -> admin_pb2.GetStatusResponse:
    """The status of ``broker`` as served by ``process``.

    Raises:
        StorageError: the database failed (mapped to UNAVAILABLE like any storage fault).
    """
    from broker.errors import StorageError
    from broker.storage import migrate, schema

    store = broker.store
    tables = {
        "eks": schema.eks,
        "aks": schema.aks,
        "parties": schema.parties,
        "data_keys": schema.data_keys,
        "approvals": schema.approvals,
        "golden_pcr_sets": schema.golden_sets,
        "audit_records": schema.audit_records,
    }
    try:
        with store.engine.connect() as conn:
            revision = migrate.current_revision(conn) or ""
            counts = {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
                for name, table in tables.items()
            }
            conn.rollback()
    except sa.exc.SQLAlchemyError as e:
        raise StorageError(f"status: the database {store.display_url} failed") from e
    response = admin_pb2.GetStatusResponse(
        version=__version__,
        uptime_seconds=round(time.monotonic() - process.started_monotonic, 3),
        database=store.display_url,
        database_dialect=store.dialect,
        schema_revision=revision,
        schema_head=migrate.head_revision(),
        default_kek_ref=broker.config.default_kek,
        processes=process.processes,
        process_index=process.index,
        pid=os.getpid(),
        counts=admin_pb2.StatusCounts(**counts),
        trust_domain=broker.config.trust_domain,
    )
    response.started_at.FromDatetime(process.started_at)
    for ref, fingerprint in sorted(store.kek_fingerprints().items()):
        response.keks.add(kek_ref=ref, fingerprint=fingerprint)
    return response


__all__ = ["ProcessInfo", "status_pb"]
