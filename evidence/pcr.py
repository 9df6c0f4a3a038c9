"""PCR banks, extension and the offline computation of PCR 23 from a workload's files.

The sidecar extends each manifest file's digest, in order, into PCR 23 of every configured bank
(``PCR := H(PCR || digest)`` with ``H`` the bank's hash, starting from all zeros after a reset),
then one launch event (:mod:`evidence.launch`). Parties and operators use :func:`measure_files`
to compute the same golden values without a TPM.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evidence.errors import EventLogError, MeasurementError
from evidence.launch import Launch, launch_digests

#: The PCR the sidecar measures the workload into (resettable, debug/application PCR).
WORKLOAD_PCR = 23

#: Supported banks: name -> digest size. Names are the ones tpm2-tools uses (``sha256:23``).
BANK_SIZES: Mapping[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48}

#: The banks measured by default, as in the manual recipe.
DEFAULT_BANKS: tuple[str, ...] = ("sha1", "sha256")

# The named constructors: hashlib.new(name) resolves the name on every call, which is about a
# third of the cost of one PCR-sized extend, and the broker replays an event log per quote.
_HASHES: Mapping[str, Callable[[bytes], hashlib._Hash]] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
}

_READ_CHUNK = 1 << 20

#: The digest of zero bytes in every bank. A measured file of size 0 has exactly these
#: digests, and a file of any other size has none of them, so an event's size can be checked
#: against its digests without the file (see :func:`check_event_size`).
EMPTY_DIGESTS: Mapping[str, bytes] = {bank: h(b"").digest() for bank, h in _HASHES.items()}

#: The largest size an event can state: the event log's ``size`` is a protobuf ``uint64``.
MAX_EVENT_SIZE = (1 << 64) - 1


def check_bank(bank: str) -> str:
    """Returns ``bank`` if supported.

    Raises:
        EventLogError: the bank is not one of :data:`BANK_SIZES`.
    """
    if bank not in BANK_SIZES:
        raise EventLogError(f"unsupported PCR bank {bank!r} (supported: {', '.join(BANK_SIZES)})")
    return bank


def extend(pcr: bytes, digest: bytes, bank: str) -> bytes:
    """``H(pcr || digest)`` in ``bank``, as TPM2_PCR_Extend computes it.

    Raises:
        EventLogError: the bank is unsupported or a value has the wrong size for it.
    """
    size = BANK_SIZES[check_bank(bank)]
    if len(pcr) != size or len(digest) != size:
        raise EventLogError(f"{bank} values must be {size} bytes")
    return _HASHES[bank](pcr + digest).digest()


@dataclass(frozen=True)
class MeasurementEvent:
    """One event extended into a PCR: a file (the path as given, its size and one digest per
    bank) or, with ``launch`` set, the launch event (path: the executable, size 0; its digests
    are the launch's, :func:`evidence.launch.launch_digests`)."""

    path: str
    size: int
    digests: Mapping[str, bytes]
    pcr_index: int = WORKLOAD_PCR
    launch: Launch | None = None


def launch_event(launch: Launch, banks: Sequence[str]) -> MeasurementEvent:
    """The event log entry of ``launch``, with its digest in each of ``banks``.

    Raises:
        EventLogError: an unsupported bank.
    """
    for bank in banks:
        check_bank(bank)
    return MeasurementEvent(
        path=launch.executable, size=0, digests=launch_digests(launch, banks), launch=launch
    )


@dataclass(frozen=True)
class Measurement:
    """The event log of a measurement and the PCR values it produces, per bank."""

    events: tuple[MeasurementEvent, ...]
    pcrs: Mapping[str, bytes] = field(default_factory=dict)


def check_event_size(n: int, event: MeasurementEvent) -> None:
    """Checks that event ``n``'s ``size`` (the byte length of the file it measured) agrees
    with its digests as far as they show it: the digests of empty data for size 0, and only
    then. A digest in a bank outside :data:`BANK_SIZES` is left to :func:`replay`. A launch
    event's size must be 0.

    Raises:
        EventLogError: the size is not a byte count, or it contradicts the digests.
    """
    size = event.size
    if event.launch is not None:
        # A launch event measures no file: its size is 0 by definition, and its digests are
        # those of the launch it reports, which the replay recomputes.
        if size != 0:
            raise EventLogError(f"event {n} (the launch) has size {size}; a launch event has 0")
        return
    if not 0 <= size <= MAX_EVENT_SIZE:
        raise EventLogError(f"event {n} ({event.path!r}) has size {size}, not a byte count")
    # One supported bank is enough: every digest of an event is of the same data (the replay
    # and the manifest check hold the digests themselves to account). This runs for every
    # event of every quote the broker verifies.
    for bank, digest in event.digests.items():
        empty = EMPTY_DIGESTS.get(bank)
        if empty is None:
            continue
        if (digest == empty) != (size == 0):
            stated = "0 bytes" if size == 0 else f"{size} bytes"
            data = "non-empty data" if size == 0 else "empty data"
            raise EventLogError(
                f"event {n} ({event.path!r}) says {stated}, but its {bank} digest is that of {data}"
            )
        return


def digest_file(path: str | os.PathLike[str], banks: Sequence[str]) -> tuple[int, dict[str, bytes]]:
    """Reads a file once, in chunks, and returns its size and its digest in every bank.

    Raises:
        MeasurementError: the file is missing, unreadable or not a regular file.
    """
    for bank in banks:
        check_bank(bank)
    p = Path(path)
    hashers = {bank: hashlib.new(bank) for bank in banks}
    size = 0
    try:
        if not p.is_file():
            raise MeasurementError(f"cannot measure {p}: not a regular file or does not exist")
        with p.open("rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                size += len(chunk)
                for h in hashers.values():
                    h.update(chunk)
    except PermissionError as e:
        raise MeasurementError(f"cannot measure {p}: permission denied") from e
    except OSError as e:
        raise MeasurementError(f"cannot measure {p}: {e.strerror or e}") from e
    return size, {bank: h.digest() for bank, h in hashers.items()}


def replay(
    events: Iterable[MeasurementEvent],
    banks: Sequence[str],
    *,
    pcr_index: int = WORKLOAD_PCR,
    max_events: int | None = None,
) -> dict[str, bytes]:
    """Replays the events for ``pcr_index`` from a reset PCR and returns its value per bank.

    A launch event's digests must be those of the launch it reports, so that every field of
    the launch is bound into the PCR value the log replays to.

    Raises:
        EventLogError: an event lacks a digest for a bank, a digest has the wrong size, a
            launch event's digest is not its launch's, or the log has more than
            ``max_events`` events.
    """
    # Banks are checked and their hash and size looked up once, not per extend: the broker
    # replays a log for every quote it verifies (see docs/benchmarks.md, quote verification).
    plan = [(bank, BANK_SIZES[check_bank(bank)], _HASHES[bank]) for bank in banks]
    values = {bank: bytes(size) for bank, size, _ in plan}
    for n, event in enumerate(events):
        if max_events is not None and n >= max_events:
            raise EventLogError(f"event log has more than {max_events} events")
        if event.pcr_index != pcr_index:
            continue
        digests = event.digests
        for bank, size, h in plan:
            digest = digests.get(bank)
            if digest is None:
                raise EventLogError(f"event {n} ({event.path!r}) has no {bank} digest")
            if len(digest) != size:
                raise EventLogError(f"event {n} ({event.path!r}) has a malformed {bank} digest")
            values[bank] = h(values[bank] + digest).digest()
        if event.launch is not None:
            computed = launch_digests(event.launch, [bank for bank, _, _ in plan])
            for bank, _, _ in plan:
                if digests[bank] != computed[bank]:
                    raise EventLogError(
                        f"event {n} (the launch) has a {bank} digest that is not its launch's"
                    )
    return values


def measure_files(
    files: Sequence[str | os.PathLike[str]],
    banks: Sequence[str] = DEFAULT_BANKS,
    *,
    names: Sequence[str] | None = None,
    launch: Launch | None = None,
) -> Measurement:
    """Computes, without a TPM, the event log and PCR 23 values that measuring ``files`` gives,
    followed by the launch event of ``launch`` when given (as ``sidecar run`` measures).

    ``names`` are the paths recorded in the log (default: the paths as given).

    Raises:
        MeasurementError: a file cannot be read.
    """
    if names is not None and len(names) != len(files):
        raise MeasurementError("names and files must have the same length")
    events = []
    for i, f in enumerate(files):
        size, digests = digest_file(f, banks)
        events.append(
            MeasurementEvent(path=str(names[i] if names else f), size=size, digests=digests)
        )
    if launch is not None:
        events.append(launch_event(launch, banks))
    return Measurement(events=tuple(events), pcrs=replay(events, banks))
