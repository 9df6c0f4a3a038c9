"""The example workload's entry point (``python -m workload.example``): read both parties'
inputs through the workload SDK with pandas, analyse them, write ``insights.json``,
``synthetic.csv`` and ``report.html``.

Inputs are CSV or Parquet (recognised by Parquet's ``PAR1`` magic). Everything is computed
before the first output is written, so a failure leaves no output behind.

Exit status: 0 on success; 2 when the inputs or the arguments are unusable (a missing column,
too few people in common); 1 when the sidecar fails (unreachable, an input tampered with, an
output refused).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final, Literal, Protocol, cast

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from workload.client import seekable_copy
from workload.errors import WorkloadError
from workload.example import analysis as A
from workload.example.errors import ExampleError, InputDataError
from workload.example.report import render
from workload.example.synthetic import synthesize

ADVERTISER_INPUT_ENV: Final = "CLEANROOM_EXAMPLE_ADVERTISER_INPUT"
PUBLISHER_INPUT_ENV: Final = "CLEANROOM_EXAMPLE_PUBLISHER_INPUT"
K_ENV: Final = "CLEANROOM_EXAMPLE_K"
SEED_ENV: Final = "CLEANROOM_EXAMPLE_SEED"
EXIT_OK: Final = 0
EXIT_SIDECAR: Final = 1
EXIT_INPUT: Final = 2
NUMERIC: Final = (*A.ADVERTISER_NUMERIC, *A.PUBLISHER_NUMERIC)


class WorkloadIO(Protocol):
    """The part of the workload SDK this workload uses; :class:`workload.Client` is one."""

    def open_input(self, name: str) -> AbstractContextManager[io.RawIOBase | io.BufferedIOBase]: ...

    def create_output(
        self, name: str
    ) -> AbstractContextManager[io.RawIOBase | io.BufferedIOBase]: ...


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to read, what to write and how to analyse (see ``--help``)."""

    advertiser_input: str = "advertiser"
    publisher_input: str = "publisher"
    insights_output: str = "insights.json"
    synthetic_output: str = "synthetic.csv"
    report_output: str = "report.html"
    k: int = A.DEFAULT_K
    test_fraction: float = A.DEFAULT_TEST_FRACTION
    l2: float = A.DEFAULT_L2
    synthetic_rows: int | None = None
    exclude_real_rows: Literal["all", "rare"] = "all"
    seed: int | None = None


def read_input(sdk: WorkloadIO, name: str, *, source: str) -> pd.DataFrame:
    """An input as strings, from its plaintext stream: CSV through ``pandas.read_csv``, Parquet
    (which needs random access to its footer) through an in-memory copy.

    Raises:
        InputDataError: the input is not CSV or Parquet that pandas can parse.
        WorkloadError: the SDK failed to read it (see :class:`workload.InputStream`).
    """
    with (
        sdk.open_input(name) as raw,
        io.BufferedReader(cast(io.RawIOBase, raw), 1 << 20) as stream,
    ):
        try:
            if stream.peek(4)[:4] == b"PAR1":
                # Parquet needs its footer first: a bounded in-memory copy, never a file.
                # validate() types the columns; a Parquet null becomes an empty value there.
                return pq.read_table(seekable_copy(stream, name=name)).to_pandas()
            return pd.read_csv(stream, dtype=str, keep_default_na=False)
        except (ValueError, OSError):
            # The parser's message can quote the data; name only the input.
            raise InputDataError(
                f"{source} input is not a CSV or Parquet file pandas can read"
            ) from None


def run(sdk: WorkloadIO, options: Options) -> A.Analysis:
    """Reads both inputs, analyses them, then writes the three outputs.

    Raises:
        ExampleError: the data cannot be analysed (nothing is written).
        WorkloadError: the SDK failed to read an input or to commit an output.
        ValueError: an option is out of range.
    """
    advertiser = A.validate(
        read_input(sdk, options.advertiser_input, source="advertiser"),
        source="advertiser",
        numeric=A.ADVERTISER_NUMERIC,
    )
    publisher = A.validate(
        read_input(sdk, options.publisher_input, source="publisher"),
        source="publisher",
        numeric=A.PUBLISHER_NUMERIC,
        categorical=A.PUBLISHER_CATEGORICAL,
    )
    analysis = A.analyze(
        advertiser,
        publisher,
        k=options.k,
        test_fraction=options.test_fraction,
        l2=options.l2,
        seed=options.seed,
    )
    real = analysis.joined.drop(columns=A.ID_COLUMN)
    synthetic, redrawn = synthesize(
        real,
        rows=options.synthetic_rows or len(real),
        k=options.k,
        categorical=A.PUBLISHER_CATEGORICAL,
        numeric=NUMERIC,
        by="segment",
        rng=np.random.default_rng(options.seed),
        exclude_ids=pd.concat([advertiser[A.ID_COLUMN], publisher[A.ID_COLUMN]]),
        exclude=options.exclude_real_rows,
    )
    analysis.insights["synthetic"] = {
        "method": "gaussian_copula_per_segment",
        "rows": len(synthetic),
        "columns": list(synthetic.columns),
        "excluded_real_rows": options.exclude_real_rows,
        "redrawn_share": redrawn,
    }
    document = json.dumps(analysis.insights, indent=2, allow_nan=False) + "\n"
    report = render(
        analysis.insights,
        by_segment=analysis.by_segment,
        two_way=analysis.by_segment_and_age_band,
        roc=analysis.roc,
        real=real,
        synthetic=synthetic,
        columns=[*NUMERIC, *A.PUBLISHER_CATEGORICAL],
    )
    with sdk.create_output(options.insights_output) as out:
        out.write(document.encode())
    with sdk.create_output(options.synthetic_output) as out:
        synthetic.to_csv(out, index=False, lineterminator="\n", chunksize=65_536)
    with sdk.create_output(options.report_output) as out:
        out.write(report.encode())
    return analysis


def _checked(kind: type[float], test: str, ok: object) -> object:
    def parse(text: str) -> float:
        value = kind(text)
        if not ok(value):  # type: ignore[operator]
            raise argparse.ArgumentTypeError(test)
        return value

    return parse


def options_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Options:
    """Options from the command line, with defaults from the environment.

    Raises:
        SystemExit: the arguments are invalid (argparse prints why; status 2).
    """
    env = os.environ if env is None else env
    positive = _checked(int, "must be a positive integer", lambda v: v >= 1)
    p = argparse.ArgumentParser(
        prog="python -m workload.example",
        description="The example clean-room workload: join the advertiser's and the "
        "publisher's data, train a conversion model, write aggregate insights, synthetic data "
        "and an HTML report. Runs under the clean-room sidecar.",
    )
    p.add_argument("--advertiser-input", default=env.get(ADVERTISER_INPUT_ENV, "advertiser"))
    p.add_argument("--publisher-input", default=env.get(PUBLISHER_INPUT_ENV, "publisher"))
    p.add_argument("--insights-output", default="insights.json")
    p.add_argument("--synthetic-output", default="synthetic.csv")
    p.add_argument("--report-output", default="report.html")
    p.add_argument("-k", type=positive, default=env.get(K_ENV, str(A.DEFAULT_K)))  # type: ignore[arg-type]
    p.add_argument(
        "--test-fraction",
        type=_checked(float, "must be strictly between 0 and 1", lambda v: 0 < v < 1),  # type: ignore[arg-type]
        default=A.DEFAULT_TEST_FRACTION,
    )
    p.add_argument(
        "--l2",
        type=_checked(float, "must be a non-negative number", lambda v: 0 <= v < float("inf")),  # type: ignore[arg-type]
        default=A.DEFAULT_L2,
    )
    p.add_argument("--synthetic-rows", type=positive, default=None)  # type: ignore[arg-type]
    p.add_argument("--exclude-real-rows", choices=("all", "rare"), default="all")
    p.add_argument("--seed", type=int, default=env.get(SEED_ENV))
    args = p.parse_args(argv)
    return Options(**{k: v for k, v in vars(args).items()})


def main(
    argv: Sequence[str] | None = None,
    *,
    sdk: WorkloadIO | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Runs the workload; returns the exit status (see the module docstring).

    ``sdk`` defaults to the sidecar client named by ``CLEANROOM_WORKLOAD_SOCKET``.
    """
    options = options_from_args(argv, env)
    try:
        if sdk is None:
            from workload import default_client

            run(default_client(), options)
        else:
            run(sdk, options)
    except ExampleError as e:
        print(f"example workload: {e}", file=sys.stderr)
        return EXIT_INPUT
    except WorkloadError as e:
        print(f"example workload: {e}", file=sys.stderr)
        return EXIT_SIDECAR
    # Counts stay out of the log: the operator who reads it is not one of the parties.
    names = (options.insights_output, options.synthetic_output, options.report_output)
    print(f"example workload: wrote {', '.join(names)}", file=sys.stderr)
    return EXIT_OK
