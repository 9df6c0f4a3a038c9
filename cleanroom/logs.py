"""Logging support shared by every ``cleanroom`` command."""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    A plain ``StreamHandler(sys.stderr)`` keeps the stream that was ``sys.stderr`` when it was
    made. When that was a temporary stream (a test's output capture, an embedding application's
    redirect) that has since been replaced and closed, every later record, from any thread,
    fails with a "--- Logging error ---" traceback instead of being written. Looking the stream
    up at each emit (as :data:`logging.lastResort` does) avoids that.
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        # StreamHandler.__init__ would store a stream; this handler has none of its own.
        logging.Handler.__init__(self, level)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        # setStream() lands here: a handler that follows sys.stderr has no stream to replace.
        raise AttributeError("StderrHandler always writes to the current sys.stderr")
