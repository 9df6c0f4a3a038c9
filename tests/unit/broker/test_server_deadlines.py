"""broker.server.deadlines: callbacks run at their deadline, once, unless cancelled."""

from __future__ import annotations

import threading
import time

from broker.server.deadlines import Deadlines


def test_a_deadline_runs_once_and_a_cancelled_one_never() -> None:
    ran: list[str] = []
    done = threading.Event()
    with Deadlines() as deadlines:
        cancelled = deadlines.schedule(0.05, lambda: ran.append("cancelled"))

        def due() -> None:
            ran.append("due")
            done.set()

        deadlines.schedule(0.1, due)
        cancelled.cancel()
        assert done.wait(5)
        time.sleep(0.1)
        assert deadlines.pending() == 0
    assert ran == ["due"]


def test_an_earlier_deadline_wakes_the_thread() -> None:
    order: list[str] = []
    done = threading.Event()
    with Deadlines() as deadlines:
        deadlines.schedule(30, lambda: order.append("late"))
        start = time.monotonic()

        def early() -> None:
            order.append("early")
            done.set()

        deadlines.schedule(0.05, early)
        assert done.wait(5)
        assert time.monotonic() - start < 5
        assert deadlines.pending() == 1
    # Closing drops what is pending.
    assert order == ["early"]


def test_a_failing_callback_does_not_stop_the_thread() -> None:
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    with Deadlines() as deadlines:
        deadlines.schedule(0.01, boom)
        deadlines.schedule(0.05, done.set)
        assert done.wait(5)


def test_a_cancelled_deadline_lets_go_of_its_callback() -> None:
    import gc
    import weakref

    class Call:
        def cancel(self) -> None:
            pass

    with Deadlines() as deadlines:
        # An earlier, live deadline keeps the cancelled one from the top of the heap, where
        # the thread would drop it anyway.
        deadlines.schedule(30, lambda: None)
        call = Call()
        ref = weakref.ref(call)
        deadlines.schedule(60, call.cancel).cancel()
        del call
        gc.collect()
        assert ref() is None
