"""The benchmark commands that docs/sidecar-run.md shows, run (with fewer runs) as shown.

The figures themselves are not checked: the machine is shared. What is checked is that the
command works and prints the lines the page quotes, so the page cannot point at a command that
no longer exists or no longer reports what it says.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.docs import ROOT


@pytest.mark.swtpm
def test_the_start_up_benchmark_runs_as_documented() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEANROOM_", "TPM2TOOLS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_startup", "--runs", "1", "--timeline"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "sidecar run -> first plaintext byte: median " in out
    assert "baseline (same workload, plaintext from a local file): median " in out
    assert "sidecar start-up milestones" in out and "workload started" in out
