"""Errors of the ``workload`` package. Every error it raises derives from :class:`WorkloadError`.

The tree, by failure area::

    WorkloadError
    ├── SidecarConnectionError     the socket is not configured or the sidecar cannot be reached
    ├── AccessDeniedError          the sidecar refused this process (not in the workload's tree)
    ├── ProtocolError              the sidecar answered with something this SDK does not expect
    │   └── WireError                  a message or frame is not valid for its type
    ├── InputError                 an input cannot be read
    │   ├── InputNotFoundError         no input of that name
    │   ├── InputIntegrityError        the input is tampered or truncated: discard what was read
    │   ├── InputUnavailableError      the sidecar cannot serve it now (attestation expired,
    │   │                              storage unreachable)
    │   └── InputTooLargeError         a seekable (in-memory) copy would exceed its limit
    └── OutputError                an output cannot be written
        ├── OutputRejectedError        bad name or an output of that name already exists
        └── OutputFailedError          the sidecar could not seal or store it; nothing is kept
"""

from cleanroom.errors import CleanroomError


class WorkloadError(CleanroomError):
    """Root of every error the ``workload`` package raises."""


class SidecarConnectionError(WorkloadError):
    """``CLEANROOM_WORKLOAD_SOCKET`` is unset, or the sidecar's socket cannot be reached."""


class AccessDeniedError(WorkloadError):
    """The sidecar refused the call: this process is not part of the workload it started."""


class ProtocolError(WorkloadError):
    """The sidecar sent something this SDK does not understand (version mismatch?)."""


class WireError(ProtocolError, ValueError):
    """A message is not valid protobuf for its type, or a data-connection frame is malformed
    (see docs/workload-sdk.md, "The data connection")."""


class InputError(WorkloadError):
    """An input cannot be read."""


class InputNotFoundError(InputError):
    """The session has no input of that name (see ``list_inputs()``)."""


class InputIntegrityError(InputError):
    """The input failed authentication (tampered, truncated, or sealed under another key), or
    its stream ended before the sidecar confirmed the end. Everything read from it so far must
    be discarded."""


class InputUnavailableError(InputError):
    """The sidecar cannot serve the input now: its attestation expired and could not be renewed,
    or the sealed data cannot be read from storage."""


class InputTooLargeError(InputError):
    """An input is larger than the limit set for an in-memory seekable copy of it (see
    :func:`workload.client.seekable_copy`); nothing of it is kept."""


class OutputError(WorkloadError):
    """An output cannot be written."""


class OutputRejectedError(OutputError):
    """The sidecar refused the output: the name is not an acceptable relative name, or an output
    of that name already exists."""


class OutputFailedError(OutputError):
    """The output was not committed: the sidecar failed to seal or store it, the stream was
    aborted, or the connection broke. No complete-looking output is left behind."""
