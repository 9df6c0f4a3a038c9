"""Conversions between the evidence types and their ``cleanroom.v1`` protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from cleanroom.v1 import common_pb2
from evidence.errors import EventLogError, LaunchError
from evidence.launch import Launch
from evidence.manifest import ManifestEntry
from evidence.pcr import BANK_SIZES, MeasurementEvent

_BANK_TO_PB = {
    "sha1": common_pb2.HASH_ALGORITHM_SHA1,
    "sha256": common_pb2.HASH_ALGORITHM_SHA256,
    "sha384": common_pb2.HASH_ALGORITHM_SHA384,
}
_PB_TO_BANK = {v: k for k, v in _BANK_TO_PB.items()}


def bank_to_pb(bank: str) -> common_pb2.HashAlgorithm.ValueType:
    """Raises: EventLogError for an unsupported bank."""
    try:
        return _BANK_TO_PB[bank]
    except KeyError:
        raise EventLogError(f"unsupported PCR bank {bank!r}") from None


def bank_from_pb(value: int) -> str:
    """Raises: EventLogError for an unspecified or unknown hash algorithm."""
    try:
        return _PB_TO_BANK[value]  # type: ignore[index]
    except KeyError:
        raise EventLogError(f"unsupported hash algorithm {value}") from None


def launch_to_pb(launch: Launch) -> common_pb2.Launch:
    """The ``cleanroom.v1.Launch`` message of ``launch``."""
    msg = common_pb2.Launch(
        argv=list(launch.argv),
        executable=launch.executable,
        executable_sha256=launch.executable_sha256,
        working_directory=launch.cwd,
    )
    for name, value in launch.env:
        msg.env.add(name=name, value=value)
    return msg


def launch_from_pb(msg: common_pb2.Launch) -> Launch:
    """The launch a ``cleanroom.v1.Launch`` message describes.

    Raises:
        LaunchError: the launch is malformed (see :class:`evidence.launch.Launch`).
    """
    return Launch(
        argv=tuple(msg.argv),
        executable=msg.executable,
        executable_sha256=bytes(msg.executable_sha256),
        env=tuple((v.name, v.value) for v in msg.env),
        cwd=msg.working_directory,
    )


def event_log_to_pb(events: Iterable[MeasurementEvent]) -> common_pb2.EventLog:
    log = common_pb2.EventLog()
    for e in events:
        pe = log.events.add(pcr_index=e.pcr_index, path=e.path, size=e.size)
        for bank, value in e.digests.items():
            pe.digests.add(algorithm=bank_to_pb(bank), value=value)
        if e.launch is not None:
            pe.launch.CopyFrom(launch_to_pb(e.launch))
    return log


def event_log_from_pb(
    log: common_pb2.EventLog, *, max_events: int | None = None
) -> tuple[MeasurementEvent, ...]:
    """Raises: EventLogError when the log is too long, a digest or a launch is malformed."""
    if max_events is not None and len(log.events) > max_events:
        raise EventLogError(f"event log has {len(log.events)} events, more than {max_events}")
    out = []
    for n, pe in enumerate(log.events):
        digests: dict[str, bytes] = {}
        for d in pe.digests:
            bank = bank_from_pb(d.algorithm)
            if len(d.value) != BANK_SIZES[bank]:
                raise EventLogError(f"event {n}: {bank} digest must be {BANK_SIZES[bank]} bytes")
            if bank in digests:
                raise EventLogError(f"event {n}: two {bank} digests")
            digests[bank] = bytes(d.value)
        launch = None
        if pe.HasField("launch"):
            try:
                launch = launch_from_pb(pe.launch)
            except LaunchError as e:
                raise EventLogError(f"event {n}: malformed launch: {e}") from e
        out.append(
            MeasurementEvent(
                path=pe.path, size=pe.size, digests=digests, pcr_index=pe.pcr_index, launch=launch
            )
        )
    return tuple(out)


def manifest_to_pb(
    name: str, entries: Iterable[ManifestEntry], launch: Launch | None = None
) -> common_pb2.WorkloadManifest:
    """The ``cleanroom.v1.WorkloadManifest`` of ``entries`` (each file's digests in
    :data:`evidence.pcr.BANK_SIZES` order) and ``launch``.

    Raises:
        EventLogError: an entry has a digest in an unsupported bank.
    """
    msg = common_pb2.WorkloadManifest(name=name)
    order = list(BANK_SIZES)
    for e in entries:
        entry = msg.entries.add(path=e.path, size=e.size)
        for bank in sorted(e.digests, key=lambda b: order.index(b) if b in order else len(order)):
            entry.digests.add(algorithm=bank_to_pb(bank), value=e.digests[bank])
    if launch is not None:
        msg.launch.CopyFrom(launch_to_pb(launch))
    return msg


def manifest_from_pb(msg: common_pb2.WorkloadManifest) -> tuple[ManifestEntry, ...]:
    """The manifest entries of a ``cleanroom.v1.WorkloadManifest`` (its launch is
    :func:`launch_from_pb`'s).

    Raises:
        EventLogError: a digest names an unspecified or unknown hash algorithm.
    """
    return tuple(
        ManifestEntry(
            path=e.path,
            size=e.size,
            digests={bank_from_pb(d.algorithm): bytes(d.value) for d in e.digests},
        )
        for e in msg.entries
    )
