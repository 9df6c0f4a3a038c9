"""The plumbing every ``cleanroom admin`` command shares: the connection options, the client
they open, and the text or JSON output.

It lives apart from the commands (``broker.admin_cli``, ``broker.admin_status``) so that each
command module imports it at module level and no command module imports another.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, TextIO

from broker.errors import AdminUsageError

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from broker.client import BrokerClient

Handler = Callable[[argparse.Namespace], int]

#: Where the broker listens unless told otherwise (the broker's default ``tls.listen``).
DEFAULT_BROKER: Final = "127.0.0.1:50051"
ENV_BROKER: Final = "CLEANROOM_ADMIN_BROKER"
ENV_CERT: Final = "CLEANROOM_ADMIN_CERT"
ENV_KEY: Final = "CLEANROOM_ADMIN_KEY"
ENV_CA: Final = "CLEANROOM_ADMIN_CA"
ENV_TIMEOUT: Final = "CLEANROOM_ADMIN_TIMEOUT"
ENV_SERVER_NAME: Final = "CLEANROOM_ADMIN_SERVER_NAME"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; ``(none)`` for no rows."""
    if not rows:
        return "(none)\n"
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in (headers, *rows)
    ]
    return "\n".join(lines) + "\n"


def format_fields(fields: Sequence[tuple[str, str]]) -> str:
    """``name: value`` lines with the values aligned."""
    width = max(len(k) for k, _ in fields) + 1
    return "".join(f"{(k + ':').ljust(width)} {v}\n" for k, v in fields)


def format_time(ts: Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return ""
    when = dt.datetime.fromtimestamp(ts.seconds, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


class Output:
    """Prints either JSON (one document per command) or human-readable text."""

    def __init__(self, *, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, doc: object, text: str) -> None:
        if self.as_json:
            self.stream.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        else:
            self.stream.write(text)


def _setting(args: argparse.Namespace, attr: str, env: str, option: str) -> str:
    value = getattr(args, attr, None) or os.environ.get(env)
    if not value:
        raise AdminUsageError(f"no {option} given: pass {option} or set {env}")
    return str(value)


@contextmanager
def open_client(args: argparse.Namespace) -> Iterator[BrokerClient]:
    """The client for the connection options in ``args`` (falling back to the environment).

    Raises:
        AdminUsageError: a certificate, key or CA file is not named, or the timeout is bad.
        ClientSetupError: a file is unusable or the broker address is malformed.
    """
    from broker.client import BrokerClient

    target = getattr(args, "broker", None) or os.environ.get(ENV_BROKER) or DEFAULT_BROKER
    cert = _setting(args, "tls_cert", ENV_CERT, "--cert")
    key = _setting(args, "tls_key", ENV_KEY, "--key")
    ca = _setting(args, "tls_ca", ENV_CA, "--ca")
    timeout_text = getattr(args, "timeout", None) or os.environ.get(ENV_TIMEOUT) or "10"
    try:
        timeout = float(timeout_text)
    except ValueError:
        raise AdminUsageError(f"--timeout {timeout_text!r} is not a number") from None
    if timeout <= 0:
        raise AdminUsageError("--timeout must be positive")
    server_name = getattr(args, "server_name", None) or os.environ.get(ENV_SERVER_NAME) or None
    client = BrokerClient.connect(
        target=target,
        cert_file=cert,
        key_file=key,
        ca_file=ca,
        timeout=timeout,
        server_name=server_name,
    )
    with client:
        yield client


def output_for(args: argparse.Namespace) -> Output:
    return Output(as_json=bool(getattr(args, "json", False)))


def connection_options(
    p: argparse.ArgumentParser, *, leaf: bool, skip: frozenset[str] = frozenset()
) -> None:
    """The global options. On leaves they are hidden and only override what was given before
    the command group, so ``admin --json ak list`` and ``admin ak list --json`` both work.
    ``skip`` leaves out options whose spelling the leaf uses for something else."""

    def kw(help_text: str) -> dict[str, Any]:
        if leaf:
            return {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        return {"default": None, "help": help_text}

    options = [
        (
            "--broker",
            "broker",
            "HOST:PORT",
            f"the broker's address (env {ENV_BROKER}; default {DEFAULT_BROKER})",
        ),
        ("--cert", "tls_cert", "FILE", f"client certificate PEM (env {ENV_CERT})"),
        ("--key", "tls_key", "FILE", f"client private key PEM (env {ENV_KEY})"),
        ("--ca", "tls_ca", "FILE", f"CA bundle PEM (env {ENV_CA})"),
        ("--timeout", "timeout", "SECONDS", f"per-call deadline (env {ENV_TIMEOUT}; default 10)"),
        (
            "--server-name",
            "server_name",
            "NAME",
            "the DNS name the broker's certificate carries, when --broker is an address that is "
            f"not it (env {ENV_SERVER_NAME})",
        ),
    ]
    for flag, dest, metavar, help_text in options:
        if flag not in skip:
            p.add_argument(flag, dest=dest, metavar=metavar, **kw(help_text))
    if leaf:
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    else:
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def command_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    p = sub.add_parser(name, help=help_text, description=help_text)
    return p.add_subparsers(dest=f"admin_{name}_command", metavar="SUBCOMMAND", required=True)


def leaf_command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    func: Handler,
    *,
    skip: frozenset[str] = frozenset(),
) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help_text, description=help_text)
    connection_options(p, leaf=True, skip=skip)
    p.set_defaults(func=func)
    return p
