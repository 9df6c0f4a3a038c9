"""``cleanroom sidecar ...``: the attester and workload runtime inside the confidential VM."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("sidecar", help="TPM attester and workload runtime")
    group = parser.add_subparsers(dest="sidecar_command", metavar="SUBCOMMAND", required=True)
    add_pending(group, "enroll", "create or load the EK and AK and write the enrollment material")
    add_pending(group, "measure", "measure files into PCR 23 and print the PCR values")
    add_pending(group, "quote", "quote PCR 23 with a nonce into tpm2_quote-format files")
    add_pending(group, "run", "attest, then run the workload with plaintext over a local socket")
