"""Errors of the ``blobstore`` package. Every error it raises derives from :class:`BlobStoreError`.

::

    BlobStoreError (an OSError)
    ├── BlobUrlError             the URL is not one this package understands
    ├── BlobConfigError          the configuration cannot authenticate or reach the account
    ├── BlobAuthError            the service refused the credentials (401/403) or none were found
    ├── ContainerNotFoundError   the container does not exist
    ├── BlobNotFoundError        the blob (or local file) does not exist
    ├── BlobExistsError          the blob exists and overwriting was not allowed
    └── BlobChangedError         the blob was replaced while it was being read

:class:`BlobStoreError` derives from :class:`OSError` on purpose: readers and writers of this
package are file objects, and the code that consumes file objects (the sealed envelope, the
sidecar's data path, ``shutil``) treats a failing read or write as an ``OSError``. A storage
failure in the middle of a stream is then handled like a failing disk rather than escaping as an
unexpected exception. Messages name URLs without their SAS query, never credentials.
"""

from __future__ import annotations

from cleanroom.errors import CleanroomError


class BlobStoreError(CleanroomError, OSError):
    """Root of every error the ``blobstore`` package raises."""

    def __init__(self, message: str) -> None:
        # One argument only: OSError(errno, strerror) would otherwise reinterpret two.
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BlobUrlError(BlobStoreError):
    """The URL is malformed or names a scheme, host or path this package does not handle."""


class BlobConfigError(BlobStoreError):
    """The configuration is inconsistent (e.g. a connection string for another account)."""


class BlobAuthError(BlobStoreError):
    """The storage service refused the credentials (HTTP 401 or 403), or none could be had."""


class ContainerNotFoundError(BlobStoreError):
    """The container named in the URL does not exist."""


class BlobNotFoundError(BlobStoreError):
    """The blob named in the URL does not exist (for local paths: the file does not)."""


class BlobExistsError(BlobStoreError):
    """The blob already exists and the writer was opened without ``overwrite``."""


class BlobChangedError(BlobStoreError):
    """The blob was replaced or modified while it was being read (its ETag changed)."""


__all__ = [
    "BlobAuthError",
    "BlobChangedError",
    "BlobConfigError",
    "BlobExistsError",
    "BlobNotFoundError",
    "BlobStoreError",
    "BlobUrlError",
    "ContainerNotFoundError",
]
