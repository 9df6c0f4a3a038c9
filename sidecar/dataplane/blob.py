"""The sidecar's data path over Azure Blob: an input source and an output sink.

* :class:`BlobInput` fits :class:`sidecar.dataplane.inputs.InputSource`: it hands out an
  input's ciphertext from a blob. :func:`register_blob_inputs` registers it for the ``azure``
  and ``https`` URL schemes, so an input spec whose URL is ``azure://acct/container/x.sealed``
  is served from Blob Storage.
* :class:`BlobOutputSink` fits :class:`sidecar.dataplane.outputs.OutputSink`: each output is
  sealed as it arrives (:class:`sealing.envelope.SealWriter`) into a blob writer that commits
  ``<prefix>/<name>.sealed`` only when the output is complete, refusing to replace an existing
  blob. Plaintext never reaches storage.

Neither does any cryptography on inputs: the sidecar's server opens and authenticates the
ciphertext. This module adapts ``blobstore`` to the sidecar's ports; ``blobstore`` itself is a
leaf that knows nothing of the sidecar.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

from blobstore.errors import BlobExistsError, BlobStoreError
from blobstore.store import BlobStore
from blobstore.urls import BlobLocation, parse_location
from sealing.envelope import DEFAULT_CHUNK_SIZE
from sidecar.dataplane.errors import (
    InputSourceError,
    OutputExistsError,
    OutputStoreError,
)
from sidecar.dataplane.inputs import InputSource, InputSpec, register_input_scheme
from sidecar.dataplane.outputs import (
    SEALED_SUFFIX,
    OutputWriter,
    Recipient,
    SealedOutput,
    check_output_name,
)

if TYPE_CHECKING:
    pass

__all__ = ["BLOB_INPUT_SCHEMES", "BlobInput", "BlobOutputSink", "register_blob_inputs"]

_log = logging.getLogger("cleanroom.blobstore")

#: URL schemes :func:`register_blob_inputs` registers.
BLOB_INPUT_SCHEMES = ("azure", "https")


class BlobInput:
    """An input whose ciphertext is a blob. Implements ``InputSource``.

    Raises:
        InputSourceError: the URL is not a blob URL this package understands.
    """

    __slots__ = ("_location", "_name", "_store", "_url")

    def __init__(self, *, name: str, url: str, store: BlobStore) -> None:
        try:
            location = parse_location(url, endpoint_suffix=store.config.endpoint_suffix)
        except BlobStoreError as e:
            raise InputSourceError(f"input {name!r}: {e}") from e
        if not isinstance(location, BlobLocation):
            raise InputSourceError(f"input {name!r}: {url!r} is not a blob URL")
        self._name = name
        self._url = url
        self._location = location
        self._store = store

    @property
    def name(self) -> str:
        return self._name

    @property
    def location(self) -> BlobLocation:
        """The blob (its ``str`` never shows a SAS token)."""
        return self._location

    @property
    def size(self) -> int | None:
        """The blob's size, or None when it cannot be had (the error shows at :meth:`open`)."""
        try:
            return self._store.size(self._url)
        except BlobStoreError:
            return None

    def open(self) -> BinaryIO:
        """Opens the blob for sequential reading.

        Raises:
            InputSourceError: the blob or container does not exist, access is refused, or the
                service cannot be reached.
        """
        try:
            return self._store.open_reader(self._url)
        except BlobStoreError as e:
            raise InputSourceError(f"input {self._name!r}: {e}") from e

    def __repr__(self) -> str:
        return f"BlobInput(name={self._name!r}, location={str(self._location)!r})"


def register_blob_inputs(store: BlobStore, *, schemes: Sequence[str] = BLOB_INPUT_SCHEMES) -> None:
    """Makes ``sidecar.dataplane.inputs.input_source_for`` serve ``schemes`` URLs from
    ``store``. The store must stay open while inputs are served.

    Raises:
        ValueError: a scheme is already registered (register once per process).
    """

    def factory(spec: InputSpec) -> InputSource:
        return BlobInput(name=spec.name, url=spec.url, store=store)

    for scheme in schemes:
        register_input_scheme(scheme, factory)


class BlobOutputSink:
    """Stores each output sealed as the blob ``<prefix>/<name>.sealed``. Implements
    ``OutputSink``.

    ``prefix`` is ``azure://<account>/<container>[/<path>]`` or an ``https://`` container URL.
    The container must exist. An output is committed only when complete; an existing blob is
    never replaced, unless ``replace`` (``[outputs] replace``) says to.

    Raises:
        OutputStoreError: the prefix is not a blob container URL.
    """

    def __init__(
        self,
        prefix: str,
        *,
        store: BlobStore,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        replace: bool = False,
    ) -> None:
        # Validate with a placeholder blob name: the prefix must be a container URL.
        try:
            probe = parse_location(
                prefix.rstrip("/") + "/x", endpoint_suffix=store.config.endpoint_suffix
            )
        except BlobStoreError as e:
            raise OutputStoreError(f"output location {prefix!r}: {e}") from e
        if not isinstance(probe, BlobLocation):
            raise OutputStoreError(f"output location {prefix!r} is not a blob URL")
        self._prefix = prefix.rstrip("/")
        self._shown = str(probe).removesuffix("/x")
        self._store = store
        self._chunk_size = chunk_size
        self._replace = replace
        self._lock = threading.Lock()
        self._active: set[str] = set()

    def existing_outputs(self, limit: int = 5) -> list[str]:
        """Up to ``limit`` outputs (``*.sealed`` blobs) already under the prefix, by URL: the
        sidecar's preflight refuses to attest while there are any, unless told to replace them.

        Raises:
            OutputStoreError: the container does not exist, the credentials are refused, or the
                service cannot be reached.
        """
        try:
            return self._store.list_blobs(self._prefix, suffix=SEALED_SUFFIX, limit=limit)
        except BlobStoreError as e:
            raise OutputStoreError(f"output location {self._shown}: {e}") from e

    def url_for(self, name: str) -> str:
        """The blob URL that output ``name`` is stored at.

        Raises:
            OutputNameError: the name is unacceptable.
        """
        check_output_name(name)
        return f"{self._prefix}/{name}{SEALED_SUFFIX}"

    def open_output(self, name: str, *, recipients: Sequence[Recipient]) -> OutputWriter:
        """Starts the output ``name``.

        Raises:
            OutputNameError: the name is unacceptable.
            OutputExistsError: the blob exists or the name is being written.
            OutputStoreError: the blob cannot be started (missing container, refused
                credentials, unreachable service) or sealing cannot start.
        """
        url = self.url_for(name)
        if not recipients:
            raise OutputStoreError(f"output {name!r}: no recipients to seal it to")
        with self._lock:
            if name in self._active:
                raise OutputExistsError(f"output {name!r} is already being written")
            self._active.add(name)
        try:
            return _BlobSealedOutput(owner=self, name=name, url=url, recipients=recipients)
        except BaseException:
            self._release(name)
            raise

    def _release(self, name: str) -> None:
        with self._lock:
            self._active.discard(name)

    def __repr__(self) -> str:
        return f"BlobOutputSink({self._shown!r})"


class _BlobSealedOutput(SealedOutput):
    """One output being sealed into a blob writer."""

    _logger = _log

    def __init__(
        self, *, owner: BlobOutputSink, name: str, url: str, recipients: Sequence[Recipient]
    ) -> None:
        self._owner = owner
        self._name = name
        self._parties = tuple(r.party for r in recipients)
        self._done = False
        try:
            self._blob = owner._store.open_writer(url, overwrite=owner._replace)
        except BlobExistsError as e:
            raise OutputExistsError(f"output {name!r}: {e}") from e
        except BlobStoreError as e:
            raise OutputStoreError(f"output {name!r}: {e}") from e
        self._location = str(getattr(self._blob, "location", url))
        self._start_sealing(self._blob, recipients=recipients, chunk_size=owner._chunk_size)

    def _commit_raw(self) -> int:
        """Writes the final segment and commits the blob.

        Raises:
            OutputExistsError: the blob appeared meanwhile (nothing is replaced).
            SealingError, OSError: finishing or committing failed (nothing is committed).
        """
        try:
            self._writer.close()
            sealed_bytes = int(getattr(self._blob, "bytes_written", 0))
            self._blob.close()
        except BlobExistsError as e:
            raise OutputExistsError(f"output {self._name!r}: {e}") from e
        return sealed_bytes

    def _discard(self) -> None:
        abort = getattr(self._blob, "abort", None)
        try:
            if callable(abort):
                abort()
        except Exception:  # noqa: S110 - discarding; the blob is uncommitted either way
            pass
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._owner._release(self._name)

    def __repr__(self) -> str:
        return f"<sealed blob output {self._name!r}>"
