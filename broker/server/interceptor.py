"""Every call's pipeline: identity, authorization, parsing, status mapping, metrics and logs.

:class:`CallGuard` runs one call: it gives the call a request id, names the caller by the SPIFFE
ID in its client certificate, checks the per-method table (:mod:`broker.server.authz`), parses
the request bytes itself (so that a malformed message is ``INVALID_ARGUMENT``, not gRPC's own
``INTERNAL``), runs the servicer with the caller in a context variable, maps any exception to a
status (:func:`broker.server.status.status_for`), and records latency and an access log line.
Refusals by the table go to the audit log (action ``authz``, decision ``deny``, exact reason).
With a :class:`RevocationCheck` (``[tls] crl_files``), a client certificate on a revocation list
is refused as unauthenticated before the table is consulted.

:class:`GuardInterceptor` installs the guard in front of the broker's services on a real
server; :func:`guarded_servicer` does the same for grpcio-testing's in-process server, where
interceptors do not run.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from broker.model import AuditEntry
from broker.server.authz import ATTESTATION_SERVICE, RULES, authorize
from broker.server.errors import (
    CallerDeniedError,
    CallerUnauthenticatedError,
    InvalidRequestError,
    PeerRevokedError,
    StreamAbandonedError,
)
from broker.server.logs import new_request_id, request_id_var
from broker.server.metrics import BrokerMetrics
from broker.server.status import status_for
from pki.errors import CertificateRevokedError, CrlError, IdentityError, PeerIdentityError
from pki.identity import SpiffeId
from pki.tls import peer_certificate_der, peer_identity

log = logging.getLogger("cleanroom.broker.rpc")

_ATTEST_METHOD = f"/{ATTESTATION_SERVICE}/Attest"

REQUEST_ID_METADATA = "x-request-id"


@dataclass(frozen=True)
class Peer:
    """Who is calling: the SPIFFE ID and the DER of the client certificate that carries it."""

    identity: SpiffeId
    certificate_der: bytes


@dataclass(frozen=True)
class CallInfo:
    """What a servicer knows about the current call."""

    method: str
    peer: Peer
    request_id: str

    @property
    def caller(self) -> SpiffeId:
        return self.peer.identity


_current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "cleanroom_current_call", default=None
)


def current_call() -> CallInfo:
    """The call being served on this thread.

    Raises:
        CallerUnauthenticatedError: no guard is running the current call (a servicer was called
            directly); refusing is safer than guessing an identity.
    """
    call = _current_call.get()
    if call is None:
        raise CallerUnauthenticatedError("no authenticated call is in progress")
    return call


class Identify(Protocol):
    """Names the peer of a call. Raises PeerIdentityError or IdentityError when it cannot."""

    def __call__(self, context: grpc.ServicerContext) -> Peer: ...


class _AuthOnce:
    """A call's auth context, read from gRPC once (it builds a new dict on every read)."""

    __slots__ = ("_auth",)

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._auth = context.auth_context()

    def auth_context(self) -> Mapping[str, object]:
        return self._auth


def tls_peer(context: grpc.ServicerContext) -> Peer:
    """The peer named by its mTLS client certificate (the production :class:`Identify`).

    Raises:
        PeerIdentityError: no client certificate.
        IdentityError: the certificate carries no valid cleanroom SPIFFE ID.
    """
    auth = _AuthOnce(context)
    return Peer(peer_identity(auth), peer_certificate_der(auth))


class RevocationCheck(Protocol):
    """Refuses revoked client certificates (:class:`pki.crl.CrlWatcher` in production).

    ``check_der`` runs on every call, so it must cost about a dictionary lookup. It raises
    CertificateRevokedError for a revoked certificate and CrlError while it cannot tell.
    """

    def check_der(self, der: bytes) -> None: ...


#: What a caller with a revoked certificate is told (the serial and reason go to the audit log).
REVOKED_MESSAGE = "client certificate revoked"
#: What every caller is told while the revocation lists are unusable (fail closed).
REVOCATION_UNKNOWN_MESSAGE = "client certificate revocation status unknown"


class AuditSink(Protocol):
    """Where refusals are recorded (the broker's :class:`broker.audit.AuditLog`)."""

    def append(self, entry: AuditEntry) -> object: ...


def _metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    try:
        metadata = context.invocation_metadata()
    except Exception:  # grpcio-testing and odd transports: no metadata is fine
        return None
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key and isinstance(v, str):
            return v
    return None


def _peer_address(context: grpc.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # grpcio-testing does not implement peer()
        return "unknown"


Behavior = Callable[[Any, grpc.ServicerContext], Any]
StreamBehavior = Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]
Deserializer = Callable[[bytes], Any]


class CallGuard:
    """Runs calls through identity, authorization, parsing, status mapping, metrics and logs."""

    def __init__(
        self,
        *,
        trust_domain: str,
        audit: AuditSink | None,
        metrics: BrokerMetrics,
        identify: Identify = tls_peer,
        slow_call_seconds: float = 10.0,
        revocation: RevocationCheck | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.revocation = revocation
        self.audit = audit
        self.metrics = metrics
        self.identify = identify
        self.slow_call_seconds = slow_call_seconds
        # (method, code) -> the latency histogram's child: the label lookup (hashing, a lock)
        # runs once per pair instead of once per call. The set of pairs is bounded.
        self._latency: dict[tuple[str, grpc.StatusCode], Any] = {}

    # --- the pieces -------------------------------------------------------------------------

    def authenticate(self, method: str, context: grpc.ServicerContext) -> Peer:
        """Names the caller and, with a revocation check, refuses a revoked certificate.

        Raises:
            CallerUnauthenticatedError: no usable identity; PeerRevokedError (a subclass) when the
                certificate is revoked or the revocation lists are unusable. Recorded in the
                audit log and counted.
        """
        try:
            peer = self.identify(context)
        except (PeerIdentityError, IdentityError) as e:
            reason = f"unauthenticated peer {_peer_address(context)}: {e}"
            self._deny_unauthenticated(method, reason)
            raise CallerUnauthenticatedError(reason) from e
        if self.revocation is not None:
            try:
                self.revocation.check_der(peer.certificate_der)
            except CertificateRevokedError as e:
                reason = f"client certificate revoked: {peer.identity}: {e}"
                self._deny_unauthenticated(method, reason)
                raise PeerRevokedError(reason, public_message=REVOKED_MESSAGE) from e
            except CrlError as e:
                reason = f"revocation of {peer.identity}'s certificate cannot be checked: {e}"
                self._deny_unauthenticated(method, reason)
                raise PeerRevokedError(reason, public_message=REVOCATION_UNKNOWN_MESSAGE) from e
        return peer

    def _deny_unauthenticated(self, method: str, reason: str) -> None:
        self.metrics.authz_denials.labels(method.lstrip("/"), "unauthenticated").inc()
        self._audit_denial("unauthenticated", method, reason, ())

    def check_access(self, method: str, peer: Peer) -> None:
        """Raises: CallerDeniedError (recorded in the audit log and counted)."""
        try:
            authorize(method, peer.identity, trust_domain=self.trust_domain)
        except CallerDeniedError as e:
            who = peer.identity
            self.metrics.authz_denials.labels(method.lstrip("/"), who.kind).inc()
            parties = (who.name,) if who.kind == "party" else ()
            self._audit_denial(str(who), method, e.reason, parties)
            raise

    def _audit_denial(self, actor: str, method: str, reason: str, parties: tuple[str, ...]) -> None:
        log.warning("access denied to %s: %s", method, reason)
        self._audit_refusal(actor, "authz", method, reason, parties)

    def _audit_refusal(
        self, actor: str, action: str, subject: str, reason: str, parties: tuple[str, ...]
    ) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(
                AuditEntry(
                    actor=actor,
                    action=action,
                    subject=subject,
                    decision="deny",
                    reason=reason,
                    parties=parties,
                )
            )
        except Exception:
            # The caller is refused either way; a failed audit write must not turn the refusal
            # into an error, but it must be visible.
            log.exception("cannot record a refusal (%s) in the audit log", action)

    @staticmethod
    def parse(raw: Any, deserialize: Deserializer | None, method: str) -> Any:
        """Raises: InvalidRequestError: the bytes are not a valid message of the method."""
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError) as e:
            raise InvalidRequestError("", f"the request is not a valid {method} message") from e

    # --- one call ---------------------------------------------------------------------------

    def run(
        self,
        method: str,
        context: grpc.ServicerContext,
        raw: Any,
        behavior: Behavior,
        deserialize: Deserializer | None,
    ) -> Any:
        """Serves one unary call of the broker's services; aborts the call on any failure."""
        start = time.perf_counter()
        request_id = new_request_id(_metadata_value(context, REQUEST_ID_METADATA))
        rid_token = request_id_var.set(request_id)
        call_token: contextvars.Token[CallInfo | None] | None = None
        caller = "-"
        finished = False
        try:
            try:
                context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
            except Exception:  # noqa: S110 - the id is a courtesy; never fail a call for it
                pass
            try:
                peer = self.authenticate(method, context)
                caller = str(peer.identity)
                self.check_access(method, peer)
                try:
                    request = self.parse(raw, deserialize, method)
                except InvalidRequestError as e:
                    if method == _ATTEST_METHOD:
                        # Every refused attestation is in the audit log, bytes that are not an
                        # AttestRequest at all included (the servicer records the rest).
                        self._audit_refusal(caller, "attest", "", str(e), ())
                    raise
                call_token = _current_call.set(CallInfo(method, peer, request_id))
                return behavior(request, context)
            except Exception as exc:
                status = status_for(exc, full_method=method)
                self._log_refusal(method, caller, exc, status)
                # Recorded before the abort: once the status is set the client may already
                # see it, and a scrape right after must count this call.
                finished = True
                self._finish(method, caller, status.code, start)
                context.abort(status.code, status.message)
        finally:
            if not finished:
                self._finish(method, caller, grpc.StatusCode.OK, start)
            if call_token is not None:
                _current_call.reset(call_token)
            request_id_var.reset(rid_token)

    def run_stream(
        self,
        method: str,
        context: grpc.ServicerContext,
        raws: Iterator[Any],
        behavior: StreamBehavior,
        deserialize: Deserializer | None,
    ) -> Iterator[Any]:
        """Serves one bidirectional-streaming call of the broker's services as :meth:`run`
        serves a unary one: identity and the table once, each request message parsed here,
        failures mapped to a status that aborts the stream, one access-log line and one latency
        sample for the whole stream."""
        start = time.perf_counter()
        request_id = new_request_id(_metadata_value(context, REQUEST_ID_METADATA))
        rid_token = request_id_var.set(request_id)
        call_token: contextvars.Token[CallInfo | None] | None = None
        caller = "-"
        code = grpc.StatusCode.CANCELLED
        try:
            try:
                context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
            except Exception:  # noqa: S110 - the id is a courtesy; never fail a call for it
                pass
            try:
                peer = self.authenticate(method, context)
                caller = str(peer.identity)
                self.check_access(method, peer)
                requests = (self.parse(raw, deserialize, method) for raw in raws)
                call_token = _current_call.set(CallInfo(method, peer, request_id))
                yield from behavior(requests, context)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                # Reading the next message failed: the client cancelled, or gRPC refused the
                # message (too large); gRPC has already ended the call with its own status.
                raise StreamAbandonedError(f"{method}: the client went away") from exc
            except StreamAbandonedError:
                raise
            except Exception as exc:
                status = status_for(exc, full_method=method)
                code = status.code
                self._log_refusal(method, caller, exc, status)
                context.abort(status.code, status.message)
        except StreamAbandonedError:
            code = grpc.StatusCode.CANCELLED
        finally:
            # A stream the client abandons ends here too (GeneratorExit, code CANCELLED).
            self._finish(method, caller, code, start)
            try:
                if call_token is not None:
                    _current_call.reset(call_token)
                request_id_var.reset(rid_token)
            except ValueError:  # closed from another thread's context: nothing to reset
                pass

    def _log_refusal(self, method: str, caller: str, exc: Exception, status: Any) -> None:
        if status.unexpected:
            log.error(
                "%s failed: %s",
                method,
                type(exc).__name__,
                exc_info=exc,
                extra={"fields": {"method": method, "caller": caller}},
            )
        elif not isinstance(exc, CallerDeniedError | CallerUnauthenticatedError):
            # Refusals by the table were logged (and audited) where they happened.
            log.info(
                "%s refused: %s: %s",
                method,
                status.code.name,
                exc,
                extra={"fields": {"method": method, "caller": caller}},
            )

    def _finish(self, method: str, caller: str, code: grpc.StatusCode, start: float) -> None:
        """Records the call's latency and writes its access log line."""
        elapsed = time.perf_counter() - start
        histogram = self._latency.get((method, code))
        if histogram is None:
            histogram = self.metrics.rpc_latency.labels(method.lstrip("/"), code.name)
            self._latency[(method, code)] = histogram
        histogram.observe(elapsed)
        slow = elapsed > self.slow_call_seconds
        if not log.isEnabledFor(logging.WARNING if slow else logging.INFO):
            return
        fields = {
            "method": method,
            "caller": caller,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if slow:
            log.warning("slow call", extra={"fields": fields})
        else:
            log.info("call", extra={"fields": fields})

    def gate(self, method: str, context: grpc.ServicerContext) -> None:
        """Authentication and authorization only (for health and reflection); aborts on
        refusal."""
        try:
            self.check_access(method, self.authenticate(method, context))
        except (CallerUnauthenticatedError, CallerDeniedError) as exc:
            status = status_for(exc, full_method=method)
            context.abort(status.code, status.message)


class GuardInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Puts :class:`CallGuard` in front of every method of the server.

    The broker's own methods get the whole pipeline; health and reflection get authentication
    and the trust-domain check. Request parsing moves from gRPC into the guard for all of them,
    so malformed bytes are ``INVALID_ARGUMENT`` everywhere.
    """

    def __init__(self, guard: CallGuard) -> None:
        self.guard = guard
        self._cache: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[Any, Any] = cached[1]
            return wrapped
        wrapped = self._wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        guard = self.guard
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.unary_unary is not None and method in RULES:
            behavior = handler.unary_unary

            def guarded(raw: bytes, context: grpc.ServicerContext) -> Any:
                return guard.run(method, context, raw, behavior, deserialize)

            return grpc.unary_unary_rpc_method_handler(guarded, None, serialize)
        if handler.stream_stream is not None and method in RULES:
            stream_behavior = handler.stream_stream

            def guarded_stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                return guard.run_stream(method, context, raws, stream_behavior, deserialize)

            return grpc.stream_stream_rpc_method_handler(guarded_stream, None, serialize)

        def parse_or_abort(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return guard.parse(raw, deserialize, method)
            except InvalidRequestError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        def requests(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            for raw in raws:
                yield parse_or_abort(raw, context)

        if handler.unary_unary is not None:
            uu = handler.unary_unary

            def gated_uu(raw: bytes, context: grpc.ServicerContext) -> Any:
                guard.gate(method, context)
                return uu(parse_or_abort(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(gated_uu, None, serialize)
        if handler.unary_stream is not None:
            us = handler.unary_stream

            def gated_us(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                guard.gate(method, context)
                return us(parse_or_abort(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(gated_us, None, serialize)
        if handler.stream_unary is not None:
            su = handler.stream_unary

            def gated_su(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                guard.gate(method, context)
                return su(requests(raws, context), context)

            return grpc.stream_unary_rpc_method_handler(gated_su, None, serialize)
        ss = handler.stream_stream
        assert ss is not None

        def gated_ss(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            guard.gate(method, context)
            return ss(requests(raws, context), context)

        return grpc.stream_stream_rpc_method_handler(gated_ss, None, serialize)


class _GuardedServicer:
    """A servicer whose methods run through a :class:`CallGuard` (for grpcio-testing)."""

    def __init__(self, servicer: object, service: ServiceDescriptor, guard: CallGuard) -> None:
        self._servicer = servicer
        self._service = service
        self._guard = guard

    def __getattr__(self, name: str) -> Behavior:
        if name not in self._service.methods_by_name:
            raise AttributeError(name)
        behavior: Behavior = getattr(self._servicer, name)
        method = f"/{self._service.full_name}/{name}"
        guard = self._guard
        if self._service.methods_by_name[name].client_streaming:

            def guarded_stream(requests: Any, context: grpc.ServicerContext) -> Any:
                return guard.run_stream(method, context, requests, behavior, None)

            return guarded_stream

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            return guard.run(method, context, request, behavior, None)

        return guarded


def guarded_servicer(servicer: object, service: ServiceDescriptor, guard: CallGuard) -> object:
    """``servicer`` with every method of ``service`` run through ``guard``.

    grpcio-testing's in-process server calls servicer methods directly and runs no
    interceptors; this gives its calls the same pipeline a real server's calls get (requests
    arrive already parsed there).
    """
    return _GuardedServicer(servicer, service, guard)


__all__ = [
    "REQUEST_ID_METADATA",
    "REVOCATION_UNKNOWN_MESSAGE",
    "REVOKED_MESSAGE",
    "AuditSink",
    "CallGuard",
    "CallInfo",
    "GuardInterceptor",
    "Identify",
    "Peer",
    "PeerRevokedError",
    "RevocationCheck",
    "current_call",
    "guarded_servicer",
    "tls_peer",
]
