"""Streaming object transport: local files and Azure Blob Storage behind one small interface.

Open with :func:`open_reader`/:func:`open_writer` (one stream, one store) or a long-lived
:class:`BlobStore`. Locations are paths, ``file://`` URLs, ``azure://<account>/<container>/<blob>``
or ``https://<account>.blob.core.windows.net/<container>/<blob>``. Reading and writing use
constant memory (a few blocks); a writer makes its blob visible only when closed, never after
an exception. Errors derive from :class:`BlobStoreError` (an ``OSError``).
"""

from blobstore.config import BlobConfig, load_blob_config
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
from blobstore.store import BlobReader, BlobStore, BlobWriter, open_reader, open_writer
from blobstore.urls import BlobLocation, LocalLocation, is_blob_url, parse_location

__all__ = [
    "BlobAuthError",
    "BlobChangedError",
    "BlobConfig",
    "BlobConfigError",
    "BlobExistsError",
    "BlobLocation",
    "BlobNotFoundError",
    "BlobReader",
    "BlobStore",
    "BlobStoreError",
    "BlobUrlError",
    "BlobWriter",
    "ContainerNotFoundError",
    "LocalLocation",
    "is_blob_url",
    "load_blob_config",
    "open_reader",
    "open_writer",
    "parse_location",
]
