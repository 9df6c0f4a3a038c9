"""Context-manager bases for the project's resources.

Many of our objects own something that must be released (a channel, a database engine, a
server thread, key material held in memory) and are used in a ``with`` block that releases it
on the way out, error or not. These bases give them that one behaviour: :class:`Closeable`
for resources released by ``close()``, :class:`Stoppable` for services stopped by ``stop()``
(:class:`Service` for those that a ``with`` block also starts), and :class:`AbortOnError` for
writers that commit on ``close()`` and must not commit when their block failed. They live in
the bottom package so that every package may use them, and they hold no state
(``__slots__ = ()``), so classes with slots may derive from them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import TYPE_CHECKING, Self


class _Exits(ABC):
    """What every base shares: leaving the ``with`` block releases the object, told whether
    the block failed."""

    __slots__ = ()

    @abstractmethod
    def _release(self, failed: bool) -> None: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release(exc_type is not None)


class _Released(_Exits):
    """``with`` returns the object itself."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self


class Closeable(_Released):
    """A resource released by :meth:`close`, which a ``with`` block calls on the way out."""

    __slots__ = ()

    @abstractmethod
    def close(self) -> None:
        """Releases the resource (implementations make a second call harmless)."""

    def _release(self, failed: bool) -> None:
        self.close()


class Stoppable(_Released):
    """A running service stopped by :meth:`stop`, which a ``with`` block calls on the way out."""

    __slots__ = ()

    @abstractmethod
    def stop(self) -> None:
        """Stops the service (implementations make a second call harmless)."""

    def _release(self, failed: bool) -> None:
        self.stop()


class Service(Stoppable):
    """A service that a ``with`` block starts (:meth:`start`) and stops on the way out."""

    __slots__ = ()

    @abstractmethod
    def start(self) -> None:
        """Starts the service."""

    def __enter__(self) -> Self:
        self.start()
        return self


class AbortOnError(_Exits):
    """A writer that commits on ``close()``: a ``with`` block that ends normally closes it
    (commits), one that raises calls :meth:`abort` instead, so a failed block never commits.

    Only ``__exit__`` is given here: file-like writers keep :class:`io.IOBase`'s ``__enter__``
    (which refuses a closed file), and their own ``close()``; list this base first so that its
    ``__exit__`` is the one that runs. Other writers add :class:`Closeable` after it for
    ``__enter__``.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Discards what was written; nothing is committed (a second call is harmless)."""

    def _release(self, failed: bool) -> None:
        if failed:
            self.abort()
        else:
            self.close()


__all__ = ["AbortOnError", "Closeable", "Service", "Stoppable"]
