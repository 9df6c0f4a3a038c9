"""Workload manifests: the ordered files a party approves, and the PCR 23 value they give.

One home for "one measured file" (:class:`ManifestEntry`) and for the expected-PCR computation
(:func:`expected_pcr23`), shared by the parties' tools (what they approve), the broker (what it
checks an approval and an attestation against) and the demo. The protobuf form is
:func:`evidence.proto.manifest_to_pb`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from evidence.errors import EventLogError
from evidence.pcr import BANK_SIZES, MeasurementEvent, launch_event, replay

if TYPE_CHECKING:
    from collections.abc import Mapping

    from evidence.launch import Launch

#: Banks a workload manifest is measured in by default, as in the manual recipe.
MANIFEST_BANKS: Final = ("sha1", "sha256")


@dataclass(frozen=True)
class ManifestEntry:
    """One measured file of a workload, in measurement order: its name as measured, its size
    and one digest per bank."""

    path: str
    size: int
    digests: Mapping[str, bytes]


def common_banks(entries: Sequence[ManifestEntry]) -> list[str]:
    """The banks every entry has a digest for, in :data:`evidence.pcr.BANK_SIZES` order."""
    return [b for b in BANK_SIZES if all(b in e.digests for e in entries)]


def expected_pcr23(
    entries: Sequence[ManifestEntry],
    banks: Sequence[str] | None = None,
    launch: Launch | None = None,
) -> dict[str, bytes]:
    """PCR 23 per bank from a reset PCR after measuring ``entries`` in order, then ``launch``
    when given: what ``sidecar run`` extends. ``banks`` defaults to :func:`common_banks`.

    Raises:
        EventLogError: a bank is unsupported, or an entry lacks a digest (or has one of the
            wrong size) for one of ``banks``.
    """
    chosen = common_banks(entries) if banks is None else list(banks)
    events = [MeasurementEvent(path=e.path, size=e.size, digests=e.digests) for e in entries]
    if launch is not None:
        events.append(launch_event(launch, chosen))
    return replay(events, chosen)


def files_pcr23(entries: Sequence[ManifestEntry], bank: str = "sha256") -> bytes | None:
    """The ``bank`` PCR 23 value of the files alone (before any launch), which approvals are
    indexed by (the reset value when there are no files); None when a file has no digest in
    ``bank``."""
    try:
        return expected_pcr23(entries, [bank])[bank]
    except EventLogError:
        return None
