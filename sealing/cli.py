"""``cleanroom seal``, ``cleanroom open`` and ``cleanroom keygen``."""

from __future__ import annotations

import argparse

from cleanroom.cli import add_pending


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_pending(sub, "keygen", "generate a party's recipient key pair")
    add_pending(sub, "seal", "seal a file or stdin to one or more recipients")
    add_pending(sub, "open", "open a sealed file with a recipient private key")
