"""Running a command's handler as the ``cleanroom`` command does (its one-line errors and exit
statuses), for the command itself and for the processes that run a command on its behalf (the
prepared sidecar's forked runs, docs/sidecar-run.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from cleanroom.errors import CleanroomError

__all__ = ["call_handler"]

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


def call_handler(call: Callable[[], int], *, verbose: int) -> int:
    """Runs a command's handler the way ``cleanroom`` does: the project's errors become one
    line on stderr and exit status 1, Ctrl-C 130, a closed stdout 141. (The prepared sidecar
    runs ``sidecar run`` in a forked process through this too, so both report failures alike.)

    Raises:
        ModuleNotFoundError: a missing module that is not one of an optional group's.
    """
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
            import logging

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
