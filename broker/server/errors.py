"""Errors of the broker's gRPC layer. They derive from :class:`broker.errors.BrokerError`.

They describe what the transport layer itself refuses: a malformed request, a caller without an
acceptable identity or role, too many requests. The core's errors (``broker.errors``) describe
what the broker refuses after reading a well-formed request; both are mapped to status codes in
one place, :func:`broker.server.status.status_for`.
"""

from __future__ import annotations

from broker.errors import BrokerError


class ServerError(BrokerError):
    """Root of the errors raised by ``broker.server``."""


class InvalidRequestError(ServerError):
    """A request is malformed: a required field is missing, a value is out of range, a bytes
    field has the wrong length, an enum value is unknown or unspecified, or the message does not
    parse. ``field`` names the offending field (dotted path, e.g. ``quote.attest``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class CallerUnauthenticatedError(ServerError):
    """The caller presented no usable identity (no client certificate, no SPIFFE ID in it, or
    a revoked certificate).

    ``str(e)`` is the exact reason (for the audit log); clients get the short
    ``public_message``.
    """

    def __init__(
        self,
        reason: str,
        *,
        public_message: str = "a client certificate with a SPIFFE ID is required",
    ) -> None:
        super().__init__(reason)
        self.public_message = public_message


class PeerRevokedError(CallerUnauthenticatedError):
    """The caller's certificate is revoked, or its revocation cannot be checked right now
    (status ``UNAUTHENTICATED``, with its own client message)."""


class CallerDeniedError(ServerError):
    """The caller's identity may not call this method (wrong role or trust domain).

    ``str(e)`` is the exact reason (for the audit log and server log); clients get the short
    ``public_message``.
    """

    def __init__(self, reason: str, *, public_message: str = "permission denied") -> None:
        super().__init__(reason)
        self.reason = reason
        self.public_message = public_message


class RateLimitedError(ServerError):
    """The caller (peer identity or AK) asked for challenges faster than configured."""


class ServerSetupError(ServerError):
    """The server cannot start: the listen address cannot be bound, or TLS files are unusable."""


class StreamStepError(ServerError):
    """A step of a streaming call failed (``error``, its cause).

    Its status is the one that ``error`` would get from ``method``, the unary call the step
    stands for (``/cleanroom.v1.AttestationService/Attest`` for the evidence of an
    ``AttestStream``), so a refusal on the stream is exactly as opaque as on the unary call.
    """

    def __init__(self, method: str, error: Exception) -> None:
        super().__init__(str(error))
        self.method = method
        self.error = error


class StreamAbandonedError(ServerError):
    """The client of a streaming call went away (cancelled, or its message could not be
    received) before the call was done; there is no one to answer."""
