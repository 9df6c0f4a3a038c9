"""``cleanroom admin ...``: the operators' and parties' client of the broker's admin service."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_pending(sub, "admin", "manage EKs, AKs, golden PCR sets, parties, keys, approvals, audit")
