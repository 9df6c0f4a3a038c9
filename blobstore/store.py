"""Streaming reads and writes of local files and Azure blobs, in constant memory.

:class:`BlobStore` holds the clients and credentials for the accounts it reaches; open it once
and use it for many streams, or use the module-level :func:`open_reader`/:func:`open_writer`,
which open a store for one stream and close it with the stream.

Reading (:class:`BlobReader`) walks the blob in ranged GETs of ``read_chunk_size`` bytes; the
service checks every range against the ETag of the first response, so a blob replaced while it
is read fails (:class:`~blobstore.errors.BlobChangedError`) instead of mixing two versions.

Writing (:class:`BlobWriter`) stages blocks of ``block_size`` bytes (a few in parallel) and
commits the block list only on :meth:`BlobWriter.close`. When the ``with`` block raises, or the
writer is dropped without being closed, nothing is committed: a blob never appears complete
with part of its content, and an existing blob of that name is left as it was. Staged blocks
that are never committed are discarded by the service (after a week at the latest).

Local paths get the same semantics: a temporary file in the target directory, linked or renamed
into place on close and removed on abort.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobClient, BlobServiceClient

from blobstore.config import BlobConfig
from blobstore.errors import (
    BlobAuthError,
    BlobChangedError,
    BlobConfigError,
    BlobExistsError,
    BlobNotFoundError,
    BlobStoreError,
    BlobUrlError,
    ContainerNotFoundError,
)
from blobstore.urls import BlobLocation, LocalLocation, Location, parse_location
from cleanroom.closing import AbortOnError, Closeable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "MAX_BLOCKS",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "LocalFileWriter",
    "open_reader",
    "open_writer",
]

_log = logging.getLogger("cleanroom.blobstore")

#: The service commits at most this many blocks per blob.
MAX_BLOCKS = 50_000

# Error codes the service puts in x-ms-error-code (and the SDK in HttpResponseError.error_code).
_CONTAINER_MISSING = {"ContainerNotFound", "ContainerBeingDeleted"}
_BLOB_MISSING = {"BlobNotFound"}
_EXISTS = {"BlobAlreadyExists"}


def translate_error(e: BaseException, where: object, doing: str) -> BlobStoreError:
    """Maps an Azure SDK (or credential) exception to this package's error for ``where``.

    ``doing`` is a short verb phrase for the message ("read", "commit"). The caller raises the
    result ``from e``. The messages carry the service's error code, never credentials.
    """
    status = getattr(e, "status_code", None)
    raw_code = getattr(e, "error_code", None) or ""
    # The SDK gives a StorageErrorCode enum for known codes and a plain string otherwise.
    code = str(getattr(raw_code, "value", raw_code))
    detail = f" ({status} {code})" if status is not None else (f" ({code})" if code else "")
    if code in _CONTAINER_MISSING:
        return ContainerNotFoundError(f"cannot {doing} {where}: the container does not exist")
    if code in _BLOB_MISSING:
        return BlobNotFoundError(f"cannot {doing} {where}: the blob does not exist")
    if isinstance(e, ClientAuthenticationError) or status in (401, 403):
        if status is None:
            # A credential that could not get a token (no managed identity, expired secret).
            return BlobAuthError(f"cannot {doing} {where}: no usable Azure credential: {e}")
        return BlobAuthError(
            f"cannot {doing} {where}: the storage service refused the credentials{detail}"
        )
    if isinstance(e, ResourceNotFoundError) or status == 404:
        return BlobNotFoundError(f"cannot {doing} {where}: not found{detail}")
    if code in _EXISTS or isinstance(e, ResourceExistsError):
        return BlobExistsError(f"cannot {doing} {where}: the blob already exists")
    if isinstance(e, ResourceModifiedError) or status == 412:
        return BlobChangedError(f"cannot {doing} {where}: the blob changed meanwhile{detail}")
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return BlobStoreError(f"cannot {doing} {where}: the storage service is unreachable: {e}")
    if isinstance(e, HttpResponseError):
        return BlobStoreError(f"cannot {doing} {where}: the storage service failed{detail}")
    if isinstance(e, AzureError):
        return BlobStoreError(f"cannot {doing} {where}: {type(e).__name__}: {e}")
    return BlobStoreError(f"cannot {doing} {where}: {type(e).__name__}: {e}")


# --- reading --------------------------------------------------------------------------------


class BlobReader(io.RawIOBase):
    """A blob opened for sequential reading: a read-only, unbuffered binary file object.

    It holds at most about two ranges of ``read_chunk_size`` bytes. :attr:`size` is the blob's
    size at open. Reads raise :class:`~blobstore.errors.BlobStoreError` (an ``OSError``) when
    the service fails, the blob changes, or it ends before :attr:`size` bytes.
    """

    def __init__(
        self,
        *,
        location: BlobLocation,
        chunks: Any,
        size: int,
        etag: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._location = location
        self._chunks = chunks
        self._size = size
        self._etag = etag
        self._on_close = on_close
        self._buffer = memoryview(b"")
        self._position = 0

    @property
    def location(self) -> BlobLocation:
        """Where the blob is."""
        return self._location

    @property
    def size(self) -> int:
        """The blob's size in bytes when it was opened."""
        return self._size

    @property
    def etag(self) -> str:
        """The ETag of the version being read."""
        return self._etag

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return False
        except Exception as e:
            raise translate_error(e, self._location, "read") from e
        self._buffer = memoryview(chunk)
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Reads up to ``len(buffer)`` bytes; 0 at the end of the blob.

        Raises:
            BlobStoreError: the read failed, the blob changed, or it ended early.
            ValueError: the reader is closed.
        """
        if self.closed:
            raise ValueError("I/O operation on a closed blob reader")
        out = memoryview(buffer).cast("B")
        if not out:
            return 0
        while not self._buffer:
            if not self._next_chunk():
                if self._position != self._size:
                    raise BlobStoreError(
                        f"{self._location} ended after {self._position} of {self._size} bytes"
                    )
                return 0
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self._position += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        self._buffer = memoryview(b"")
        self._chunks = iter(())
        try:
            super().close()
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()

    def __repr__(self) -> str:
        return f"<BlobReader {self._location} size={self._size}>"


# --- writing --------------------------------------------------------------------------------


class _AbortOnDrop(AbortOnError, io.RawIOBase):
    """A writer that commits only on close(); dropping it unclosed (or an exception in its
    ``with`` block) aborts instead of committing.

    :meth:`write` is the same for every writer: it counts what was accepted and aborts the
    writer when the subclass's :meth:`_write_view` fails, so a failed stream never commits.
    """

    #: How :meth:`write` names the writer when it is used after closing.
    _kind = "writer"

    def __init__(self) -> None:
        super().__init__()
        self._bytes_written = 0

    def abort(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _write_view(self, view: memoryview) -> None:  # pragma: no cover - overridden
        """Takes all of ``view`` (one-byte items), or raises BlobStoreError."""
        raise NotImplementedError

    @property
    def bytes_written(self) -> int:
        """Bytes accepted so far."""
        return self._bytes_written

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        """Accepts all of ``data``; returns its length.

        Raises:
            BlobStoreError: the write failed (the writer is aborted).
            ValueError: the writer is closed.
        """
        if self.closed:
            raise ValueError(f"write to a closed {self._kind}")
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            self._write_view(view)
        except BlobStoreError:
            self.abort()
            raise
        self._bytes_written += total
        return total

    def __del__(self) -> None:
        # io.IOBase's finalizer would call close(), i.e. commit a possibly partial stream.
        # A writer nobody closed was abandoned: discard it.
        try:
            if not self.closed:
                self.abort()
        except Exception:  # noqa: S110 - nothing useful can be done in a finalizer
            pass


class BlobWriter(_AbortOnDrop):
    """A blob being written: a write-only binary file object that commits on :meth:`close`.

    Data is cut into blocks of ``block_size`` bytes, each staged as soon as it is full (up to
    ``max_concurrency`` in flight); :meth:`close` stages the last block and commits the list.
    :meth:`abort` (or an exception in the ``with`` block) stops without committing.

    Raises (from :meth:`write` and :meth:`close`):
        BlobStoreError: staging or committing failed; the writer is then aborted.
        BlobExistsError: the blob appeared meanwhile and ``overwrite`` was not allowed.
    """

    _kind = "blob writer"

    def __init__(
        self,
        *,
        client: BlobClient,
        location: BlobLocation,
        block_size: int,
        max_concurrency: int,
        overwrite: bool,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        self._location = location
        self._block_size = block_size
        self._overwrite = overwrite
        self._on_close = on_close
        self._block = bytearray(block_size)
        self._filled = 0
        self._block_ids: list[str] = []
        # Block ids must be unique among all writers of this blob name (uncommitted blocks
        # are kept per name), and of equal length within one blob.
        self._prefix = secrets.token_hex(12)
        self._pending: deque[Future[None]] = deque()
        self._executor = (
            ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="blob-stage")
            if max_concurrency > 1
            else None
        )
        self._max_in_flight = max_concurrency
        self._failed: BlobStoreError | None = None
        self._committed = False

    @property
    def location(self) -> BlobLocation:
        """Where the blob goes."""
        return self._location

    @property
    def committed(self) -> bool:
        """Whether :meth:`close` committed the blob."""
        return self._committed

    def _stage_now(self, block_id: str, data: bytearray) -> None:
        try:
            self._client.stage_block(block_id, cast(bytes, data), length=len(data))
        except Exception as e:
            raise translate_error(e, self._location, "write a block of") from e

    def _collect(self, wait_all: bool) -> None:
        """Waits for finished (or, with ``wait_all``, all) staging futures; raises the first
        failure."""
        while self._pending and (wait_all or len(self._pending) >= self._max_in_flight):
            self._pending.popleft().result()

    def _stage_block(self, *, final: bool = False) -> None:
        if len(self._block_ids) >= MAX_BLOCKS:
            raise BlobStoreError(
                f"{self._location}: more than {MAX_BLOCKS} blocks; use a larger block_size"
            )
        # Wait for a free slot first, so at most max_concurrency blocks are in flight plus the
        # one being filled.
        self._collect(wait_all=False)
        block_id = f"{self._prefix}{len(self._block_ids):06d}"
        # The filled buffer itself goes to the SDK (a bytearray is sent as is, not copied); the
        # next block is filled in a fresh buffer.
        data, self._block = self._block, bytearray(0 if final else self._block_size)
        if self._filled < len(data):
            del data[self._filled :]
        self._block_ids.append(block_id)
        self._filled = 0
        if self._executor is None:
            self._stage_now(block_id, data)
            return
        self._pending.append(self._executor.submit(self._stage_now, block_id, data))

    def _write_view(self, view: memoryview) -> None:
        """Fills blocks from ``view``, staging each one that is full.

        Raises:
            BlobStoreError: staging a block failed.
        """
        while view:
            n = min(len(view), self._block_size - self._filled)
            self._block[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self._block_size:
                self._stage_block()

    def close(self) -> None:
        """Stages the last block and commits the block list, making the blob visible.

        Idempotent once committed or aborted.

        Raises:
            BlobExistsError: the blob exists and ``overwrite`` was not allowed.
            BlobStoreError: staging or committing failed (nothing is committed).
        """
        if self.closed:
            return
        try:
            # An empty stream stages nothing and commits an empty list: an empty blob.
            if self._filled:
                self._stage_block(final=True)
            self._collect(wait_all=True)
            conditions: dict[str, Any] = (
                {} if self._overwrite else {"match_condition": MatchConditions.IfMissing}
            )
            try:
                self._client.commit_block_list(
                    [BlobBlock(block_id=b) for b in self._block_ids], **conditions
                )
            except Exception as e:
                error = translate_error(e, self._location, "commit")
                if isinstance(error, BlobChangedError):
                    # The If-None-Match: * condition failed: someone else committed first.
                    error = BlobExistsError(
                        f"cannot commit {self._location}: it appeared meanwhile"
                    )
                raise error from e
        except BaseException:
            self.abort()
            raise
        self._committed = True
        _log.debug(
            "committed %s: %d bytes in %d blocks",
            self._location,
            self._bytes_written,
            len(self._block_ids),
        )
        self._shutdown()

    def abort(self) -> None:
        """Stops without committing; waits for blocks in flight. Idempotent, never raises."""
        if self.closed:
            return
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            try:
                future.result()
            except BaseException:  # noqa: S110 - the stream is being discarded anyway
                pass
        self._pending.clear()
        _log.debug("aborted %s after %d bytes (uncommitted)", self._location, self._bytes_written)
        self._shutdown()

    def _shutdown(self) -> None:
        self._block = bytearray()
        self._filled = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        try:
            super().close()
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()

    def __repr__(self) -> str:
        return f"<BlobWriter {self._location}>"


class LocalFileWriter(_AbortOnDrop):
    """A local file being written: a temporary file (mode 0600) in the target's directory that
    is linked (or, with ``overwrite``, renamed) into place on :meth:`close` and removed on
    :meth:`abort`.

    Raises (from :meth:`close`):
        BlobExistsError: the file exists and ``overwrite`` was not allowed.
        BlobStoreError: writing, syncing or renaming failed.
    """

    _kind = "file writer"

    def __init__(self, path: Path, *, overwrite: bool, mode: int = 0o600) -> None:
        super().__init__()
        self._path = path
        self._overwrite = overwrite
        self._mode = mode
        if not overwrite and path.exists():
            raise BlobExistsError(f"cannot write {path}: it already exists")
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        except FileNotFoundError as e:
            raise BlobNotFoundError(f"cannot write {path}: its directory does not exist") from e
        except OSError as e:
            raise BlobStoreError(f"cannot write {path}: {e.strerror or e}") from e
        self._fd = fd
        self._tmp = Path(tmp)

    @property
    def path(self) -> Path:
        """The final path."""
        return self._path

    def fileno(self) -> int:
        return self._fd

    def _write_view(self, view: memoryview) -> None:
        """Writes all of ``view`` to the temporary file.

        Raises:
            BlobStoreError: the write failed.
        """
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            raise BlobStoreError(f"cannot write {self._path}: {e.strerror or e}") from e

    def close(self) -> None:
        """Syncs and moves the file into place. Idempotent.

        Raises:
            BlobExistsError: the target exists and ``overwrite`` was not allowed.
            BlobStoreError: syncing or moving failed (the temporary file is removed).
        """
        if self.closed:
            return
        try:
            os.fchmod(self._fd, self._mode)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self._overwrite:
                os.replace(self._tmp, self._path)
            else:
                # link() refuses to replace an existing name, unlike rename().
                os.link(self._tmp, self._path)
                self._tmp.unlink()
        except FileExistsError as e:
            self.abort()
            raise BlobExistsError(f"cannot write {self._path}: it appeared meanwhile") from e
        except OSError as e:
            self.abort()
            raise BlobStoreError(f"cannot write {self._path}: {e.strerror or e}") from e
        super().close()

    def abort(self) -> None:
        """Removes the temporary file. Idempotent, never raises."""
        if self.closed:
            return
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self._tmp.unlink(missing_ok=True)
        super().close()

    def __repr__(self) -> str:
        return f"<LocalFileWriter {self._path}>"


# --- the store ------------------------------------------------------------------------------


class BlobStore(Closeable):
    """Opens readers and writers for paths and blob URLs; holds clients and credentials.

    Thread-safe. Close it (or use it as a context manager) to close its HTTP sessions and the
    credential it created; streams opened from it must be closed first.

    Args:
        config: how to authenticate and where endpoints are (defaults: the Azure identity
            chain, public endpoints, 4 MiB blocks).
        credential: an Azure token credential to use instead of the one ``config`` names
            (the caller keeps ownership of it).
    """

    def __init__(
        self, *, config: BlobConfig | None = None, credential: TokenCredential | None = None
    ) -> None:
        self.config = config or BlobConfig()
        self._credential = credential
        self._owned_credential: Any = None
        self._services: dict[tuple[str, str, str], BlobServiceClient] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- clients ---------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        c = self.config
        return {
            "max_single_get_size": c.read_chunk_size,
            "max_chunk_get_size": c.read_chunk_size,
            "max_block_size": c.block_size,
            "connection_timeout": c.connect_timeout_seconds,
            "read_timeout": c.read_timeout_seconds,
            "retry_total": c.retry_total,
        }

    def _token_credential(self) -> TokenCredential:
        if self._credential is not None:
            return self._credential
        if self._owned_credential is None:
            from azure.identity import DefaultAzureCredential

            client_id = self.config.managed_identity_client_id or None
            self._owned_credential = DefaultAzureCredential(managed_identity_client_id=client_id)
        return cast(TokenCredential, self._owned_credential)

    def _account_url(self, loc: BlobLocation) -> str:
        if loc.account_url:
            return loc.account_url
        if self.config.account_url:
            return self.config.account_url.replace("{account}", loc.account).rstrip("/")
        return f"https://{loc.account}.blob.{self.config.endpoint_suffix}"

    def _service(self, loc: BlobLocation) -> BlobServiceClient:
        mode = self.config.effective_auth
        if loc.sas_token:
            mode = "url-sas"
        url = self._account_url(loc)
        key = (mode, url if mode != "connection-string" else loc.account, loc.sas_token or "")
        with self._lock:
            if self._closed:
                raise BlobStoreError("the blob store is closed")
            client = self._services.get(key)
            if client is not None:
                return client
            options = self._client_options()
            try:
                if mode == "connection-string":
                    client = BlobServiceClient.from_connection_string(
                        self.config.connection_string, **options
                    )
                    if client.account_name != loc.account:
                        client.close()
                        raise BlobConfigError(
                            f"{loc}: the connection string is for account "
                            f"{client.account_name!r}, not {loc.account!r}"
                        )
                elif mode == "url-sas":
                    client = BlobServiceClient(url, credential=loc.sas_token, **options)
                elif mode == "sas":
                    client = BlobServiceClient(url, credential=self.config.sas_token, **options)
                elif mode == "anonymous":
                    client = BlobServiceClient(url, **options)
                else:
                    client = BlobServiceClient(url, credential=self._token_credential(), **options)
            except BlobStoreError:
                raise
            except (ValueError, AzureError) as e:
                # The SDK rejects a malformed connection string or URL with ValueError; the
                # message may quote the string, so it is not repeated here.
                raise BlobConfigError(
                    f"{loc}: cannot set up a client for mode {mode!r}: {type(e).__name__}"
                ) from e
            self._services[key] = client
            return client

    def _blob_client(self, loc: BlobLocation) -> BlobClient:
        return self._service(loc).get_blob_client(loc.container, loc.blob)

    def _parse(self, url: str | Path) -> Location:
        return parse_location(url, endpoint_suffix=self.config.endpoint_suffix)

    # -- operations ------------------------------------------------------------------------

    def open_reader(self, url: str | Path) -> BinaryIO:
        """Opens a path or blob for sequential reading from its start.

        A local file comes back as an unbuffered ``FileIO``; a blob as a :class:`BlobReader`.

        Raises:
            BlobUrlError: the URL is malformed.
            BlobNotFoundError, ContainerNotFoundError: it does not exist.
            BlobAuthError: the credentials were refused.
            BlobStoreError: anything else failed.
        """
        return self._open_reader(self._parse(url), on_close=None)

    def _open_reader(self, loc: Location, on_close: Callable[[], None] | None) -> BinaryIO:
        if isinstance(loc, LocalLocation):
            try:
                f = open(loc.path, "rb", buffering=0)
            except FileNotFoundError as e:
                raise BlobNotFoundError(f"cannot read {loc.path}: it does not exist") from e
            except OSError as e:
                raise BlobStoreError(f"cannot read {loc.path}: {e.strerror or e}") from e
            if on_close is not None:
                on_close()
            return f
        client = self._blob_client(loc)
        try:
            downloader = client.download_blob(max_concurrency=1)
            etag = str(downloader.properties.etag)
            chunks = downloader.chunks()
        except Exception as e:
            raise translate_error(e, loc, "read") from e
        reader = BlobReader(
            location=loc, chunks=chunks, size=downloader.size, etag=etag, on_close=on_close
        )
        return cast(BinaryIO, reader)

    def open_writer(self, url: str | Path, *, overwrite: bool = False) -> BinaryIO:
        """Opens a path or blob for writing; it appears only when the writer is closed.

        Use it as a context manager: leaving the block by an exception aborts (nothing is
        committed). Without ``overwrite``, an existing blob or file is an error, checked at open
        and again, atomically, at commit.

        Raises:
            BlobUrlError: the URL is malformed.
            ContainerNotFoundError: the container does not exist (checked at open).
            BlobNotFoundError: a local target's directory does not exist.
            BlobExistsError: it exists and ``overwrite`` is false.
            BlobAuthError: the credentials were refused.
            BlobStoreError: anything else failed.
        """
        return self._open_writer(self._parse(url), overwrite=overwrite, on_close=None)

    def _open_writer(
        self, loc: Location, *, overwrite: bool, on_close: Callable[[], None] | None
    ) -> BinaryIO:
        if isinstance(loc, LocalLocation):
            writer: io.RawIOBase = LocalFileWriter(loc.path, overwrite=overwrite)
            if on_close is not None:
                on_close()
            return cast(BinaryIO, writer)
        client = self._blob_client(loc)
        # One cheap HEAD tells apart a missing container (an error now, not after the first
        # block), refused credentials and, without overwrite, an existing blob.
        try:
            client.get_blob_properties()
        except Exception as e:
            error = translate_error(e, loc, "write")
            if not isinstance(error, BlobNotFoundError):
                raise error from e
        else:
            if not overwrite:
                raise BlobExistsError(f"cannot write {loc}: the blob already exists")
        return cast(
            BinaryIO,
            BlobWriter(
                client=client,
                location=loc,
                block_size=self.config.block_size,
                max_concurrency=self.config.max_concurrency,
                overwrite=overwrite,
                on_close=on_close,
            ),
        )

    def size(self, url: str | Path) -> int:
        """The size in bytes of a file or blob.

        Raises:
            BlobNotFoundError, ContainerNotFoundError, BlobAuthError, BlobStoreError.
        """
        loc = self._parse(url)
        if isinstance(loc, LocalLocation):
            try:
                return loc.path.stat().st_size
            except FileNotFoundError as e:
                raise BlobNotFoundError(f"{loc.path} does not exist") from e
            except OSError as e:
                raise BlobStoreError(f"cannot inspect {loc.path}: {e.strerror or e}") from e
        try:
            return int(self._blob_client(loc).get_blob_properties().size)
        except BlobStoreError:
            raise
        except Exception as e:
            raise translate_error(e, loc, "inspect") from e

    def list_blobs(self, prefix: str, *, suffix: str = "", limit: int = 10) -> list[str]:
        """The URLs (canonical, without any SAS token) of up to ``limit`` blobs under ``prefix``
        whose names end with ``suffix``, in the service's (name) order.

        ``prefix`` is a container URL with an optional path (``azure://account/container/out``):
        the blobs listed are those whose names start with that path and a ``/``.

        Raises:
            BlobUrlError: ``prefix`` is not a blob container URL.
            ContainerNotFoundError: the container does not exist.
            BlobAuthError, BlobStoreError.
        """
        loc = self._parse(prefix.rstrip("/") + "/x")
        if not isinstance(loc, BlobLocation):
            raise BlobUrlError(f"{prefix} is not a blob container URL")
        start = loc.blob.removesuffix("x")
        found: list[str] = []
        try:
            container = self._service(loc).get_container_client(loc.container)
            for item in container.list_blobs(name_starts_with=start or None):
                if item.name.endswith(suffix):
                    found.append(f"azure://{loc.account}/{loc.container}/{item.name}")
                    if len(found) >= limit:
                        break
        except BlobStoreError:
            raise
        except Exception as e:
            where = f"azure://{loc.account}/{loc.container}/{start}"
            raise translate_error(e, where, "list") from e
        return found

    def exists(self, url: str | Path) -> bool:
        """Whether the file or blob exists.

        Raises:
            ContainerNotFoundError: the container does not exist.
            BlobAuthError, BlobStoreError.
        """
        try:
            self.size(url)
        except BlobNotFoundError:
            return False
        return True

    def delete(self, url: str | Path) -> None:
        """Deletes a file or blob.

        Raises:
            BlobNotFoundError, ContainerNotFoundError, BlobAuthError, BlobStoreError.
        """
        loc = self._parse(url)
        if isinstance(loc, LocalLocation):
            try:
                loc.path.unlink()
            except FileNotFoundError as e:
                raise BlobNotFoundError(f"{loc.path} does not exist") from e
            except OSError as e:
                raise BlobStoreError(f"cannot delete {loc.path}: {e.strerror or e}") from e
            return
        try:
            self._blob_client(loc).delete_blob()
        except BlobStoreError:
            raise
        except Exception as e:
            raise translate_error(e, loc, "delete") from e

    def close(self) -> None:
        """Closes the HTTP sessions and the credential this store created. Idempotent."""
        with self._lock:
            self._closed = True
            services = list(self._services.values())
            self._services.clear()
            credential, self._owned_credential = self._owned_credential, None
        for client in services:
            client.close()
        if credential is not None:
            credential.close()


def _with_own_store(
    config: BlobConfig | None,
    credential: TokenCredential | None,
    open_stream: Callable[[BlobStore], BinaryIO],
) -> BinaryIO:
    """Opens a stream with a store of its own, which the stream closes when it is closed (and
    which is closed here at once when opening fails)."""
    store = BlobStore(config=config, credential=credential)
    try:
        return open_stream(store)
    except BaseException:
        store.close()
        raise


def open_reader(
    url: str | Path,
    *,
    config: BlobConfig | None = None,
    credential: TokenCredential | None = None,
) -> BinaryIO:
    """Opens a path or blob URL for reading with a store of its own, closed with the stream.

    See :meth:`BlobStore.open_reader`.

    Raises:
        BlobStoreError: as :meth:`BlobStore.open_reader`.
    """
    return _with_own_store(
        config,
        credential,
        lambda store: store._open_reader(store._parse(url), on_close=store.close),
    )


def open_writer(
    url: str | Path,
    *,
    overwrite: bool = False,
    config: BlobConfig | None = None,
    credential: TokenCredential | None = None,
) -> BinaryIO:
    """Opens a path or blob URL for writing with a store of its own, closed with the stream.

    See :meth:`BlobStore.open_writer`.

    Raises:
        BlobStoreError: as :meth:`BlobStore.open_writer`.
    """
    return _with_own_store(
        config,
        credential,
        lambda store: store._open_writer(
            store._parse(url), overwrite=overwrite, on_close=store.close
        ),
    )
