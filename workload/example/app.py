"""The example workload's entry point: read both parties' inputs through the workload SDK, run
:func:`workload.example.analysis.analyze`, write ``insights.json`` and ``synthetic.csv``.

Run it under the sidecar as ``python -m workload.example``. It reaches its data only through
the SDK (:class:`WorkloadIO`, by default the sidecar client from ``CLEANROOM_WORKLOAD_SOCKET``)
and never sees a key. Everything is computed before the first output is written, so a failure
in the analysis leaves no output behind.

Exit status: 0 on success; 2 when the inputs or the arguments are unusable (a missing column,
too few people in common); 1 when the sidecar fails (unreachable, an input tampered with, an
output refused).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import numpy as np

from workload.errors import WorkloadError
from workload.example.analysis import (
    DEFAULT_K,
    DEFAULT_L2,
    DEFAULT_TEST_FRACTION,
    ID_COLUMN,
    Analysis,
    Table,
    analyze,
    read_advertiser,
    read_publisher,
)
from workload.example.errors import ExampleError

__all__ = [
    "ADVERTISER_INPUT_ENV",
    "EXIT_INPUT",
    "EXIT_OK",
    "EXIT_SIDECAR",
    "K_ENV",
    "PUBLISHER_INPUT_ENV",
    "SEED_ENV",
    "BinarySink",
    "Options",
    "WorkloadIO",
    "insights_json",
    "main",
    "options_from_args",
    "run",
    "write_synthetic_csv",
]

ADVERTISER_INPUT_ENV: Final = "CLEANROOM_EXAMPLE_ADVERTISER_INPUT"
PUBLISHER_INPUT_ENV: Final = "CLEANROOM_EXAMPLE_PUBLISHER_INPUT"
K_ENV: Final = "CLEANROOM_EXAMPLE_K"
SEED_ENV: Final = "CLEANROOM_EXAMPLE_SEED"

EXIT_OK: Final = 0
EXIT_SIDECAR: Final = 1
EXIT_INPUT: Final = 2

_CSV_CHUNK_ROWS: Final = 65_536


class BinarySink(Protocol):
    """A writable binary stream (an SDK output)."""

    def write(self, data: bytes, /) -> object: ...


class WorkloadIO(Protocol):
    """The part of the workload SDK this workload uses; :class:`workload.Client` is one."""

    def read_csv(self, name: str) -> Iterable[Mapping[str, str]]: ...

    def create_output(self, name: str) -> AbstractContextManager[BinarySink]: ...


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to read, what to write and how to analyse."""

    advertiser_input: str = "advertiser"
    publisher_input: str = "publisher"
    insights_output: str = "insights.json"
    synthetic_output: str = "synthetic.csv"
    k: int = DEFAULT_K
    test_fraction: float = DEFAULT_TEST_FRACTION
    l2: float = DEFAULT_L2
    synthetic_rows: int | None = None
    exclude_real_rows: Literal["all", "rare"] = "all"
    #: None draws fresh randomness for the split and the synthetic data.
    seed: int | None = None


def insights_json(insights: Mapping[str, object]) -> bytes:
    """The insights document as UTF-8 JSON (strict: no NaN or infinity).

    Raises:
        ValueError: a figure is not finite.
    """
    return (json.dumps(insights, indent=2, allow_nan=False) + "\n").encode()


def write_synthetic_csv(table: Table, out: BinarySink) -> None:
    """Writes ``table`` as UTF-8 CSV (``user_id`` then the data columns), in chunks."""
    columns = [*table.numeric.values(), *table.categorical.values()]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([ID_COLUMN, *table.columns])
    for start in range(0, len(table), _CSV_CHUNK_ROWS):
        stop = start + _CSV_CHUNK_ROWS
        ids = [uid.decode() for uid in table.ids[start:stop].tolist()]
        writer.writerows(zip(ids, *(c[start:stop].tolist() for c in columns), strict=True))
        out.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        out.write(buffer.getvalue().encode())


def run(sdk: WorkloadIO, options: Options) -> Analysis:
    """Reads both inputs, analyses them, then writes both outputs.

    Raises:
        InputDataError, InsufficientDataError, ModelFitError, SynthesisError: the data cannot
            be analysed (nothing is written).
        WorkloadError: the SDK failed to read an input or to commit an output.
        ValueError: an option is out of range.
    """
    advertiser = read_advertiser(sdk.read_csv(options.advertiser_input))
    publisher = read_publisher(sdk.read_csv(options.publisher_input))
    analysis = analyze(
        advertiser,
        publisher,
        k=options.k,
        test_fraction=options.test_fraction,
        l2=options.l2,
        synthetic_rows=options.synthetic_rows,
        exclude_real_rows=options.exclude_real_rows,
        rng=np.random.default_rng(options.seed),
    )
    document = insights_json(analysis.insights)
    with sdk.create_output(options.insights_output) as out:
        out.write(document)
    with sdk.create_output(options.synthetic_output) as out:
        write_synthetic_csv(analysis.synthetic, out)
    return analysis


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError("must be strictly between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a non-negative number")
    return value


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workload.example",
        description=(
            "The example clean-room workload: join the advertiser's and the publisher's data, "
            "train a conversion model, write aggregate insights and synthetic data. Runs under "
            "the clean-room sidecar."
        ),
    )
    p.add_argument(
        "--advertiser-input",
        default=env.get(ADVERTISER_INPUT_ENV, "advertiser"),
        help=f"advertiser's input name (${ADVERTISER_INPUT_ENV}, default advertiser)",
    )
    p.add_argument(
        "--publisher-input",
        default=env.get(PUBLISHER_INPUT_ENV, "publisher"),
        help=f"publisher's input name (${PUBLISHER_INPUT_ENV}, default publisher)",
    )
    p.add_argument("--insights-output", default="insights.json", help="(insights.json)")
    p.add_argument("--synthetic-output", default="synthetic.csv", help="(synthetic.csv)")
    p.add_argument(
        "-k",
        type=_positive_int,
        default=env.get(K_ENV, str(DEFAULT_K)),
        help=f"smallest group any published figure may describe (${K_ENV}, default {DEFAULT_K})",
    )
    p.add_argument(
        "--test-fraction",
        type=_fraction,
        default=DEFAULT_TEST_FRACTION,
        help=f"held-out share of the joined rows ({DEFAULT_TEST_FRACTION})",
    )
    p.add_argument(
        "--l2", type=_non_negative, default=DEFAULT_L2, help=f"L2 penalty ({DEFAULT_L2})"
    )
    p.add_argument(
        "--synthetic-rows",
        type=_positive_int,
        default=None,
        help="synthetic rows to write (default: as many as the join)",
    )
    p.add_argument(
        "--exclude-real-rows",
        choices=("all", "rare"),
        default="all",
        help=(
            "redraw synthetic rows equal to any real row (all, the default) or only to a real "
            "row fewer than k people share (rare)"
        ),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=env.get(SEED_ENV),
        help=f"random seed for the split and the synthetic data (${SEED_ENV}; default: fresh)",
    )
    return p


def options_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Options:
    """Options from the command line, with defaults from the environment.

    Raises:
        SystemExit: the arguments are invalid (argparse prints why; status 2).
    """
    args = _parser(os.environ if env is None else env).parse_args(argv)
    return Options(
        advertiser_input=args.advertiser_input,
        publisher_input=args.publisher_input,
        insights_output=args.insights_output,
        synthetic_output=args.synthetic_output,
        k=args.k,
        test_fraction=args.test_fraction,
        l2=args.l2,
        synthetic_rows=args.synthetic_rows,
        exclude_real_rows=args.exclude_real_rows,
        seed=args.seed,
    )


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

            sdk = default_client()
        run(sdk, options)
    except ExampleError as e:
        print(f"example workload: {e}", file=sys.stderr)
        return EXIT_INPUT
    except WorkloadError as e:
        print(f"example workload: {e}", file=sys.stderr)
        return EXIT_SIDECAR
    # Counts stay out of the log: the operator who reads it is not one of the parties.
    print(
        f"example workload: wrote {options.insights_output} and {options.synthetic_output}",
        file=sys.stderr,
    )
    return EXIT_OK
