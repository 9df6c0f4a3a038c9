"""The example workload end to end: through in-memory SDK streams, through a real sidecar data
path on a Unix socket (in this process and as ``python -m workload.example``, with CSV and
Parquet inputs), its exit statuses, and that no suppressed cell reaches any output."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from sidecar.dataplane import ProcessTree
from tests.support.dataplane import (
    Party,
    only_this_process,
    open_sealed,
    running_session,
)
from workload import Client
from workload.errors import InputNotFoundError
from workload.example import app
from workload.example.sampledata import generate

ROOT = Path(__file__).resolve().parents[3]
DATA = generate(3000, 99)
ADVERTISER = Party("advertiser")
PUBLISHER = Party("publisher")


class MemorySDK:
    """The SDK's two calls over in-memory inputs; an output is kept only if its ``with`` block
    completes, as the sidecar commits it only then."""

    def __init__(self, inputs: dict[str, bytes]) -> None:
        self.inputs = inputs
        self.outputs: dict[str, bytes] = {}

    def open_input(self, name: str) -> io.BytesIO:
        if name not in self.inputs:
            raise InputNotFoundError(f"input {name!r}: no such input")
        return io.BytesIO(self.inputs[name])

    @contextmanager
    def create_output(self, name: str) -> Iterator[io.BytesIO]:
        buffer = io.BytesIO()
        yield buffer
        self.outputs[name] = buffer.getvalue()


OUTPUTS = {"insights.json", "synthetic.csv", "report.html"}


def _check_report(report: bytes) -> None:
    text = report.decode()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 3
    # Self-contained: nothing is fetched when a party opens it (links stay inside the page or
    # are data: URIs, as matplotlib embeds the heat map's raster).
    targets = re.findall(r'(?:href|src)\s*=\s*"([^"]*)"', text)
    assert targets and all(t.startswith(("#", "data:image/png;base64,")) for t in targets)
    assert "url(http" not in text and "@import" not in text


def _real_ids() -> set[str]:
    return {
        r["user_id"]
        for data in (DATA.advertiser, DATA.publisher)
        for r in csv.DictReader(io.StringIO(data.decode()))
    }


def _check_outputs(insights_bytes: bytes, synthetic_bytes: bytes) -> None:
    insights = json.loads(insights_bytes)
    assert insights["join"]["overlap"] == DATA.counts.overlap == 2100
    assert insights["evaluation"]["test_auc"] > 0.65
    assert insights["evaluation"]["n_train"] + insights["evaluation"]["n_test"] == 2100
    rows = list(csv.DictReader(io.StringIO(synthetic_bytes.decode())))
    assert len(rows) == 2100
    assert list(rows[0]) == [
        "user_id",
        "impressions",
        "clicks",
        "conversions",
        "page_views",
        "segment",
        "age_band",
        "device",
    ]
    real_ids = _real_ids()
    assert not real_ids & {r["user_id"] for r in rows}
    assert not any(uid in insights_bytes.decode() for uid in real_ids)


def test_runs_end_to_end_over_memory_streams(capsys: pytest.CaptureFixture[str]) -> None:
    sdk = MemorySDK({"advertiser": DATA.advertiser, "publisher": DATA.publisher})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_OK
    assert set(sdk.outputs) == OUTPUTS
    _check_outputs(sdk.outputs["insights.json"], sdk.outputs["synthetic.csv"])
    _check_report(sdk.outputs["report.html"])
    report = sdk.outputs["report.html"].decode()
    assert not any(uid in report for uid in _real_ids())
    err = capsys.readouterr().err
    assert "wrote insights.json, synthetic.csv, report.html" in err
    assert "2100" not in err  # no figures in the operator's log


def test_same_seed_same_outputs() -> None:
    a = MemorySDK({"advertiser": DATA.advertiser, "publisher": DATA.publisher})
    b = MemorySDK({"advertiser": DATA.advertiser, "publisher": DATA.publisher})
    assert app.main(["--seed", "5"], sdk=a, env={}) == 0
    assert app.main(["--seed", "5"], sdk=b, env={}) == 0
    assert a.outputs == b.outputs


def test_input_and_output_names_and_k_are_configurable() -> None:
    sdk = MemorySDK({"adv-2024": DATA.advertiser, "pub-2024": DATA.publisher})
    env = {app.ADVERTISER_INPUT_ENV: "adv-2024", app.K_ENV: "40", app.SEED_ENV: "2"}
    argv = ["--publisher-input", "pub-2024", "--insights-output", "out/ins.json"]
    assert app.main(argv, sdk=sdk, env=env) == 0
    insights = json.loads(sdk.outputs["out/ins.json"])
    assert insights["k"] == 40
    assert "synthetic.csv" in sdk.outputs


def test_missing_column_exits_2_and_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    broken = "\n".join(
        ",".join(line.split(",")[:3]) for line in DATA.advertiser.decode().splitlines()
    ).encode()
    sdk = MemorySDK({"advertiser": broken, "publisher": DATA.publisher})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_INPUT
    assert sdk.outputs == {}
    assert "missing column(s) conversions" in capsys.readouterr().err


def test_too_small_a_join_exits_2() -> None:
    small = generate(50, 3, overlap=0.1)
    sdk = MemorySDK({"advertiser": small.advertiser, "publisher": small.publisher})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_INPUT
    assert sdk.outputs == {}


def test_unknown_input_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    sdk = MemorySDK({"advertiser": DATA.advertiser})
    assert app.main([], sdk=sdk, env={}) == app.EXIT_SIDECAR
    assert "'publisher'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-k", "0"], ["--test-fraction", "1"], ["--l2", "-1"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        app.options_from_args(argv, env={})
    assert info.value.code == 2


def test_runs_through_a_real_sidecar_data_path(tmp_path: Path) -> None:
    with (
        running_session(
            tmp_path,
            inputs={
                "advertiser": (DATA.advertiser, ADVERTISER),
                "publisher": (DATA.publisher, PUBLISHER),
            },
            recipients=[ADVERTISER, PUBLISHER],
            allowed_peer=only_this_process,
        ) as session,
        Client(session.socket) as client,
    ):
        assert app.main(["--seed", "3"], sdk=client, env={}) == app.EXIT_OK
    sealed = {p.name for p in session.output_dir.iterdir()}
    assert sealed == {f"{name}.sealed" for name in OUTPUTS}
    for party in (ADVERTISER, PUBLISHER):
        _check_outputs(
            open_sealed(session.output_dir / "insights.json.sealed", party.recipient),
            open_sealed(session.output_dir / "synthetic.csv.sealed", party.recipient),
        )


def test_module_runs_under_the_sidecar_as_a_process(tmp_path: Path) -> None:
    tree = ProcessTree()
    with running_session(
        tmp_path,
        inputs={
            "advertiser": (DATA.advertiser, ADVERTISER),
            "publisher": (DATA.publisher, PUBLISHER),
        },
        recipients=[ADVERTISER],
        allowed_peer=tree,
    ) as session:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workload.example", "--seed", "4"],
            cwd=ROOT,
            env=session.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        tree.set_root(proc.pid)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    _check_outputs(
        open_sealed(session.output_dir / "insights.json.sealed", ADVERTISER.recipient),
        open_sealed(session.output_dir / "synthetic.csv.sealed", ADVERTISER.recipient),
    )


def test_module_without_a_sidecar_exits_1() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CLEANROOM_WORKLOAD_SOCKET"}
    done = subprocess.run(
        [sys.executable, "-m", "workload.example"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == app.EXIT_SIDECAR
    assert "CLEANROOM_WORKLOAD_SOCKET is not set" in done.stderr
    assert "Traceback" not in done.stderr


def _parquet(csv_bytes: bytes) -> bytes:
    buffer = io.BytesIO()
    pd.read_csv(io.BytesIO(csv_bytes), dtype=str).to_parquet(buffer, index=False)
    return buffer.getvalue()


def test_parquet_inputs_run_end_to_end_under_the_sidecar(tmp_path: Path) -> None:
    tree = ProcessTree()
    with running_session(
        tmp_path,
        inputs={
            "advertiser": (_parquet(DATA.advertiser), ADVERTISER),
            "publisher": (DATA.publisher, PUBLISHER),
        },
        recipients=[PUBLISHER],
        allowed_peer=tree,
    ) as session:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workload.example", "--seed", "4"],
            cwd=ROOT,
            env=session.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        tree.set_root(proc.pid)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    _check_outputs(
        open_sealed(session.output_dir / "insights.json.sealed", PUBLISHER.recipient),
        open_sealed(session.output_dir / "synthetic.csv.sealed", PUBLISHER.recipient),
    )


def test_a_parquet_null_is_named_by_row_and_column(capsys: pytest.CaptureFixture[str]) -> None:
    publisher = pd.read_csv(io.BytesIO(DATA.publisher), dtype=str)
    publisher.loc[4, "segment"] = None
    buffer = io.BytesIO()
    publisher.to_parquet(buffer, index=False)
    sdk = MemorySDK({"advertiser": DATA.advertiser, "publisher": buffer.getvalue()})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_INPUT
    assert "publisher input, row 5: column segment is empty" in capsys.readouterr().err


def test_an_unreadable_input_is_named_without_its_content(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sdk = MemorySDK({"advertiser": b"PAR1 not really parquet secret", "publisher": DATA.publisher})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_INPUT
    err = capsys.readouterr().err
    assert "advertiser input is not a CSV or Parquet file" in err and "secret" not in err
    assert sdk.outputs == {}


def _with_small_cell(size: int) -> tuple[bytes, bytes, set[str]]:
    """The sample inputs changed so that exactly ``size`` joined people are finance readers
    aged 55+, every one of whom converted: a cell below k whose figures (``size`` users, a 100%
    rate) would stand out in any output."""
    adv = pd.read_csv(io.BytesIO(DATA.advertiser), dtype=str)
    pub = pd.read_csv(io.BytesIO(DATA.publisher), dtype=str)
    joined = pub[pub.user_id.isin(adv.user_id)]
    cell = joined[(joined.segment == "finance") & (joined.age_band == "55+")].user_id
    assert len(cell) > size
    pub.loc[pub.user_id.isin(cell[size:]), "age_band"] = "45-54"
    kept = set(cell[:size])
    converted = adv.user_id.isin(kept)
    adv.loc[converted, ["clicks", "conversions"]] = "1"
    return adv.to_csv(index=False).encode(), pub.to_csv(index=False).encode(), kept


def test_suppressed_cells_never_appear_in_any_output() -> None:
    advertiser, publisher, _ = _with_small_cell(7)
    sdk = MemorySDK({"advertiser": advertiser, "publisher": publisher})
    assert app.main(["--seed", "2"], sdk=sdk, env={}) == app.EXIT_OK

    insights = json.loads(sdk.outputs["insights.json"])
    cells = insights["conversion_rates"]["by_segment_and_age_band"]
    finance = {c["age_band"]: c for c in cells if c["segment"] == "finance"}
    assert finance["55+"] == {
        "segment": "finance",
        "age_band": "55+",
        "users": None,
        "converters": None,
        "conversion_rate": None,
        "suppressed": True,
    }
    # Its cover: another finance cell is hidden so that subtraction cannot recover it.
    assert sum(c["suppressed"] for c in finance.values()) == 2
    published = [c for c in cells if not c["suppressed"]]
    assert all(c["users"] >= 10 and c["conversion_rate"] < 1 for c in published)

    # The report draws the hidden cells as hatched placeholders without a figure: no 100%
    # rate (no published cell has one), and as many "suppressed" marks as hidden cells.
    report = sdk.outputs["report.html"].decode()
    assert "100%" not in report
    assert report.count(">suppressed<") == sum(c["suppressed"] for c in cells)

    # No synthetic person belongs to the small cell either.
    synthetic = pd.read_csv(io.BytesIO(sdk.outputs["synthetic.csv"]), dtype=str)
    assert not ((synthetic.segment == "finance") & (synthetic.age_band == "55+")).any()
