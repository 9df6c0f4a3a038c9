"""The demo's voice: one line per step, naming the identity that acted, and progress bars.

Steps go to stdout, so ``cleanroom demo > demo.txt`` keeps the story; progress bars go to
stderr and only when it is a terminal (:class:`cleanroom.progress.Progress` decides).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Final

from cleanroom.progress import Progress

__all__ = ["PROGRESS_THRESHOLD", "Narrator", "human_bytes", "short_hex"]

#: Steps that move at least this many bytes get a progress bar (on a terminal).
PROGRESS_THRESHOLD: Final = 16 << 20
_ACTOR_WIDTH: Final = 13


def human_bytes(n: int) -> str:
    """``312 KiB``, ``1.4 MiB``, ``87 B``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def short_hex(value: bytes | str, digits: int = 12) -> str:
    """The first ``digits`` hex digits and an ellipsis."""
    text = value.hex() if isinstance(value, bytes) else value
    return text if len(text) <= digits else text[:digits] + "…"


class Narrator:
    """Prints the demo's steps and summary."""

    def __init__(self, *, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def say(self, actor: str, message: str) -> None:
        """One step: ``[actor]  what happened``."""
        self.out.write(f"{('[' + actor + ']').ljust(_ACTOR_WIDTH)} {message}\n")
        self.out.flush()

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def summary(self, title: str, rows: Sequence[tuple[str, str]]) -> str:
        """Prints aligned ``name: value`` rows under a title (an empty name continues the row
        above); returns the text printed."""
        width = max((len(k) for k, _ in rows), default=0) + 1
        lines = [title, *(f"  {(k + ':' if k else '').ljust(width)} {v}" for k, v in rows)]
        text = "\n".join(lines) + "\n"
        self.out.write(text)
        self.out.flush()
        return text

    @contextmanager
    def progress(self, label: str, total: int | None) -> Iterator[Progress]:
        """A progress bar for a step that moves ``total`` bytes; drawn only on a terminal and
        for large steps."""
        bar = Progress(label=label, total=total, stream=self.err, threshold=PROGRESS_THRESHOLD)
        try:
            yield bar
        finally:
            bar.finish()
