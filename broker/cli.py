"""``cleanroom broker ...``: run and operate the key broker."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("broker", help="run the key broker and verify evidence")
    group = parser.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    add_pending(group, "serve", "serve the attestation and admin services over mTLS")
    add_pending(group, "verify-quote", "verify tpm2_quote output against an AK and golden values")
