"""A one-line progress bar for the command line, shared by the ``cleanroom`` commands that move
large streams (``seal``, ``open``, the demo)."""

from __future__ import annotations

import sys
import time
from typing import IO, Final

#: Inputs at least this large get a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD: Final = 64 << 20


class Progress:
    """A one-line progress bar on a terminal, redrawn at most ten times a second.

    It draws nothing unless ``stream`` is a terminal and the work is large: ``total`` at least
    ``threshold`` bytes, or, when the total is unknown, once ``threshold`` bytes went by.
    """

    def __init__(
        self,
        *,
        label: str,
        total: int | None,
        stream: IO[str] | None = None,
        threshold: int = PROGRESS_THRESHOLD,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._label = label
        self._total = total
        self._threshold = threshold
        self._enabled = self._stream.isatty() and (total is None or total >= threshold)
        self._done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, n: int) -> None:
        """Counts ``n`` more bytes done."""
        self._done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 and (self._total is not None or self._done >= self._threshold):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self._done / elapsed / 1e6
        if self._total:
            frac = min(self._done / self._total, 1.0)
            width = 30
            fill = int(frac * width)
            bar = "#" * fill + "-" * (width - fill)
            line = f"{self._label} [{bar}] {frac:6.1%} {self._done / 1e6:,.0f} MB {rate:,.0f} MB/s"
        else:
            line = f"{self._label} {self._done / 1e6:,.0f} MB {rate:,.0f} MB/s"
        self._stream.write("\r" + line + "\x1b[K")
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """Draws the last state and ends the line, if anything was drawn."""
        if self._drawn:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
