"""The measurement event log's JSON form: one codec for everything that writes or reads it.

``cleanroom sidecar measure --log-out`` writes it, the broker's offline tools
(``cleanroom broker verify-quote``) and the test vectors read it. The wire form, the protobuf
``cleanroom.v1.EventLog``, is :mod:`evidence.proto`'s; its JSON mapping is accepted here too.

The form: ``{"events": [{"pcr_index", "path", "size", "digests": {bank: hex}, "launch" (the
launch event only)}]}``; a bare list of events is read as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evidence.errors import EventLogError, LaunchError
from evidence.launch import launch_from_json, launch_to_json
from evidence.pcr import BANK_SIZES, WORKLOAD_PCR, MeasurementEvent


def event_to_json(event: MeasurementEvent, banks: Sequence[str] | None = None) -> dict[str, Any]:
    """One event as a JSON object, with its digests in ``banks`` (all of its banks when None)."""
    chosen = list(event.digests) if banks is None else banks
    item: dict[str, Any] = {
        "pcr_index": event.pcr_index,
        "path": event.path,
        "size": event.size,
        "digests": {bank: event.digests[bank].hex() for bank in chosen},
    }
    if event.launch is not None:
        item["launch"] = launch_to_json(event.launch)
    return item


def event_log_to_json(events: Iterable[MeasurementEvent]) -> bytes:
    """The event log as JSON, the form :func:`event_log_from_json` reads."""
    return json.dumps({"events": [event_to_json(e) for e in events]}, indent=1).encode()


def _event_from_simple(n: int, item: Mapping[str, Any]) -> MeasurementEvent:
    digests: dict[str, bytes] = {}
    for bank, value in item["digests"].items():
        if bank not in BANK_SIZES:
            raise EventLogError(f"event {n}: unsupported bank {bank!r}")
        digest = bytes.fromhex(value)
        if len(digest) != BANK_SIZES[bank]:
            raise EventLogError(f"event {n}: {bank} digest must be {BANK_SIZES[bank]} bytes")
        digests[bank] = digest
    launch = None
    if "launch" in item:
        try:
            launch = launch_from_json(item["launch"])
        except LaunchError as e:
            raise EventLogError(f"event {n}: {e}") from e
    return MeasurementEvent(
        path=str(item.get("path", "")),
        size=int(item.get("size", 0)),
        digests=digests,
        pcr_index=int(item.get("pcr_index", item.get("pcrIndex", WORKLOAD_PCR))),
        launch=launch,
    )


def event_log_from_json(data: bytes, *, max_events: int) -> tuple[MeasurementEvent, ...]:
    """Reads an event log from JSON: the form :func:`event_log_to_json` writes (a bare list of
    events is accepted too), or the protobuf JSON mapping of ``cleanroom.v1.EventLog``.

    Raises:
        EventLogError: the JSON is malformed, has more than ``max_events`` events, or has a bad
            bank or digest.
    """
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise EventLogError("event log is not valid JSON") from e
    except RecursionError as e:
        raise EventLogError("event log JSON is nested too deeply") from e
    items = doc if isinstance(doc, list) else doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise EventLogError('event log JSON must be a list or an object with "events"')
    if len(items) > max_events:
        raise EventLogError(f"event log has {len(items)} events, more than {max_events}")
    if all(isinstance(i, dict) and isinstance(i.get("digests"), dict) for i in items):
        try:
            return tuple(_event_from_simple(n, item) for n, item in enumerate(items))
        except EventLogError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise EventLogError(f"event log JSON is malformed: {e}") from e
    # The protobuf JSON mapping needs the generated code; import it only for that form.
    from google.protobuf import json_format

    from cleanroom.v1 import common_pb2
    from evidence.proto import event_log_from_pb

    try:
        log = json_format.ParseDict({"events": items}, common_pb2.EventLog())
        return event_log_from_pb(log, max_events=max_events)
    except (json_format.ParseError, EventLogError, OverflowError, RecursionError) as e:
        raise EventLogError(f"event log JSON is malformed: {e}") from e
