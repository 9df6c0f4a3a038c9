"""The ``cleanroom`` command: one entry point whose subcommand groups live in their packages.

Each domain package has a ``cli`` module with ``register(subparsers)``; handlers take the parsed
arguments and return an exit code. Handlers import their heavy dependencies lazily so that
``cleanroom --help`` and short commands start fast. The library never calls ``sys.exit``; this
module catches the project's one root error (:class:`cleanroom.errors.CleanroomError`), prints
one clear line and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from cleanroom import __version__
from cleanroom.errors import CleanroomError
from cleanroom.logs import StderrHandler

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


#: Top-level modules of the optional dependency groups (pyproject.toml), for the one-line hint
#: a command that needs a group that is not installed prints.
_EXTRA_OF: dict[str, str] = {
    "sqlalchemy": "broker",
    "alembic": "broker",
    "psycopg": "broker",
    "prometheus_client": "broker",
    "grpc_reflection": "broker",
    "azure": "azure",
    "numpy": "example",
    "pandas": "example",
    "sklearn": "example",
    "scipy": "example",
    "matplotlib": "example",
    "pyarrow": "example",
}


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from cleanroom.app.completion import complete_if_asked

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


def call_handler(call: Callable[[], int], *, verbose: int) -> int:
    """Runs a command's handler the way ``main`` does: the project's errors become one line on
    stderr and exit status 1, Ctrl-C 130, a closed stdout 141. (The prepared sidecar runs
    ``sidecar run`` in a forked process through this too, so both report failures alike.)"""
    try:
        return call()
    except BrokenPipeError:
        # The reader went away (`cleanroom open ... | head`): stop quietly, as `cat` does, with
        # the status a process killed by SIGPIPE has. Further writes to stdout (the
        # interpreter flushes it at exit) go to /dev/null instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    except CleanroomError as e:
        print(f"cleanroom: error: {e.user_message}", file=sys.stderr)
        if verbose:
            logging.getLogger("cleanroom").exception("details")
        return 1
    except KeyboardInterrupt:
        print("cleanroom: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"cleanroom: error: this command needs the optional dependency group {extra!r} "
            f"(pip install 'cleanroom-broker[{extra}]'): {e}",
            file=sys.stderr,
        )
        return 1


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
    level = logging.DEBUG if verbose >= 2 else logging.WARNING
    logging.getLogger("azure").setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
