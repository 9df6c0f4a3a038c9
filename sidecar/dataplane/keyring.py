"""The session's data keys, held in memory only while the attestation that released them holds.

The broker releases data keys to an attested sidecar for a limited lifetime. :class:`KeyRing`
keeps them in ``bytearray`` buffers (wiped by :meth:`KeyRing.clear`) and refuses to hand one
out once the lifetime has passed, unless the injected re-attestation callback renews it first.
``sidecar run`` supplies a callback that quotes again and asks the broker for a new lifetime
(and may :meth:`KeyRing.add` refreshed keys); the data path checks the key ring before every
chunk it serves, so an expired attestation stops plaintext flowing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from sidecar.dataplane.errors import (
    AttestationExpiredError,
    ReattestationError,
    UnknownDataKeyError,
)

__all__ = ["KeyRing", "ReattestCallback"]

_log = logging.getLogger(__name__)

#: Renews the attestation and returns its new expiry (an aware datetime). It may call
#: :meth:`KeyRing.add` to replace keys. Any exception it raises means "not renewed".
ReattestCallback = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class KeyRing:
    """Data keys by key id, usable until ``valid_until``; a context manager that wipes them.

    ``valid_until`` is the attestation's expiry (aware datetime; None means "no expiry", for
    tools and tests that hold keys by other means). Once ``clock()`` reaches it, the next
    :meth:`check` or :meth:`data_key` calls ``reattest``; only one thread re-attests at a time,
    the others wait for its outcome. The keys themselves never appear in ``repr`` or logs.

    Note that the AES implementation keeps its own copy of a key for as long as a stream that
    uses it is open; wiping here cannot reach that copy, which is why the data path also checks
    the key ring between chunks.
    """

    __slots__ = ("_clock", "_keys", "_lock", "_reattest", "_valid_until")

    def __init__(
        self,
        *,
        valid_until: datetime | None,
        reattest: ReattestCallback | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if valid_until is not None and valid_until.tzinfo is None:
            raise ValueError("valid_until must be an aware datetime")
        self._keys: dict[str, bytearray] = {}
        self._valid_until = valid_until
        self._reattest = reattest
        self._clock = clock
        # Reentrant so that the re-attestation callback may call add() while check() holds it.
        self._lock = threading.RLock()

    def add(self, key_id: str, key: bytes | bytearray | memoryview) -> None:
        """Stores a copy of ``key`` under ``key_id``, wiping any key it replaces.

        Raises:
            ValueError: ``key_id`` is empty or ``key`` is empty.
        """
        if not key_id:
            raise ValueError("a key id must not be empty")
        if len(key) == 0:
            raise ValueError(f"the key for {key_id!r} is empty")
        with self._lock:
            old = self._keys.get(key_id)
            if old is not None:
                old[:] = bytes(len(old))
            self._keys[key_id] = bytearray(key)

    @property
    def valid_until(self) -> datetime | None:
        """The current attestation expiry (None: no expiry)."""
        with self._lock:
            return self._valid_until

    def set_valid_until(self, valid_until: datetime | None) -> None:
        """Sets a new expiry (after an attestation made outside the callback).

        Raises:
            ValueError: ``valid_until`` is a naive datetime.
        """
        if valid_until is not None and valid_until.tzinfo is None:
            raise ValueError("valid_until must be an aware datetime")
        with self._lock:
            self._valid_until = valid_until

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys held, sorted."""
        with self._lock:
            return tuple(sorted(self._keys))

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            return key_id in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def check(self) -> None:
        """Makes sure the attestation is current, re-attesting when it has expired.

        Raises:
            AttestationExpiredError: expired, and no re-attestation callback was given.
            ReattestationError: expired, and the callback failed or returned a past expiry.
        """
        with self._lock:
            if self._valid_until is None or self._clock() < self._valid_until:
                return
            expired_at = self._valid_until
            if self._reattest is None:
                raise AttestationExpiredError(
                    f"the attestation expired at {expired_at.isoformat()} and cannot be renewed"
                )
            _log.info("attestation expired at %s; re-attesting", expired_at.isoformat())
            try:
                renewed = self._reattest()
            except Exception as e:
                # The callback's own message may be detailed; the log keeps it, the error
                # names only what the workload needs to know.
                _log.warning("re-attestation failed: %s", e)
                raise ReattestationError(
                    f"the attestation expired at {expired_at.isoformat()} and re-attestation "
                    f"failed ({type(e).__name__}); no more data is served"
                ) from e
            if renewed.tzinfo is None or renewed <= self._clock():
                raise ReattestationError(
                    "re-attestation returned an expiry that is not in the future; "
                    "no more data is served"
                )
            self._valid_until = renewed
            _log.info("attestation renewed until %s", renewed.isoformat())

    def check_key(self, key_id: str) -> None:
        """:meth:`check`, then makes sure the key ring still holds ``key_id``.

        The data path calls this between the chunks of a stream that opened with the key: a
        re-attestation replaces the keys with those the broker released this time, and a key
        it no longer releases must stop the streams that use it, although their cipher holds
        its own copy. One dictionary lookup besides :meth:`check`.

        Raises:
            AttestationExpiredError, ReattestationError: see :meth:`check`.
            UnknownDataKeyError: the key ring does not hold ``key_id`` (any more).
        """
        with self._lock:
            self.check()
            if key_id not in self._keys:
                raise UnknownDataKeyError(
                    f"data key {key_id!r} is no longer in the key ring (the broker did not "
                    "release it again when the attestation was renewed, or it was wiped); "
                    "no more data is served"
                )

    def data_key(self, key_id: str) -> bytes:
        """Returns the data key ``key_id`` after :meth:`check`.

        The result is a copy (the AEAD takes bytes); prefer :meth:`borrow`, which wipes its
        copy when done.

        Raises:
            AttestationExpiredError, ReattestationError: see :meth:`check`.
            UnknownDataKeyError: no key of that id.
        """
        self.check()
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise UnknownDataKeyError(f"no data key with id {key_id!r} was released")
            return bytes(key)

    @contextmanager
    def borrow(self, key_id: str) -> Iterator[bytearray]:
        """Yields a private copy of the data key ``key_id``, wiped when the block ends.

        Raises:
            AttestationExpiredError, ReattestationError: see :meth:`check`.
            UnknownDataKeyError: no key of that id.
        """
        self.check()
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise UnknownDataKeyError(f"no data key with id {key_id!r} was released")
            copy = bytearray(key)
        try:
            yield copy
        finally:
            copy[:] = bytes(len(copy))

    def clear(self) -> None:
        """Wipes and forgets every key. The key ring stays usable (it is simply empty)."""
        with self._lock:
            for key in self._keys.values():
                key[:] = bytes(len(key))
            self._keys.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clear()

    def __repr__(self) -> str:
        until = "no expiry" if self._valid_until is None else self._valid_until.isoformat()
        return f"KeyRing({len(self._keys)} key(s), valid until {until})"

    # A key ring is not data: pickling or copying it would scatter key copies around.
    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a KeyRing cannot be pickled or copied")
