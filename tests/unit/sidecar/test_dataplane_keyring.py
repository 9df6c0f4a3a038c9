"""The session key ring: keys only while the attestation holds, re-attestation on expiry."""

from __future__ import annotations

import copy
import pickle
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.dataplane import (
    AttestationExpiredError,
    KeyRing,
    ReattestationError,
    UnknownDataKeyError,
)
from sidecar.errors import SidecarError

KEY = bytes(range(32))


class Clock:
    """A settable clock (the key ring takes its clock as an argument)."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_serves_keys_while_valid() -> None:
    clock = Clock()
    ring = KeyRing(valid_until=clock.now + timedelta(minutes=5), clock=clock)
    ring.add("k1", KEY)
    assert ring.data_key("k1") == KEY
    with ring.borrow("k1") as key:
        assert bytes(key) == KEY
    assert bytes(key) == bytes(32), "a borrowed copy is wiped after use"
    assert "k1" in ring and len(ring) == 1 and ring.key_ids == ("k1",)


def test_unknown_key() -> None:
    ring = KeyRing(valid_until=None)
    with pytest.raises(UnknownDataKeyError, match="'nope'"):
        ring.data_key("nope")


def test_repr_and_errors_never_show_keys() -> None:
    ring = KeyRing(valid_until=None)
    ring.add("k1", KEY)
    text = repr(ring) + str(ring)
    assert KEY.hex() not in text and repr(KEY) not in text
    assert "1 key" in repr(ring)
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    with pytest.raises(TypeError):
        copy.copy(ring)


def test_clear_wipes_the_buffers() -> None:
    ring = KeyRing(valid_until=None)
    ring.add("k1", KEY)
    stored = ring._keys["k1"]  # the buffer that held the key
    with ring:
        pass
    assert stored == bytearray(32)
    assert len(ring) == 0
    with pytest.raises(UnknownDataKeyError):
        ring.data_key("k1")


def test_replacing_a_key_wipes_the_old_one() -> None:
    ring = KeyRing(valid_until=None)
    ring.add("k1", KEY)
    old = ring._keys["k1"]
    ring.add("k1", b"\x01" * 32)
    assert old == bytearray(32)
    assert ring.data_key("k1") == b"\x01" * 32


def test_expired_without_callback_refuses() -> None:
    clock = Clock()
    ring = KeyRing(valid_until=clock.now + timedelta(seconds=10), clock=clock)
    ring.add("k1", KEY)
    clock.now += timedelta(seconds=10)
    with pytest.raises(AttestationExpiredError, match="expired"):
        ring.data_key("k1")
    with pytest.raises(SidecarError):
        ring.check()


def test_expiry_calls_reattest_once_and_renews() -> None:
    clock = Clock()
    calls: list[datetime] = []

    def reattest() -> datetime:
        calls.append(clock.now)
        return clock.now + timedelta(minutes=5)

    ring = KeyRing(valid_until=clock.now + timedelta(seconds=1), reattest=reattest, clock=clock)
    ring.add("k1", KEY)
    ring.check()
    assert calls == []
    clock.now += timedelta(seconds=2)
    assert ring.data_key("k1") == KEY
    assert ring.data_key("k1") == KEY
    assert len(calls) == 1
    assert ring.valid_until == clock.now + timedelta(minutes=5)


def test_failed_reattest_denies_and_is_retried() -> None:
    clock = Clock()
    outcomes: list[Exception | None] = [RuntimeError("broker said no: policy P7"), None]

    def reattest() -> datetime:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return clock.now + timedelta(minutes=1)

    ring = KeyRing(valid_until=clock.now, reattest=reattest, clock=clock)
    ring.add("k1", KEY)
    with pytest.raises(ReattestationError, match="re-attestation failed") as info:
        ring.data_key("k1")
    assert isinstance(info.value.__cause__, RuntimeError)
    # The next use tries again, and succeeds this time.
    assert ring.data_key("k1") == KEY


def test_reattest_returning_a_past_expiry_is_a_failure() -> None:
    clock = Clock()
    ring = KeyRing(valid_until=clock.now, reattest=lambda: clock.now, clock=clock)
    with pytest.raises(ReattestationError, match="not in the future"):
        ring.check()


def test_reattest_may_replace_keys() -> None:
    clock = Clock()
    ring: KeyRing

    def reattest() -> datetime:
        ring.add("k1", b"\x02" * 32)
        return clock.now + timedelta(minutes=1)

    ring = KeyRing(valid_until=clock.now, reattest=reattest, clock=clock)
    ring.add("k1", KEY)
    assert ring.data_key("k1") == b"\x02" * 32


def test_check_key_renews_and_then_requires_the_key() -> None:
    clock = Clock()

    def reattest() -> datetime:
        # The renewal releases k2 only: k1 is dropped.
        ring.clear()
        ring.add("k2", KEY)
        return clock.now + timedelta(minutes=5)

    ring = KeyRing(valid_until=clock.now + timedelta(minutes=5), reattest=reattest, clock=clock)
    ring.add("k1", KEY)
    ring.check_key("k1")
    clock.now += timedelta(minutes=10)
    with pytest.raises(UnknownDataKeyError, match="'k1' is no longer in the key ring"):
        ring.check_key("k1")
    ring.check_key("k2")
    expired = KeyRing(valid_until=clock.now - timedelta(seconds=1), clock=clock)
    expired.add("k1", KEY)
    with pytest.raises(AttestationExpiredError):
        expired.check_key("k1")


def test_one_reattestation_for_many_threads() -> None:
    clock = Clock()
    calls = 0

    def reattest() -> datetime:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        return clock.now + timedelta(minutes=1)

    ring = KeyRing(valid_until=clock.now, reattest=reattest, clock=clock)
    ring.add("k1", KEY)
    threads = [threading.Thread(target=ring.data_key, args=("k1",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        KeyRing(valid_until=datetime(2030, 1, 1))
    ring = KeyRing(valid_until=None)
    with pytest.raises(ValueError, match="aware"):
        ring.set_valid_until(datetime(2030, 1, 1))
