"""Token buckets per key (an AK name, a peer identity) for the challenge endpoint.

Each key gets a bucket of ``burst`` tokens refilled at ``rate`` per second; a request takes one
token or is refused. Buckets that have refilled completely carry no information and are dropped
when the table grows, so memory stays bounded however many distinct keys callers invent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

#: The table is pruned of full buckets when it grows past this many keys.
PRUNE_THRESHOLD: Final = 10_000


class TokenBucketLimiter:
    """Per-key token buckets. Thread-safe.

    Raises:
        ValueError: (from the constructor) a non-positive rate or burst.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = PRUNE_THRESHOLD,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def try_acquire(self, key: str) -> bool:
        """Takes one token from ``key``'s bucket; False when the bucket is empty."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._prune(now)
            return True

    def _prune(self, now: float) -> None:
        full = [
            k
            for k, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) > 2 * self._max_keys:
            # Callers are inventing keys faster than buckets refill: forget the least recently
            # used half (they get a fresh bucket, which the per-peer limit still bounds).
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in by_age[: len(by_age) // 2]:
                del self._buckets[k]

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


__all__ = ["PRUNE_THRESHOLD", "TokenBucketLimiter"]
