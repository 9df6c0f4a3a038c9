"""``cleanroom broker kek rotate --config FILE``: replace the local KEK (see
:mod:`broker.kek_rotate`). Imports the broker's storage only when run, so that building the
command tree needs no database driver."""

from __future__ import annotations

import argparse
from pathlib import Path


def _rotate(args: argparse.Namespace) -> int:
    from broker.config import load_broker_config
    from broker.kek_rotate import rotate_local_kek

    done = rotate_local_kek(load_broker_config(args.config))
    if done.resumed:
        print(f"finished an interrupted rotation: {done.kek_file} is the new KEK")
    else:
        print(f"database: {done.database}: {done.rewrapped} data key(s) rewrapped")
    print(f"local KEK: {done.kek_file} (fingerprint {done.new_fingerprint})")
    print(
        f"previous KEK: {done.previous_file} (fingerprint {done.old_fingerprint}): destroy it "
        "once backups hold the new one; copy the new one to replicas before they start"
    )
    return 0


def register_kek(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``broker kek rotate`` to the ``broker`` command group."""
    p = group.add_parser("kek", help="the broker's local key-encryption key")
    sub = p.add_subparsers(dest="broker_kek_command", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser(
        "rotate",
        help="replace the local KEK, rewrapping every data key it wraps (brokers stopped)",
        description=(
            "Creates a new local KEK, rewraps every data key the local KEK wraps under it and "
            "records its fingerprint, in one transaction with an audit record (kek.rotate); "
            "then puts the new kek.key in place and keeps the old one as kek.key.previous. "
            "Stop every broker serving the database first. Running it again after an "
            "interruption finishes or restarts the rotation."
        ),
    )
    r.add_argument(
        "--config",
        "-c",
        type=Path,
        required=True,
        help="broker TOML file (its database_url and state_dir)",
    )
    r.set_defaults(func=_rotate)


__all__ = ["register_kek"]
