"""The sealing, verification and data-path benchmarks run as docs/benchmarks.md shows them.

These are smoke runs on tiny sizes: they check that each benchmark measures its baselines in
the same run and reports ratios to them, not how fast anything is (figures come from bench/,
never from timed tests).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _bench(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_sealing_benchmark_reports_ratios_to_aes_gcm() -> None:
    out = _bench("bench_sealing", "--size", "8", "--repeat", "1")
    assert "AES-256-GCM encrypt (baseline)" in out and "AES-256-GCM decrypt (baseline)" in out
    assert "of encrypt" in out.split("seal:", 1)[1].splitlines()[0]
    assert "of decrypt" in out.split("open: OpenReader.copy_to", 1)[1].splitlines()[0]


@pytest.mark.slow
@pytest.mark.tpm2tools
def test_verify_benchmark_reports_both_baselines() -> None:
    out = _bench("bench_verify", "--seconds", "0.2", "--checkquote-runs", "2")
    assert "bare signature check" in out
    assert "x the bare check" in out
    assert "tpm2_checkquote, 1 process/quote" in out
    assert "SEV-SNP verify_hcl_report" in out and "x the quote's time" in out


@pytest.mark.slow
def test_datapath_benchmark_reports_both_baselines_and_memory(tmp_path: Path) -> None:
    out = _bench("bench_datapath", "--size", "32M", "--output-dir", str(tmp_path))
    assert "AES-256-GCM decrypt, one core (baseline a)" in out
    assert "bare gRPC stream, read direction (baseline b)" in out
    read_row = next(line for line in out.splitlines() if line.startswith("DATA PATH read"))
    write_row = next(line for line in out.splitlines() if line.startswith("DATA PATH write"))
    # Each data-path row carries its ratio to both baselines and the sidecar's peak RSS.
    for row in (read_row, write_row):
        assert len(row.split()) >= 10, row


@pytest.mark.slow
def test_peercheck_benchmark_reports_the_decrypt_baseline() -> None:
    out = _bench("bench_peercheck", "--rounds", "200")
    assert "full peer check" in out and "per-chunk check as served" in out
    rows = [line for line in out.splitlines() if line.startswith("decrypting one")]
    assert len(rows) == 2 and all(
        "(baseline)" in r and "the per-chunk check adds" in r for r in rows
    )
