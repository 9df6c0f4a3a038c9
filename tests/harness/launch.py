"""A launch for tests and benchmarks whose sidecar side is simulated (software quotes).

Every approval covers a launch and every event log ends with the launch event, so tests that
build evidence without a real sidecar measure :data:`TEST_LAUNCH` after their files, exactly as
``sidecar run`` does (``evidence.pcr.measure_files(..., launch=...)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from cleanroom.app.emulators.softak import QUOTED_BANKS
from cleanroom.v1 import common_pb2
from evidence.launch import Launch
from evidence.pcr import Measurement, measure_files
from evidence.proto import bank_to_pb, launch_to_pb

#: The launch the simulated sidecars measure: the image's Python running the workload's script.
TEST_LAUNCH = Launch.create(
    argv=("/usr/bin/python3", "run.py"),
    executable_sha256=hashlib.sha256(b"the image's python3").digest(),
    env={"LANG": "C.UTF-8"},
    cwd="/srv/cleanroom/workload",
)


def with_test_launch(manifest: common_pb2.WorkloadManifest) -> common_pb2.WorkloadManifest:
    """``manifest`` with :data:`TEST_LAUNCH` as its launch (modified in place and returned)."""
    manifest.launch.CopyFrom(launch_to_pb(TEST_LAUNCH))
    return manifest


def measure_workload(root: Path, files: Sequence[tuple[str, bytes]]) -> Measurement:
    """Writes ``files`` (relative path, content) under ``root`` and measures them in the
    software AK's banks, named by their relative paths, with :data:`TEST_LAUNCH` after them, as
    a simulated sidecar's event log has it."""
    paths = []
    for rel, data in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return measure_files(paths, QUOTED_BANKS, names=[rel for rel, _ in files], launch=TEST_LAUNCH)


def approved_manifest(name: str, measured: Measurement) -> common_pb2.WorkloadManifest:
    """The manifest a party approves for ``measured``: its files (the launch event is the
    manifest's launch, :data:`TEST_LAUNCH`)."""
    manifest = with_test_launch(common_pb2.WorkloadManifest(name=name))
    for e in measured.events:
        if e.launch is not None:
            continue
        entry = manifest.entries.add(path=e.path, size=e.size)
        for bank, value in e.digests.items():
            entry.digests.add(algorithm=bank_to_pb(bank), value=value)
    return manifest
