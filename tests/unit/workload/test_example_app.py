"""The example workload end to end: through in-memory SDK streams, through a real sidecar data
path on a Unix socket (in this process and as ``python -m workload.example``), and its exit
statuses."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecar.dataplane import ProcessTree
from tests.unit.workload.dataplane_session import (
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
    """The SDK's two calls over in-memory CSV inputs; an output is kept only if its ``with``
    block completes, as the sidecar commits it only then."""

    def __init__(self, inputs: dict[str, bytes]) -> None:
        self.inputs = inputs
        self.outputs: dict[str, bytes] = {}

    def read_csv(self, name: str) -> Iterator[dict[str, str]]:
        if name not in self.inputs:
            raise InputNotFoundError(f"input {name!r}: no such input")
        return csv.DictReader(io.StringIO(self.inputs[name].decode()))

    @contextmanager
    def create_output(self, name: str) -> Iterator[io.BytesIO]:
        buffer = io.BytesIO()
        yield buffer
        self.outputs[name] = buffer.getvalue()


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
    real_ids = {r["user_id"] for r in csv.DictReader(io.StringIO(DATA.advertiser.decode()))}
    assert not real_ids & {r["user_id"] for r in rows}
    assert not any(uid in insights_bytes.decode() for uid in real_ids)


def test_runs_end_to_end_over_memory_streams(capsys: pytest.CaptureFixture[str]) -> None:
    sdk = MemorySDK({"advertiser": DATA.advertiser, "publisher": DATA.publisher})
    assert app.main(["--seed", "1"], sdk=sdk, env={}) == app.EXIT_OK
    assert set(sdk.outputs) == {"insights.json", "synthetic.csv"}
    _check_outputs(sdk.outputs["insights.json"], sdk.outputs["synthetic.csv"])
    err = capsys.readouterr().err
    assert "wrote insights.json and synthetic.csv" in err
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
    assert sealed == {"insights.json.sealed", "synthetic.csv.sealed"}
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
