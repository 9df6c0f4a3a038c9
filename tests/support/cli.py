"""The installed ``cleanroom`` command, run as a user runs it (a new process, bytes in and out)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: The ``cleanroom`` command of the interpreter running the tests (this worktree's code).
CLEANROOM = Path(sys.executable).parent / "cleanroom"


def run_cleanroom(
    *args: str | Path,
    cwd: Path,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Runs ``cleanroom ARGS`` in ``cwd``, with ``env`` added to this process's environment.

    It never raises for a non-zero exit: the tests look at the return code and stderr.
    """
    return subprocess.run(
        [str(CLEANROOM), *map(str, args)],
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
