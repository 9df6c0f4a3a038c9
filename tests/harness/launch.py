"""A launch for tests and benchmarks whose sidecar side is simulated (software quotes).

Every approval covers a launch and every event log ends with the launch event, so tests that
build evidence without a real sidecar measure :data:`TEST_LAUNCH` after their files, exactly as
``sidecar run`` does (``evidence.pcr.measure_files(..., launch=...)``).
"""

from __future__ import annotations

import hashlib

from cleanroom.v1 import common_pb2
from evidence.launch import Launch
from evidence.proto import launch_to_pb

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
