"""``cleanroom demo``: the two-party clean room, end to end, on embedded defaults.

One command runs what a deployment runs, on one machine and without an Azure account or a
hardware TPM: a CA and certificates, a broker (SQLite, local KEK), a software TPM, two parties
that seal sample data and approve the example workload, the sidecar that measures, attests and
runs it, and each party opening its outputs. Then it shows a tampered workload being refused.
With ``--azure-emulators`` the same runs over Azure Blob Storage (Azurite) and an Azure Key
Vault KEK (a local test double of its REST API). See docs/demo.md and docs/azure.md.

This module stays light (``cleanroom --help`` imports it); the work is in
:mod:`cleanroom.app.demo.run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cleanroom.app.demo.errors import (
    DemoError,
    PrerequisiteError,
    ServiceError,
    StepError,
    UnexpectedOutcomeError,
    WorkspaceError,
)

__all__ = [
    "DEFAULT_ROWS",
    "DEFAULT_SEED",
    "DemoError",
    "PrerequisiteError",
    "ServiceError",
    "StepError",
    "UnexpectedOutcomeError",
    "WorkspaceError",
    "register",
]

#: Rows per party by default: big enough for a model worth showing, small enough for seconds.
DEFAULT_ROWS = 5_000
#: The sample data's default seed; the same seed gives the same data, byte for byte.
DEFAULT_SEED = 7


def _rows(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {text!r}") from None
    if value < 100:
        # The example workload needs enough people in common to train and test a model.
        raise argparse.ArgumentTypeError("--rows must be at least 100")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the two-party clean room locally",
        description=(
            "Runs the whole clean room on this machine: a CA and certificates, a broker "
            "(SQLite, local KEK), a software TPM (swtpm), an advertiser and a publisher that "
            "seal sample data and approve the example workload, the sidecar that measures, "
            "attests and runs it, and both parties opening their outputs. Then it changes one "
            "byte of the workload and shows that the broker refuses to release keys. Every "
            "process it starts is stopped at the end, also on Ctrl-C; its files stay in one "
            "directory."
        ),
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for the demo's files (default: a new ./cleanroom-demo-<timestamp>, or "
        "a new temporary directory when the current one is not writable). An existing DIR "
        "must be empty or hold an earlier demo, which is replaced",
    )
    p.add_argument(
        "--rows",
        type=_rows,
        default=DEFAULT_ROWS,
        metavar="N",
        help=f"rows of sample data per party (default {DEFAULT_ROWS:,}; larger makes a smoke test)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="S",
        help=f"seed of the sample data and the workload's randomness (default {DEFAULT_SEED})",
    )
    p.add_argument(
        "--no-tamper",
        action="store_true",
        help="skip the runs with a tampered workload and with another command",
    )
    p.add_argument(
        "--azure-emulators",
        action="store_true",
        help="run the Azure backends locally: the sealed inputs and outputs go through blob "
        "containers in Azurite (the Azure Storage emulator, installed by `make setup`) and the "
        "broker wraps both parties' data keys with keys in a local test double of Azure Key "
        "Vault's REST API; no Azure account is needed or used",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failed step, run the remaining independent steps (the tamper check) "
        "before exiting non-zero",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from cleanroom.app.demo.run import DemoOptions, main

    options = DemoOptions(
        directory=args.dir,
        rows=args.rows,
        seed=args.seed,
        tamper=not args.no_tamper,
        keep_going=args.keep_going,
        verbose=args.verbose,
        azure_emulators=args.azure_emulators,
    )
    return main(options)
