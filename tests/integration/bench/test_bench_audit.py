"""The audit-append benchmark, run tiny against the session's PostgreSQL: it measures its
baseline in the same run, reports each figure as a ratio to it, and the chain its appenders
(each with its own engine) built verifies."""

from __future__ import annotations

import re

import pytest

from bench import bench_audit

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_tiny_run_reports_ratios_to_the_plain_insert_baseline(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_audit.main(
        ["--url", postgres_url, "--seconds", "0.3", "--appenders", "1,3", "--processes", "2",
         "--nonces", "20000"]
    )  # fmt: skip
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+[\d,]+/s", line)]
    assert [r[0] for r in rows] == ["1", "3"], out
    for r in rows:
        # appenders, baseline/s, audit/s, ratio, nonce/s, ratio
        assert float(r[1].rstrip("/s").replace(",", "")) > 0
        assert float(r[2].replace(",", "")) > 0 and r[3].endswith("x")
        assert float(r[4].replace(",", "")) > 0 and r[5].endswith("x")
    assert re.search(r"audit chain after the run: verifies, [\d,]+ records", out), out
    assert re.search(r"audit append ceiling: [\d,]+ appends/s", out), out
