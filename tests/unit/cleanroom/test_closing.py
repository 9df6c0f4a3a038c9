"""The context-manager bases of :mod:`cleanroom.closing`: what a ``with`` block calls on the way
out, with and without an error, and that a file-like writer keeps :class:`io.IOBase`'s
``__enter__``."""

from __future__ import annotations

import io

import pytest

from cleanroom.closing import AbortOnError, Closeable, Service, Stoppable


class Calls:
    def __init__(self) -> None:
        self.calls: list[str] = []


class Resource(Calls, Closeable):
    def close(self) -> None:
        self.calls.append("close")


class Server(Calls, Stoppable):
    def stop(self) -> None:
        self.calls.append("stop")


class Started(Calls, Service):
    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


class Writer(Calls, AbortOnError, Closeable):
    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


class FileWriter(AbortOnError, io.RawIOBase):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        super().close()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(Resource, ["close"]), (Server, ["stop"]), (Started, ["start", "stop"]), (Writer, ["close"])],
)
def test_a_block_that_ends_normally_releases_once(kind: type[Calls], expected: list[str]) -> None:
    obj = kind()
    with obj as entered:  # type: ignore[attr-defined]
        assert entered is obj
    assert obj.calls == expected


@pytest.mark.parametrize("kind", [Resource, Server, Started])
def test_a_failed_block_still_releases_and_the_error_propagates(kind: type[Calls]) -> None:
    obj = kind()
    with pytest.raises(RuntimeError, match="boom"), obj:  # type: ignore[attr-defined]
        raise RuntimeError("boom")
    assert obj.calls[-1] in {"close", "stop"}


def test_a_writer_whose_block_failed_aborts_instead_of_committing() -> None:
    writer = Writer()
    with pytest.raises(RuntimeError), writer:
        raise RuntimeError("boom")
    assert writer.calls == ["abort"]


def test_a_file_like_writer_keeps_iobase_enter_and_aborts_on_error() -> None:
    done = FileWriter()
    done.close()
    # IOBase's __enter__ refuses a closed file; the base must not replace it.
    with pytest.raises(ValueError), done:
        pass
    failed = FileWriter()
    with pytest.raises(RuntimeError), failed:
        raise RuntimeError("boom")
    assert failed.aborted and failed.closed


def test_the_bases_require_their_release_method() -> None:
    with pytest.raises(TypeError):
        Closeable()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        AbortOnError()  # type: ignore[abstract]
