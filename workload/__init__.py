"""The workload SDK: read the clean room's inputs and write its outputs through the sidecar.

A workload runs under the sidecar, which puts the socket path in ``CLEANROOM_WORKLOAD_SOCKET``.
The module-level helpers use one shared :class:`Client` made from that variable::

    import workload

    for row in workload.read_csv("advertiser/conversions.csv"):
        ...
    with workload.create_output("insights/summary.csv") as out:
        out.write(b"segment,count\\n...")

The streams work with the data stack directly: ``pandas.read_csv(workload.open_input(name))``,
``pyarrow.csv.open_csv(...)`` over the same stream, ``frame.to_csv(out)`` or
``fig.savefig(out)`` into an output, and ``workload.open_seekable_input(name)`` for Parquet.

The workload never sees a key: it gets plaintext streams, and the sidecar seals each output to
the recipients the approved workload names. See docs/workload-sdk.md.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from workload.client import (
    DEFAULT_MAX_SEEKABLE_BYTES,
    SOCKET_ENV,
    Client,
    InputInfo,
    InputStream,
    OutputReceipt,
    OutputStream,
    TextOutputStream,
    default_client,
    seekable_copy,
)
from workload.errors import (
    AccessDeniedError,
    InputError,
    InputIntegrityError,
    InputNotFoundError,
    InputTooLargeError,
    InputUnavailableError,
    OutputError,
    OutputFailedError,
    OutputRejectedError,
    ProtocolError,
    SidecarConnectionError,
    WorkloadError,
)

__all__ = [
    "DEFAULT_MAX_SEEKABLE_BYTES",
    "SOCKET_ENV",
    "AccessDeniedError",
    "Client",
    "InputError",
    "InputInfo",
    "InputIntegrityError",
    "InputNotFoundError",
    "InputStream",
    "InputTooLargeError",
    "InputUnavailableError",
    "OutputError",
    "OutputFailedError",
    "OutputReceipt",
    "OutputRejectedError",
    "OutputStream",
    "ProtocolError",
    "SidecarConnectionError",
    "TextOutputStream",
    "WorkloadError",
    "create_output",
    "create_text_output",
    "default_client",
    "list_inputs",
    "open_input",
    "open_seekable_input",
    "read_csv",
    "seekable_copy",
]


def list_inputs() -> list[InputInfo]:
    """The inputs the sidecar offers (see :meth:`Client.list_inputs`).

    Raises:
        SidecarConnectionError, AccessDeniedError, WorkloadError: the call failed.
    """
    return default_client().list_inputs()


def open_input(name: str) -> InputStream:
    """Opens an input's plaintext stream (see :meth:`Client.open_input`).

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
    """
    return default_client().open_input(name)


def open_seekable_input(name: str, *, max_bytes: int = DEFAULT_MAX_SEEKABLE_BYTES) -> io.BytesIO:
    """Reads a whole input into a bounded in-memory seekable file, for Parquet (see
    :meth:`Client.open_seekable_input`).

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
        InputTooLargeError: the input holds more than ``max_bytes``.
        InputIntegrityError, InputNotFoundError, WorkloadError: see :class:`InputStream`.
    """
    return default_client().open_seekable_input(name, max_bytes=max_bytes)


def create_output(name: str) -> OutputStream:
    """Starts a binary output (see :meth:`Client.create_output`).

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
    """
    return default_client().create_output(name)


def create_text_output(
    name: str, *, encoding: str = "utf-8", newline: str | None = ""
) -> TextOutputStream:
    """Starts a text output (see :meth:`Client.create_text_output`).

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
    """
    return default_client().create_text_output(name, encoding=encoding, newline=newline)


def read_csv(name: str, *, encoding: str = "utf-8", **fmtparams: Any) -> Iterator[dict[str, str]]:
    """Yields a CSV input's rows as dicts (see :meth:`Client.read_csv`).

    Raises:
        SidecarConnectionError: ``CLEANROOM_WORKLOAD_SOCKET`` is unset.
        InputIntegrityError, InputNotFoundError, WorkloadError: see :class:`InputStream`.
    """
    return default_client().read_csv(name, encoding=encoding, **fmtparams)
