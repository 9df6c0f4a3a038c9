"""``cleanroom pki ...``: a CA and SPIFFE-identity certificates for mTLS."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_pending(sub, "pki", "create a CA and issue SPIFFE certificates")
