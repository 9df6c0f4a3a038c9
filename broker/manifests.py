"""Workload manifests as the parties' tools build them: measured from files, or read from a
JSON manifest of digests, for an approval (``cleanroom admin workload approve``, the demo).

The manifest type and the expected PCR 23 computation are :mod:`evidence.manifest`'s; this
module adds the parsing of what a party hands in, whose errors are usage errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Final

from broker.errors import AdminUsageError
from evidence.manifest import MANIFEST_BANKS, ManifestEntry
from evidence.pcr import BANK_SIZES, measure_files

#: A manifest file size travels as a protobuf uint64.
MAX_FILE_SIZE: Final = 2**64 - 1


def hex_value(text: str, what: str) -> bytes:
    t = text.strip().lower().removeprefix("0x")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise AdminUsageError(f"{what}: {text!r} is not hexadecimal") from None


def check_bank_name(bank: str, what: str) -> str:
    b = bank.strip().lower()
    if b not in BANK_SIZES:
        raise AdminUsageError(f"{what}: unknown PCR bank {bank!r} (use {', '.join(BANK_SIZES)})")
    return b


def _relative_name(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        raise AdminUsageError(f"{path} is not inside --root {root}") from None
    return PurePosixPath(*rel.parts).as_posix()


def manifest_from_files(
    files: Sequence[str], *, root: str | None = None, banks: Sequence[str] = MANIFEST_BANKS
) -> list[ManifestEntry]:
    """Measures ``files`` in order (the manifest a party approves). Names are relative to
    ``root`` (POSIX form) when given, else the paths as given, which must then be how the
    sidecar names them too.

    Raises:
        AdminUsageError: a file is outside ``root``.
        MeasurementError: a file cannot be read.
    """
    names = [_relative_name(Path(f), Path(root)) for f in files] if root is not None else None
    measurement = measure_files(files, banks, names=names)
    return [ManifestEntry(e.path, e.size, dict(e.digests)) for e in measurement.events]


def manifest_from_json(data: bytes, source: str) -> list[ManifestEntry]:
    """Reads a manifest of digests: ``{"entries": [{"path", "size", "digests": {bank: hex}}]}``.

    ``{"events": [...]}`` (what ``cleanroom sidecar measure --log-out`` writes; its launch event
    is skipped, the launch is given with ``--command``) and a bare list are accepted too. Every
    entry needs a path, a size and a sha256 digest.

    Raises:
        AdminUsageError: the JSON is malformed or an entry is incomplete.
    """
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise AdminUsageError(f"manifest {source} is not valid JSON: {e}") from e
    items: object = doc
    if isinstance(doc, dict):
        items = doc.get("entries", doc.get("events"))
    if not isinstance(items, list) or not items:
        raise AdminUsageError(f'manifest {source}: expected a non-empty "entries" list')
    # An event log's launch event is not a file: the launch is approved with --command.
    items = [i for i in items if not (isinstance(i, dict) and "launch" in i)]
    out = []
    for n, item in enumerate(items):
        where = f"manifest {source}: entry {n}"
        if not isinstance(item, dict):
            raise AdminUsageError(f"{where} is not an object")
        path, size, digests = item.get("path"), item.get("size"), item.get("digests")
        if not isinstance(path, str) or not path:
            raise AdminUsageError(f'{where} needs a "path"')
        if size is None:
            # The broker compares each measured file's size with the approved one.
            raise AdminUsageError(f'{where} needs a "size" (the file\'s length in bytes)')
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
            raise AdminUsageError(
                f'{where}: "size" must be an integer from 0 to {MAX_FILE_SIZE} (64 bits)'
            )
        if not isinstance(digests, dict) or "sha256" not in digests:
            raise AdminUsageError(f'{where} needs "digests" with at least a sha256 digest')
        parsed: dict[str, bytes] = {}
        for bank, value in digests.items():
            b = check_bank_name(str(bank), where)
            raw = hex_value(str(value), f"{where} {b} digest")
            if len(raw) != BANK_SIZES[b]:
                raise AdminUsageError(f"{where}: the {b} digest must be {BANK_SIZES[b]} bytes")
            parsed[b] = raw
        out.append(ManifestEntry(path, size, parsed))
    return out
