"""``cleanroom admin status``: the running broker's version, uptime, database, KEKs, processes,
counts and schema revision, for the operator (``GetStatus``)."""

from __future__ import annotations

import argparse
from typing import Any

from broker.admin_common import format_fields, leaf_command, open_client, output_for
from cleanroom.v1 import admin_pb2


def status_doc(s: admin_pb2.GetStatusResponse) -> dict[str, Any]:
    """The ``--json`` document of a status answer."""
    counts = s.counts
    return {
        "version": s.version,
        "trust_domain": s.trust_domain,
        "started_at": s.started_at.ToDatetime().isoformat() + "Z",
        "uptime_seconds": s.uptime_seconds,
        "database": s.database,
        "database_dialect": s.database_dialect,
        "schema_revision": s.schema_revision,
        "schema_head": s.schema_head,
        "schema_current": s.schema_revision == s.schema_head,
        "default_kek": s.default_kek_ref,
        "keks": [{"kek_ref": k.kek_ref, "fingerprint": k.fingerprint} for k in s.keks],
        "processes": s.processes,
        "process_index": s.process_index,
        "pid": s.pid,
        "counts": {
            "eks": counts.eks,
            "aks": counts.aks,
            "parties": counts.parties,
            "data_keys": counts.data_keys,
            "approvals": counts.approvals,
            "golden_pcr_sets": counts.golden_pcr_sets,
            "audit_records": counts.audit_records,
        },
    }


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def status_text(s: admin_pb2.GetStatusResponse) -> str:
    """The human-readable status: one ``name: value`` line per item."""

    doc = status_doc(s)
    schema = s.schema_revision or "none"
    schema += " (current)" if doc["schema_current"] else f" (this broker needs {s.schema_head})"
    rows: list[tuple[str, str]] = [
        ("version", s.version),
        ("trust domain", s.trust_domain),
        ("started", f"{doc['started_at']} (up {_duration(s.uptime_seconds)})"),
        ("database", f"{s.database} ({s.database_dialect})"),
        ("schema", schema),
        ("default KEK", s.default_kek_ref),
    ]
    rows += [(f"KEK {k.kek_ref}", f"fingerprint {k.fingerprint}") for k in s.keks]
    rows += [
        ("processes", f"{s.processes} (answered by #{s.process_index}, pid {s.pid})"),
        (
            "counts",
            ", ".join(f"{n.replace('_', ' ')} {v}" for n, v in doc["counts"].items()),
        ),
    ]
    return format_fields(rows)


def status_command(args: argparse.Namespace) -> int:
    """Prints the broker's status (``--json`` for a document).

    Raises:
        BrokerError: the call failed (the client's error for the status code).
    """

    with open_client(args) as client:
        s = client.get_status()
    output_for(args).emit(status_doc(s), status_text(s))
    return 0


def register_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``admin status`` to the admin command groups."""

    leaf_command(
        sub,
        "status",
        "the broker's version, uptime, database, KEKs, processes, counts (operator)",
        status_command,
    )


__all__ = ["register_status", "status_command", "status_doc", "status_text"]
