"""The ``cleanroom`` command: one entry point whose subcommand groups live in their packages.

Each domain package has a ``cli`` module with ``register(subparsers)``; handlers take the parsed
arguments and return an exit code. Handlers import their heavy dependencies lazily so that
``cleanroom --help`` and short commands start fast. The library never calls ``sys.exit``; this
module catches the project's one root error (:class:`cleanroom.errors.CleanroomError`), prints
one clear line and exits non-zero.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from cleanroom import __version__
from cleanroom.handler import call_handler

# Not typing.TYPE_CHECKING: importing typing costs the thin client of the prepared sidecar
# 2 ms; type checkers treat any constant of this name alike.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# argparse, logging and the handlers' modules are imported inside the functions that use them:
# `sidecar run --prepared` (the prepared sidecar's thin client, docs/sidecar-run.md) needs none
# of them, and its start-up is on the way to the workload's first byte.

# (module holding register(), the top-level commands it registers). tests/unit/cleanroom/test_cli.py
# checks the command names against what each register() adds.
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("broker.cli", ("broker",)),
    ("broker.admin_cli", ("admin",)),
    ("sidecar.cli", ("sidecar",)),
    ("sealing.cli", ("keygen", "seal", "open")),
    ("pki.cli", ("pki",)),
    ("cleanroom.app.demo", ("demo",)),
    ("cleanroom.app.completion", ("completion",)),
)


def _command_of(argv: Sequence[str]) -> str | None:
    """The top-level command in ``argv``: its first argument that is not an option (the global
    options take no value)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or only the group that owns ``command``.

    Building every group's parsers costs about 70 ms of CPU (some 300 arguments and their
    help), which ``cleanroom sidecar run`` would pay on the way to the workload's first byte;
    so a known command gets only its own group. Without one (``--help``, a typo) all groups
    are registered, so that help and "invalid choice" list every command.
    """
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="cleanroom",
        description="TPM-attested key broker for data clean rooms.",
    )
    parser.add_argument("--version", action="version", version=f"cleanroom {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail (-vv for debug logs)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    owners = [mod for mod, names in _GROUPS if command in names]
    for mod in owners or [mod for mod, _ in _GROUPS]:
        importlib.import_module(mod).register(sub)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Lets ``-v``/``--verbose`` follow any subcommand too (``cleanroom admin ak list -v``).

    Each subcommand parser gets a hidden copy of the option that adds to the count given
    before the command (argparse copies the subcommand's values onto the main namespace, and a
    ``SUPPRESS`` default leaves the main count alone when the option is not repeated). A
    parser that already spells ``-v`` otherwise keeps its meaning. Arguments after a command's
    ``REMAINDER`` (``sidecar run ... PROGRAM -v``) stay the workload's.
    """
    import argparse

    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            taken = {s for a in child._actions for s in a.option_strings}
            if not taken & {"-v", "--verbose"}:
                child.add_argument(
                    "-v",
                    "--verbose",
                    action="count",
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )
            _verbose_everywhere(child)


def _prepared_run(argv: Sequence[str]) -> tuple[str, list[str], int] | None:
    """``(PATH, COMMAND, verbosity)`` when ``argv`` is exactly ``[-v...] sidecar run [-v...]
    --prepared PATH [-v...] -- COMMAND...``, else None (argparse then parses it as usual)."""
    verbose, path, i = 0, None, 0
    while i < len(argv) and argv[i] in ("-v", "-vv", "--verbose"):
        verbose += 1 if argv[i] == "--verbose" else len(argv[i]) - 1
        i += 1
    if list(argv[i : i + 2]) != ["sidecar", "run"]:
        return None
    i += 2
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return (path, list(argv[i + 1 :]), verbose) if path else None
        if arg == "--prepared" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--prepared="):
            path, i = arg.split("=", 1)[1], i + 1
        elif arg in ("-v", "-vv", "--verbose"):
            verbose, i = verbose + (1 if arg == "--verbose" else len(arg) - 1), i + 1
        else:
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prepared = _prepared_run(argv)
    if prepared is not None:
        # The prepared sidecar's thin client: the same command argparse would dispatch, without
        # building the parser (tens of milliseconds before the workload's first byte).
        from sidecar.control import run_prepared

        path, words, level = prepared
        return call_handler(lambda: run_prepared(path, words, verbose=level), verbose=level)
    import logging

    from cleanroom.app.completion import complete_if_asked
    from cleanroom.logs import StderrHandler

    # The shell asking for completions: answer from the whole tree and exit.
    complete_if_asked(build_parser)
    command = _command_of(argv)
    if command in ("admin", "sidecar") and not _debugging(argv):
        # gRPC's C core prints handshake failures to stderr in its own format (three lines
        # and an abseil banner) before the call fails; the client's error says the same in
        # one line, naming the file to fix. -vv (or GRPC_VERBOSITY) shows them again.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    # The handler looks sys.stderr up at each record, so main() can run in a process whose
    # stderr is replaced later (tests capturing output, embedding) without leaving a handler
    # that writes to the old, possibly closed stream; force=True replaces an earlier call's.
    logging.basicConfig(
        level=level,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[StderrHandler()],
        force=True,
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    _quiet_azure_sdk(args.verbose)
    return call_handler(lambda: int(func(args)), verbose=args.verbose)


def _debugging(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for debug logs (``-vv``, or ``-v`` twice), wherever it says so."""
    count = 0
    for arg in argv:
        if arg == "--":
            break
        if arg == "--verbose":
            count += 1
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
    return count >= 2


def _quiet_azure_sdk(verbose: int) -> None:
    """The Azure SDK logs every HTTP request and response, headers included, at INFO: useful
    when debugging a Key Vault or Blob problem, noise otherwise. Only ``-vv`` (debug) shows it;
    its warnings and errors always pass."""
    import logging

    level = logging.DEBUG if verbose >= 2 else logging.WARNING
    logging.getLogger("azure").setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
