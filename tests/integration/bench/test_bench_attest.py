"""The attestation load benchmark, run short: a real broker, a load generator in its own process,
both baselines, and every attestation releasing both keys (which the load generator checks, and
opens some of)."""

from __future__ import annotations

import re

import pytest

from bench import bench_attest

pytestmark = [pytest.mark.slow, pytest.mark.tpm2tools]


def _rate(output: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)}\s+([\d,]+) /s", output)
    assert m, f"no {label!r} line in:\n{output}"
    return float(m.group(1).replace(",", ""))


@pytest.mark.parametrize("call", ["stream", "unary"])
def test_a_short_run_reports_rates_against_both_baselines(
    call: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_attest.main(
        [
            "--clients", "4", "--duration", "1.5", "--warmup", "0.5",
            "--checkquote-runs", "3", "--open-every", "5", "--attest-call", call,
            # Four clients attest far faster than a sidecar ever would.
            "--challenge-rate", "100000",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert _rate(out, "echo (GetBrokerInfo)") > 0
    assert _rate(out, "attestation (2 keys)") > 0
    assert _rate(out, "tpm2_checkquote, 1 process/quote") > 0
    assert re.search(r"attestations per echo call:\s+0\.\d+", out)
    assert "errors" not in out, out
    opened = re.search(r"opened and compared with the registered ones: (\d+)", out)
    assert opened and int(opened.group(1)) >= 8, out  # at least the warm-up of both phases


def test_the_breakdown_accounts_for_the_broker_work(capsys: pytest.CaptureFixture[str]) -> None:
    bench_attest.main(["--breakdown", "50"])
    out = capsys.readouterr().out
    assert re.search(r"broker's own CPU per attestation .*: [\d,]+ us", out), out
    for part in (
        "audit log: the attestation's records",
        "nonces: issue + the challenge's audit record",
        "release: unwrap + HPKE-seal one key per call (2x)",
        "quote: verify_quote (1x)",
    ):
        assert part in out, out
