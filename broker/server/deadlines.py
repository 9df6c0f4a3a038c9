"""One thread that runs callbacks at deadlines: how the broker ends streams that stall.

A streaming call's handler blocks a worker thread while it waits for the client's next message.
A client that opens an ``AttestStream``, takes its challenge and never sends the evidence would
hold that thread for as long as it keeps the connection open; :class:`Deadlines` cancels such a
call when its nonce expires (the evidence could no longer be accepted anyway). One thread serves
every stream: a timer thread per stream would cost a thread start on every attestation.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from cleanroom.closing import Closeable

log = logging.getLogger("cleanroom.broker.server")


def _nothing() -> None:
    pass


class Deadline:
    """A scheduled callback; :meth:`cancel` it when the work finished in time."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """The callback will not run (if it has not started already). Idempotent."""
        self.cancelled = True
        # The entry stays in the heap until its time comes; it must not keep the call (and
        # everything the callback refers to) alive until then.
        self.callback = _nothing


class Deadlines(Closeable):
    """Runs each scheduled callback once its time (``time.monotonic()``) has come, on one
    daemon thread started on first use. Use as a context manager or call :meth:`close`."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def schedule(self, delay_seconds: float, callback: Callable[[], None]) -> Deadline:
        """Runs ``callback`` in ``delay_seconds`` unless the returned deadline is cancelled."""
        deadline = Deadline(time.monotonic() + max(0.0, delay_seconds), callback)
        with self._cond:
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline.when, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="broker-deadlines", daemon=True
                )
                self._thread.start()
            elif earliest is None or deadline.when < earliest:
                # Only a new earliest deadline needs the thread awake; streams scheduled with
                # the same TTL arrive in order, so the common case costs no wake-up.
                self._cond.notify()
        return deadline

    def pending(self) -> int:
        """Deadlines neither run nor cancelled yet (for tests and metrics)."""
        with self._cond:
            return sum(1 for _, _, d in self._heap if not d.cancelled)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    # Cancelled entries are dropped as they reach the top.
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._closed:
                    return
                _, _, due = heapq.heappop(self._heap)
            try:
                due.callback()
            except Exception:
                log.exception("a deadline callback failed")

    def close(self) -> None:
        """Stops the thread; pending callbacks do not run. Idempotent; a later
        :meth:`schedule` starts a new thread."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=5)
        with self._cond:
            if self._thread is None:
                self._closed = False


__all__ = ["Deadline", "Deadlines"]
