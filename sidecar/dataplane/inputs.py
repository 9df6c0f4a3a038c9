"""Where the sealed inputs come from: input specs, sources and a registry of URL schemes.

An :class:`InputSpec` names an input as the workload sees it, where its ciphertext lives and the
id of the data key that opens it. A source (:class:`InputSource`) only hands out ciphertext; the
server decrypts. Sources are found by URL scheme through :func:`input_source_for`, so that
another storage (Azure Blob) can plug in with :func:`register_input_scheme`; ``file:`` URLs and
plain paths are built in.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from sealing.envelope import TAG_SIZE, Header
from sidecar.dataplane.errors import InputSourceError
from sidecar.dataplane.keyring import KeyRing, ReattestCallback

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
        """Opens the file for reading.

        Raises:
            InputSourceError: the file cannot be opened.
        """
        try:
            # Unbuffered: the envelope reader asks for whole segments with readinto, which a
            # raw file serves straight into its buffer.
            return open(self._path, "rb", buffering=0)
        except OSError as e:
            raise InputSourceError(
                f"input {self._name!r}: cannot open {self._path}: {e.strerror or e}"
            ) from e

    def __repr__(self) -> str:
        return f"LocalFileInput(name={self._name!r}, path={str(self._path)!r})"


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
