"""``cleanroom demo``: the two-party clean room, end to end, on embedded defaults."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


class DemoError(Exception):
    """Root of the errors the demo raises."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_pending(sub, "demo", "run the two-party clean room locally")
