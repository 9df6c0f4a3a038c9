"""The errors of the broker's gRPC client (:mod:`broker.client`): one class per status code.

They are the caller's view of a call, the status code the broker (or gRPC) answered with and its
one-line message, so a caller acts on them without importing gRPC. They live apart from the
core's tree (:mod:`broker.errors`), which names why the broker refuses something: a client sees
only the code and the opaque message the broker chose to send. Their root,
:class:`BrokerClientError`, derives from :class:`broker.errors.BrokerError` and so from the
project's root, :class:`cleanroom.errors.CleanroomError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.errors import BrokerError

if TYPE_CHECKING:
    # Typing only: a caller that catches these errors does not load gRPC for them.
    import grpc

    from cleanroom.v1 import attestation_pb2


class BrokerClientError(BrokerError):
    """A call to the broker failed, or the client could not be set up.

    Attributes:
        code: the gRPC status code, or None when no call was made (bad files, bad target).
        details: the broker's (or gRPC's) message, on one line.
        method: the RPC's short name (``"EnrollAk"``), or ``""`` when no call was made.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str = "",
        method: str = "",
        denial: attestation_pb2.AttestDenial | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details
        self.method = method
        #: For a refused ``Attest``: the broker's coarse reason and the sequence of the audit
        #: record with the exact one (see ``AttestDenial``); None when the broker sent none.
        self.denial = denial


class ClientSetupError(BrokerClientError):
    """The client cannot be set up: a certificate, key or CA file is missing, mismatched,
    expired or untrusted, or the target is malformed. No call was made."""


class InvalidArgumentError(BrokerClientError):
    """``INVALID_ARGUMENT`` or ``OUT_OF_RANGE``: the broker refused a malformed request."""


class UnauthenticatedError(BrokerClientError):
    """``UNAUTHENTICATED``: the broker found no usable identity in the client certificate."""


class PermissionDeniedError(BrokerClientError):
    """``PERMISSION_DENIED``: the caller's role may not make this call, or policy refused it."""


class NotFoundError(BrokerClientError):
    """``NOT_FOUND``: an object named in the request does not exist."""


class AlreadyExistsError(BrokerClientError):
    """``ALREADY_EXISTS``: an object with the same identifier exists already."""


class FailedPreconditionError(BrokerClientError):
    """``FAILED_PRECONDITION``: not enrolled, revoked, or an expired challenge or nonce."""


class ResourceExhaustedError(BrokerClientError):
    """``RESOURCE_EXHAUSTED``: rate limited, or a message was too large."""


class UnavailableError(BrokerClientError):
    """``UNAVAILABLE``: the broker cannot be reached, or it has a transient fault. Raised after
    the retries that the call allows (see the module docstring)."""


class DeadlineExceededError(BrokerClientError):
    """``DEADLINE_EXCEEDED``: the call took longer than the client's timeout."""


class UnimplementedError(BrokerClientError):
    """``UNIMPLEMENTED``: the server does not offer this call (another version or service)."""


__all__ = [
    "AlreadyExistsError",
    "BrokerClientError",
    "ClientSetupError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
