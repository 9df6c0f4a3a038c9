"""Parsing the locations this package reads and writes.

Accepted forms:

* a plain path, or ``file:///abs/path`` (``file://localhost/...`` too): a local file;
* ``azure://<account>/<container>/<blob path>``: a blob, reached through the configured endpoint;
* ``https://<account>.blob.core.windows.net/<container>/<blob path>[?<SAS>]``: a blob at that
  endpoint (another suffix when configured); a query string is taken as a SAS token;
* ``http(s)://<loopback host>:<port>/<account>/<container>/<blob path>``: path-style, as the
  Azurite emulator serves it. Plain ``http`` is accepted only for loopback hosts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from blobstore.errors import BlobUrlError

__all__ = ["BlobLocation", "LocalLocation", "Location", "is_blob_url", "parse_location"]

_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
# Container names: 3-63 characters, lowercase letters, digits and single hyphens, starting and
# ending with a letter or digit ("$root" and "$web" are the service's special containers).
_CONTAINER = re.compile(r"^(?:[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}|\$root|\$web)$")
_MAX_BLOB_NAME = 1024


@dataclass(frozen=True)
class LocalLocation:
    """A local file."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class BlobLocation:
    """A blob: account, container and blob name, plus what the URL itself said about access.

    Attributes:
        account: the storage account name.
        container: the container name.
        blob: the blob name (may contain ``/``).
        account_url: the endpoint the URL named (https or loopback URLs), else None: the
            configuration decides.
        sas_token: a SAS token from the URL's query, else None. Never shown by ``str``.
    """

    account: str
    container: str
    blob: str
    account_url: str | None = None
    sas_token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        # The canonical form, without any SAS token: safe in logs and error messages.
        return f"azure://{self.account}/{self.container}/{self.blob}"


Location = LocalLocation | BlobLocation


def is_blob_url(url: str) -> bool:
    """Whether ``url`` names a blob (``azure://``, ``https://`` or ``http://``) rather than a
    local file."""
    scheme = urlsplit(url).scheme.lower()
    return scheme in ("azure", "https", "http")


def _split_container_blob(path: str, url: str) -> tuple[str, str]:
    container, sep, blob = path.lstrip("/").partition("/")
    if not sep or not blob:
        raise BlobUrlError(f"{url}: expected <container>/<blob name> after the account")
    if not _CONTAINER.match(container):
        raise BlobUrlError(
            f"{url}: {container!r} is not a valid container name "
            "(3-63 lowercase letters, digits and single hyphens)"
        )
    if len(blob) > _MAX_BLOB_NAME or blob.endswith("/") or "//" in blob:
        raise BlobUrlError(
            f"{url}: the blob name has an empty segment, ends with '/' or is too long"
        )
    if any(part in (".", "..") for part in blob.split("/")):
        raise BlobUrlError(f"{url}: the blob name must not contain '.' or '..' segments")
    return container, blob


def _check_account(account: str, url: str) -> str:
    if not _ACCOUNT.match(account):
        raise BlobUrlError(
            f"{url}: {account!r} is not a valid storage account name (3-24 lowercase letters "
            "and digits)"
        )
    return account


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_location(url: str | Path, *, endpoint_suffix: str = "core.windows.net") -> Location:
    """Parses a path or URL into a :class:`LocalLocation` or a :class:`BlobLocation`.

    Raises:
        BlobUrlError: the URL is malformed, names an unknown scheme, a non-blob host, plain
            http to a non-loopback host, or an invalid account, container or blob name.
    """
    if isinstance(url, Path):
        return LocalLocation(url)
    if not url:
        raise BlobUrlError("an empty path or URL")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A one-letter scheme is a Windows drive letter; anything without "//" is a relative path
    # such as "data:v1" and not meant as a URL.
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BlobUrlError(f"{url}: a file URL must name a local file (no host)")
        return LocalLocation(Path(unquote(parts.path)))
    if not scheme or not url[len(scheme) + 1 :].startswith("//"):
        return LocalLocation(Path(url))
    if parts.fragment:
        raise BlobUrlError(f"{url}: a blob URL must not have a fragment")
    if scheme == "azure":
        if parts.query:
            raise BlobUrlError(f"{url}: azure:// URLs take no query; configure a SAS token instead")
        account = _check_account(parts.netloc, url)
        container, blob = _split_container_blob(unquote(parts.path), url)
        return BlobLocation(account=account, container=container, blob=blob)
    if scheme not in ("https", "http"):
        raise BlobUrlError(f"{url}: unsupported scheme {parts.scheme!r} (use a path or azure://)")
    host = (parts.hostname or "").lower()
    sas = parts.query or None
    shown = url.split("?", 1)[0]
    if _is_loopback(host):
        # Path-style, as the emulator serves it: /<account>/<container>/<blob>.
        account, sep, rest = unquote(parts.path).lstrip("/").partition("/")
        if not sep:
            raise BlobUrlError(
                f"{shown}: expected /<account>/<container>/<blob> on a loopback host"
            )
        _check_account(account, shown)
        container, blob = _split_container_blob(rest, shown)
        endpoint = f"{scheme}://{parts.netloc}/{account}"
        return BlobLocation(account, container, blob, account_url=endpoint, sas_token=sas)
    if scheme != "https":
        raise BlobUrlError(f"{shown}: plain http is allowed only to a loopback emulator")
    suffix = f".blob.{endpoint_suffix.lower()}"
    if not host.endswith(suffix):
        raise BlobUrlError(f"{shown}: {host!r} is not a blob endpoint (*{suffix})")
    account = _check_account(host[: -len(suffix)], shown)
    container, blob = _split_container_blob(unquote(parts.path), shown)
    endpoint = f"https://{parts.netloc}"
    return BlobLocation(account, container, blob, account_url=endpoint, sas_token=sas)
