"""Errors of the sidecar's data path (``sidecar.dataplane``).

They sit under the sidecar's root error::

    SidecarError
    └── DataPlaneError
        ├── WorkloadInputError         an input cannot be served
        │   ├── UnknownInputError          no input of that name
        │   ├── InputSourceError           the ciphertext cannot be read (storage, scheme)
        │   └── InputAuthenticationError   the ciphertext is tampered, truncated or mis-keyed
        ├── KeyRingError               no usable data key
        │   ├── UnknownDataKeyError            the key ring holds no key of that id
        │   ├── AttestationExpiredError    the attestation lifetime passed, no way to renew it
        │   └── ReattestationError         renewing the attestation failed
        ├── WorkloadOutputError        an output cannot be accepted or stored
        │   ├── OutputNameError            the name is empty, absolute, escapes the directory...
        │   ├── OutputExistsError          an output of that name exists or is being written
        │   └── OutputStoreError           writing, sealing or committing the output failed
        ├── SocketSetupError           the workload socket or its directory cannot be made safe
        ├── CallRefusedError           a workload call ends with a status (code and details)
        └── DataConnectionClosedError  the workload closed or broke a data connection

Messages name inputs, outputs, key ids and paths, never key material or plaintext. The names
differ from the workload SDK's (``workload.InputError``, ``workload.InputIntegrityError``,
``workload.OutputError``), which describe the same failures as the workload sees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.errors import SidecarError

if TYPE_CHECKING:
    import grpc


class DataPlaneError(SidecarError):
    """Root of the errors of the sidecar's data path."""


class WorkloadInputError(DataPlaneError):
    """An input cannot be served to the workload."""


class UnknownInputError(WorkloadInputError):
    """The workload asked for an input that the session does not have."""


class InputSourceError(WorkloadInputError):
    """The input's ciphertext cannot be opened or read (missing file, unsupported URL scheme)."""


class InputAuthenticationError(WorkloadInputError):
    """The input's ciphertext failed authentication: tampered, truncated, not a sealed stream,
    or sealed under another key than the one registered for it."""


class KeyRingError(DataPlaneError):
    """The key ring cannot hand out a data key."""


class UnknownDataKeyError(KeyRingError):
    """The key ring holds no key with the requested id (the broker did not release it)."""


class AttestationExpiredError(KeyRingError):
    """The attestation lifetime has passed and no re-attestation is possible."""


class ReattestationError(KeyRingError):
    """The attestation lifetime has passed and re-attesting with the broker failed."""


class WorkloadOutputError(DataPlaneError):
    """A workload output cannot be accepted, sealed or stored."""


class OutputNameError(WorkloadOutputError):
    """An output name is empty, absolute, contains ``..``, NUL or a symlinked directory, or
    otherwise would land outside the output location."""


class OutputExistsError(WorkloadOutputError):
    """An output of that name already exists or is being written by another stream."""


class OutputStoreError(WorkloadOutputError):
    """Writing, sealing or committing an output failed."""


class SocketSetupError(DataPlaneError):
    """The workload socket's directory or the socket cannot be created with safe permissions."""


class CallRefusedError(DataPlaneError):
    """A workload call (gRPC or on a data connection) ends with the status ``code`` and the
    message ``details``, which the workload sees."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class DataConnectionClosedError(DataPlaneError):
    """The workload closed or reset a data connection; nothing more can be sent on it."""
