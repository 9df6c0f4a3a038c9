"""``cleanroom completion bash|zsh``: the shell code that completes ``cleanroom`` commands and
options (argcomplete).

Install it once per user, e.g. ``cleanroom completion bash > ~/.local/share/bash-completion/
completions/cleanroom`` (bash-completion loads it on first use), or for zsh
``cleanroom completion zsh > "${fpath[1]}/_cleanroom"``. The shell then runs ``cleanroom``
with argcomplete's variables set; :func:`complete_if_asked` answers from the full command tree
and exits before any command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

SHELLS = ("bash", "zsh")


def complete_if_asked(build: Callable[[], argparse.ArgumentParser]) -> None:
    """When the shell asks for completions (argcomplete's ``_ARGCOMPLETE`` is set), writes them
    and exits; otherwise returns at once. ``build`` makes the whole parser (called only then).
    """
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(build())


def _completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["cleanroom"], shell=args.shell))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print the shell completion code (bash or zsh)",
        description=(
            "Prints the code that completes cleanroom's commands and options in SHELL. "
            "bash: cleanroom completion bash > ~/.local/share/bash-completion/completions/"
            'cleanroom; zsh: cleanroom completion zsh > "${fpath[1]}/_cleanroom".'
        ),
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    p.set_defaults(func=_completion)


__all__ = ["SHELLS", "complete_if_asked", "register"]
