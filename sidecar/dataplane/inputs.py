"""Where the sealed inputs come from: input specs, sources and a registry of URL schemes.

An :class:`InputSpec` names an input as the workload sees it, where its ciphertext lives and the
id of the data key that opens it. A source (:class:`InputSource`) only hands out ciphertext; the
server decrypts. Sources are found by URL scheme through :func:`input_source_for`, so that
another storage (Azure Blob) can plug in with :func:`register_input_scheme`; ``file:`` URLs and
plain paths are built in.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast, runtime_checkable
from urllib.parse import unquote, urlsplit

from sealing.envelope import TAG_SIZE, Header
from sidecar.dataplane.errors import InputSourceError
from sidecar.dataplane.keyring import KeyRing, ReattestCallback

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "InputSource",
    "InputSourceFactory",
    "InputSpec",
    "KeyRing",
    "LocalFileInput",
    "ReattestCallback",
    "input_source_for",
    "plaintext_size",
    "register_input_scheme",
]


@dataclass(frozen=True)
class InputSpec:
    """One input of the session.

    Attributes:
        name: the name the workload opens it by (unique within the session).
        url: where the sealed stream lives: a path, a ``file:`` URL, or a registered scheme.
        key_id: the id of the data key that opens it; the stream's header must carry the same.
        owner_party: the party that owns the data key (shown to the workload by ListInputs).
    """

    name: str
    url: str
    key_id: str
    owner_party: str = ""

    def __post_init__(self) -> None:
        if not self.name or "\x00" in self.name:
            raise ValueError("an input name must be non-empty and contain no NUL")
        if not self.url:
            raise ValueError(f"input {self.name!r} has an empty URL")
        if not self.key_id:
            raise ValueError(f"input {self.name!r} has an empty key id")


@runtime_checkable
class InputSource(Protocol):
    """Hands out an input's ciphertext. Implementations do no cryptography."""

    @property
    def name(self) -> str:
        """The input's name."""
        ...

    @property
    def size(self) -> int | None:
        """The ciphertext size in bytes when cheaply known, else None."""
        ...

    def open(self) -> BinaryIO:
        """Opens the ciphertext for sequential reading from its start.

        Raises:
            InputSourceError: the ciphertext cannot be opened.
        """
        ...


class LocalFileInput:
    """A sealed input in a local file (or anything ``open`` reads: a FIFO, a mounted share)."""

    __slots__ = ("_name", "_path")

    def __init__(self, *, name: str, path: str | os.PathLike[str]) -> None:
        self._name = name
        self._path = Path(path)

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        """The file's path."""
        return self._path

    @property
    def size(self) -> int | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_size if st.st_mode & 0o170000 == 0o100000 else None

    def open(self) -> BinaryIO:
        """Opens the file for reading: a regular file is mapped into memory (see
        :class:`MappedFile`), anything else is read unbuffered.

        Raises:
            InputSourceError: the file cannot be opened.
        """
        try:
            # Unbuffered: the envelope reader asks for whole segments with readinto, which a
            # raw file serves straight into its buffer.
            f = open(self._path, "rb", buffering=0)
        except OSError as e:
            raise InputSourceError(
                f"input {self._name!r}: cannot open {self._path}: {e.strerror or e}"
            ) from e
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return f
            mapped = MappedFile(f.fileno(), st.st_size)
        except (OSError, ValueError):
            # Not mappable (some network filesystems): read it instead.
            return f
        # The mapping holds its own reference to the file.
        f.close()
        return cast(BinaryIO, mapped)

    def __repr__(self) -> str:
        return f"LocalFileInput(name={self._name!r}, path={str(self._path)!r})"


# Pages read are unmapped in steps of this many bytes (one system call per step).
_DROP_STEP = 4 << 20


class MappedFile(io.RawIOBase):
    """A regular file mapped read-only into memory, read sequentially from its start.

    Besides ``read`` and ``readinto`` it offers ``read_view(n)``: the next ``n`` bytes as a view
    of the mapping, which the envelope reader decrypts in place (see
    :class:`~sealing.envelope.OpenReader`), so the ciphertext is never copied out of the page
    cache. Limit: a file that another process truncates while it is mapped makes the next access
    to the lost pages fail with SIGBUS, which ends the sidecar (it is not dumpable, so nothing
    is written to disk) and with it the run: whoever can truncate the sealed input can stop the
    run anyway, by corrupting or removing it.
    """

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        with contextlib.suppress(OSError, AttributeError):
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._view = memoryview(self._map)
        self._pos = 0
        self._size = size
        self._dropped = 0

    def readable(self) -> bool:
        return True

    def read_view(self, n: int) -> memoryview:
        """The next ``n`` bytes (fewer at the end) as a view of the mapping, without copying."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        self._drop_behind()
        view = self._view[self._pos : self._pos + max(0, n)]
        self._pos += len(view)
        return view

    def _drop_behind(self) -> None:
        """Unmaps the pages already read, so that resident memory does not grow with the file
        (they stay in the page cache; touching them again would map them back)."""
        end = self._pos - self._pos % mmap.PAGESIZE
        if end - self._dropped >= _DROP_STEP:
            with contextlib.suppress(OSError):
                self._map.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end

    def readinto(self, buffer: WriteableBuffer) -> int:
        dest = memoryview(buffer).cast("B")
        with self.read_view(len(dest)) as part:
            dest[: len(part)] = part
            return len(part)

    def close(self) -> None:
        if not self.closed:
            self._view.release()
            try:
                self._map.close()
            except BufferError:
                # A view lent to the reader is still referenced (say, by a traceback); the
                # mapping goes away with the last of them.
                pass
        super().close()


#: Builds a source for a spec whose URL has the scheme it was registered for.
InputSourceFactory = Callable[[InputSpec], InputSource]


def _local_file_factory(spec: InputSpec) -> InputSource:
    parts = urlsplit(spec.url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputSourceError(
                f"input {spec.name!r}: file URL names host {parts.netloc!r}; only local files"
            )
        path = unquote(parts.path)
    else:
        path = spec.url
    return LocalFileInput(name=spec.name, path=path)


_registry_lock = threading.Lock()
_registry: dict[str, InputSourceFactory] = {"": _local_file_factory, "file": _local_file_factory}


def register_input_scheme(scheme: str, factory: InputSourceFactory) -> None:
    """Makes :func:`input_source_for` build sources for ``scheme:`` URLs with ``factory``.

    Raises:
        ValueError: the scheme is empty or already registered.
    """
    key = scheme.lower()
    if not key:
        raise ValueError("an input URL scheme must not be empty")
    with _registry_lock:
        if key in _registry:
            raise ValueError(f"input URL scheme {scheme!r} is already registered")
        _registry[key] = factory


def _scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    # A one-letter "scheme" is a Windows drive letter, and a path such as "data:v1/x.sealed"
    # is not meant as a URL either; only schemes followed by "//" or "file:" count.
    if scheme == "file" or (scheme and url[len(scheme) + 1 :].startswith("//")):
        return scheme
    return ""


def input_source_for(spec: InputSpec) -> InputSource:
    """Returns the source for ``spec`` by its URL's scheme (a plain path is a local file).

    Raises:
        InputSourceError: no source is registered for the URL's scheme, or the URL is invalid.
    """
    scheme = _scheme_of(spec.url)
    with _registry_lock:
        factory = _registry.get(scheme)
    if factory is None:
        raise InputSourceError(
            f"input {spec.name!r}: no input source for URL scheme {scheme!r} "
            f"(known: {', '.join(sorted(s for s in _registry if s)) or 'none'})"
        )
    return factory(spec)


# Each segment is a 4-byte length prefix, the ciphertext and the GCM tag (docs/sealing-format.md).
_SEGMENT_OVERHEAD = 4 + TAG_SIZE


def plaintext_size(header: Header, stream_size: int) -> int | None:
    """The plaintext size of a well-formed sealed stream of ``stream_size`` bytes, or None when
    that size cannot belong to one. Advisory only: authentication happens while reading."""
    body = stream_size - header.size
    if body < _SEGMENT_OVERHEAD:
        return None
    # Every segment but the last holds exactly one chunk; the last holds less (maybe nothing).
    segments = body // (header.chunk_size + _SEGMENT_OVERHEAD) + 1
    size = body - segments * _SEGMENT_OVERHEAD
    last = size - (segments - 1) * header.chunk_size
    if not 0 <= last < header.chunk_size:
        return None
    return size
