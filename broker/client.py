"""A typed client of the broker's gRPC services (attestation and admin) over mutual TLS.

:class:`BrokerClient` has one method per RPC of ``AttestationService`` (the sidecar's calls) and
``AdminService`` (the operator's and the parties' calls). Every call carries a deadline. Errors
come back as :class:`BrokerClientError` subclasses named after the gRPC status code family, with
the code and the broker's message, so callers can act on them without importing gRPC.

Retries. Only ``UNAVAILABLE`` is ever retried; every other code is a definite answer. The
client retries with exponential backoff and jitter (:class:`RetryPolicy`), but how depends on
whether repeating the call is harmless:

* *Idempotent* calls (every ``Get``/``List``/``Verify``, ``SetGoldenPcrSet`` and
  ``SetPartyKek`` which replace what they set, ``RewrapDataKey`` which leaves the same key under
  the same KEK when repeated, ``CheckKek``, the revocations and ``DeleteGoldenPcrSet``,
  ``GetChallenge`` whose unused nonce simply expires, ``StartEnrollment`` whose unanswered
  challenge simply expires, and ``EndSession``) are retried on any ``UNAVAILABLE``.
* *Once-only* calls (``EnrollEk``, ``EnrollAk``, ``AddParty``, ``RegisterDataKey``,
  ``ApproveWorkload``, ``CompleteEnrollment``, ``Attest``, ``AttestStream``) are sent only over
  a connection that is known to work, and are never repeated once sent: an ``UNAVAILABLE``
  after sending can mean that the broker did the work and the answer was lost. Repeating would
  then create a second approval, or fail confusingly with ``ALREADY_EXISTS``; for ``Attest`` it
  could not succeed at all, because the broker consumes the nonce on the first attempt and
  refuses it the second time. So when a once-only call's channel is not connected, the client
  first proves the connection with a standard health check (idempotent, retried like any
  idempotent call), and then sends the call exactly once. On ``UNAVAILABLE`` the caller
  decides: list to see whether the change happened, or (for ``Attest``) ask for a new
  challenge.

A deadline that expires (``DEADLINE_EXCEEDED``) is never retried either: the broker may still be
working on the request, and a slow broker should not get more load.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from broker.client_errors import (
    AlreadyExistsError,
    BrokerClientError,
    ClientSetupError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from cleanroom.closing import Closeable
from cleanroom.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
)
from pki.identity import SpiffeId

log = logging.getLogger(__name__)

#: Seconds each call may take before the client gives up on it.
DEFAULT_TIMEOUT: Final = 10.0
#: Extra attempts after an ``UNAVAILABLE`` answer (idempotent calls only).
DEFAULT_RETRIES: Final = 3
#: Largest message the client accepts from the broker (the broker's own limit is smaller).
MAX_RECEIVE_BYTES: Final = 4 << 20

_ADMIN: Final = "cleanroom.v1.AdminService"
_ATTESTATION: Final = "cleanroom.v1.AttestationService"


_ERROR_FOR_CODE: Final[Mapping[grpc.StatusCode, type[BrokerClientError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


#: The binary trailing metadata that carries an ``AttestDenial`` with a refused ``Attest``.
ATTEST_DENIAL_METADATA: Final = "cleanroom-attest-denial-bin"


def _denial(exc: grpc.Call) -> attestation_pb2.AttestDenial | None:
    """The ``AttestDenial`` in a failed call's trailing metadata, if it holds a readable one."""
    try:
        trailing = exc.trailing_metadata() or ()
    except Exception:  # a call that failed before any metadata: nothing to read
        return None
    for key, value in trailing:
        if key == ATTEST_DENIAL_METADATA and isinstance(value, bytes):
            denial = attestation_pb2.AttestDenial()
            try:
                denial.ParseFromString(value)
            except DecodeError:
                return None
            return denial
    return None


def error_from_rpc(exc: grpc.RpcError, *, method: str, target: str = "") -> BrokerClientError:
    """The :class:`BrokerClientError` subclass for a failed call's status code.

    The message reads ``"<Method>: <details> [<CODE>]"`` (with the target for connection
    failures), on one line. A refused ``Attest`` carries the broker's ``AttestDenial`` as
    ``denial`` when the broker sent one.
    """
    code: grpc.StatusCode | None = None
    details = ""
    denial = None
    if isinstance(exc, grpc.Call):
        code = exc.code()
        details = exc.details() or ""
        denial = _denial(exc)
    details = " ".join(details.split())  # one line, whatever gRPC put in it
    if not details:
        details = "no details"
    if code is grpc.StatusCode.UNAVAILABLE:
        from broker.tls_hints import explain_tls_failure

        hint = explain_tls_failure(details)
        if hint is not None:
            # The cause first; gRPC's own words last, for whoever needs them.
            details = f"TLS handshake failed: {hint} ({details.rsplit(': ', 1)[-1]})"
    cls = _ERROR_FOR_CODE.get(code, BrokerClientError) if code is not None else BrokerClientError
    where = f" (broker {target})" if target and code is grpc.StatusCode.UNAVAILABLE else ""
    name = code.name if code is not None else "UNKNOWN"
    return cls(
        f"{method}: {details} [{name}]{where}",
        code=code,
        details=details,
        method=method,
        denial=denial,
    )


# --- retries --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter for ``UNAVAILABLE``.

    Before retry ``n`` (0-based) the client sleeps a random time between half and all of
    ``min(max_backoff, initial_backoff * multiplier**n)`` seconds. The random half spreads the
    retries of many clients that lost the broker at the same moment ("equal jitter"), while the
    fixed half keeps a lone client from hammering a broker that is restarting.

    Raises:
        ValueError: a negative retry count or non-positive backoff.
    """

    retries: int = DEFAULT_RETRIES
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoffs must be positive and max_backoff >= initial_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return (rng or _rng).uniform(ceiling / 2, ceiling)


_rng = random.Random()  # jitter needs no cryptographic quality

#: Calls that may be repeated without changing the outcome (see the module docstring).
IDEMPOTENT_METHODS: Final = frozenset(
    {
        "GetBrokerInfo",
        "RevokeEk",
        # Re-admitting an EK that is not revoked changes nothing.
        "ReadmitEk",
        "ListEks",
        "RevokeAk",
        "ListAks",
        "SetGoldenPcrSet",
        "ListGoldenPcrSets",
        "DeleteGoldenPcrSet",
        "ListParties",
        "ListDataKeys",
        "RevokeApproval",
        "ListApprovals",
        "ListAuditRecords",
        "VerifyAuditLog",
        # Setting a party's KEK replaces it; a repeated rewrap leaves the same key under the
        # same KEK (only its random wrapping differs); a check changes nothing.
        "SetPartyKek",
        "ListPartyKeks",
        "RewrapDataKey",
        "CheckKek",
        "GetStatus",
        "StartEnrollment",
        "GetChallenge",
        "EndSession",
    }
)

_T = TypeVar("_T")
_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)
_ReqIn = TypeVar("_ReqIn", bound=Message, contravariant=True)
_RespOut = TypeVar("_RespOut", bound=Message, covariant=True)


class _Unary(Protocol[_ReqIn, _RespOut]):
    def __call__(
        self, request: _ReqIn, /, *, timeout: float | None = ..., wait_for_ready: bool | None = ...
    ) -> _RespOut: ...


# --- the client -----------------------------------------------------------------------------


def _channel_options(server_name: str | None) -> list[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        # gRPC's default reconnect backoff starts at 1 s; the client's own retries are shorter,
        # so a broker that comes back is found within the retry budget.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientSetupError(f"broker address {target!r} is not HOST:PORT")


class BrokerClient(Closeable):
    """A connection to the broker. Use :meth:`connect`; close it or use it in a ``with`` block.

    The client is thread-safe (gRPC channels are), so one client can serve many threads.
    """

    def __init__(
        self,
        *,
        channel: grpc.Channel,
        target: str,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        identity: SpiffeId | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Wraps an open channel (mostly for tests; :meth:`connect` is the usual way in).

        ``identity`` is the SPIFFE ID of the client certificate, when known; calls that need to
        know who the caller is (:meth:`register_plain_data_key`) require it.

        Raises:
            ValueError: a non-positive timeout.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._channel = channel
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.identity = identity
        self._sleep = sleep
        self._admin = admin_pb2_grpc.AdminServiceStub(channel)
        self._attestation = attestation_pb2_grpc.AttestationServiceStub(channel)
        self._connected = False
        self._closed = False

    @classmethod
    def connect(
        cls,
        *,
        target: str,
        cert_file: str | Path,
        key_file: str | Path,
        ca_file: str | Path,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry: RetryPolicy | None = None,
    ) -> BrokerClient:
        """Opens an mTLS channel to the broker at ``target`` (``HOST:PORT``).

        The certificate, key and CA files are checked first (readable, key matches, not
        expired, issued by a CA in ``ca_file``) so that a bad file gets a clear message instead
        of a failed handshake. No connection is made until the first call. ``server_name``
        overrides the name the broker's certificate must carry (default: the target's host).
        ``retries`` is the number of retries after ``UNAVAILABLE`` with the default backoff;
        ``retry`` replaces the whole policy.

        Raises:
            ClientSetupError: a file is missing, malformed, mismatched, expired or untrusted,
                the certificate has no cleanroom SPIFFE ID, or the target is not HOST:PORT.
        """
        from pki.errors import PKIError
        from pki.tls import TlsFiles, channel_credentials, check_files

        _check_target(target)
        if timeout <= 0:
            raise ClientSetupError("the timeout must be positive")
        if retries < 0:
            raise ClientSetupError("the number of retries must be >= 0")
        files = TlsFiles(cert_file=Path(cert_file), key_file=Path(key_file), ca_file=Path(ca_file))
        try:
            identity = check_files(files, usage="client")
            creds = channel_credentials(cert_file=cert_file, key_file=key_file, ca_file=ca_file)
        except PKIError as e:
            raise ClientSetupError(f"client certificate: {e}") from e
        channel = grpc.secure_channel(target, creds, options=_channel_options(server_name))
        return cls(
            channel=channel,
            target=target,
            timeout=timeout,
            retry=retry or RetryPolicy(retries=retries),
            identity=identity,
        )

    # --- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()

    def _note(self, code: grpc.StatusCode | None) -> None:
        # Whether the last call reached the broker: any answer but UNAVAILABLE came over a
        # working connection. Used to skip the connection probe before once-only calls.
        self._connected = code is not grpc.StatusCode.UNAVAILABLE

    def _attempts(self, method: str, send: Callable[[], _T]) -> _T:
        """Runs ``send`` and retries it on UNAVAILABLE as the policy allows."""
        retry = 0
        while True:
            try:
                result = send()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                self._note(code)
                if code is not grpc.StatusCode.UNAVAILABLE or retry >= self.retry.retries:
                    raise error_from_rpc(e, method=method, target=self.target) from e
                pause = self.retry.delay(retry)
                log.info(
                    "%s: broker %s unavailable; retry %d of %d in %.2f s",
                    method,
                    self.target,
                    retry + 1,
                    self.retry.retries,
                    pause,
                )
                self._sleep(pause)
                retry += 1
            else:
                self._note(None)
                return result

    def _ensure_connected(self, method: str) -> None:
        """Proves the channel works before a once-only call is sent (see the module docstring).

        Raises:
            BrokerClientError: the health check failed after its retries; the subclass follows
                its status code (UnavailableError when the broker cannot be reached).
        """
        if self._connected:
            return
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check = health_pb2_grpc.HealthStub(self._channel).Check

        def probe() -> None:
            try:
                check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                # Any answer other than UNAVAILABLE came over a working connection; whether the
                # server offers the health service does not matter here.
                if code is grpc.StatusCode.UNAVAILABLE:
                    raise

        self._attempts(method, probe)

    def _call(self, method: str, rpc: _Unary[_Req, _Resp], request: _Req) -> _Resp:
        if self._closed:
            raise ClientSetupError(f"{method}: the client is closed", method=method)
        if method in IDEMPOTENT_METHODS:
            return self._attempts(method, lambda: rpc(request, timeout=self.timeout))
        self._ensure_connected(method)
        try:
            # wait_for_ready: should the connection drop between the probe and this call, gRPC
            # reconnects (within the deadline) instead of failing a call it never sent, so an
            # UNAVAILABLE here really means "sent, outcome unknown".
            response = rpc(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            self._note(e.code() if isinstance(e, grpc.Call) else None)
            raise error_from_rpc(e, method=method, target=self.target) from e
        self._note(None)
        return response

    # --- AttestationService (sidecars) -----------------------------------------------------

    def start_enrollment(
        self,
        *,
        ek_public: bytes,
        ak_public: bytes,
        ek_certificate: bytes = b"",
        snp_evidence: attestation_pb2.SnpEvidence | None = None,
    ) -> attestation_pb2.StartEnrollmentResponse:
        """Starts credential activation of an AK under an EK (both marshalled TPM2B_PUBLIC);
        on an Azure SEV-SNP confidential VM ``snp_evidence`` may vouch for the EK.

        Raises:
            BrokerClientError: the subclass for the status code (InvalidArgumentError for a
                refused key, PermissionDeniedError for an untrusted EK certificate, ...).
        """
        req = attestation_pb2.StartEnrollmentRequest(
            ek_public=ek_public, ek_certificate=ek_certificate, ak_public=ak_public
        )
        if snp_evidence is not None:
            req.snp_evidence.CopyFrom(snp_evidence)
        return self._call("StartEnrollment", self._attestation.StartEnrollment, req)

    def complete_enrollment(self, *, enrollment_id: str, secret: bytes) -> str:
        """Proves possession of the AK with the secret ActivateCredential returned.

        Returns:
            The enrolled AK's name (hex).

        Raises:
            BrokerClientError: FailedPreconditionError for an unknown, expired or failed
                challenge; other subclasses per status code.
        """
        req = attestation_pb2.CompleteEnrollmentRequest(enrollment_id=enrollment_id, secret=secret)
        resp = self._call("CompleteEnrollment", self._attestation.CompleteEnrollment, req)
        return resp.ak_name

    def get_challenge(self, ak_name: str) -> attestation_pb2.GetChallengeResponse:
        """Asks for a single-use nonce bound to the AK, and the PCR selection to quote.

        Raises:
            BrokerClientError: FailedPreconditionError when the AK is not enrolled or revoked,
                ResourceExhaustedError when rate limited; others per status code.
        """
        req = attestation_pb2.GetChallengeRequest(ak_name=ak_name)
        return self._call("GetChallenge", self._attestation.GetChallenge, req)

    def attest(
        self,
        *,
        ak_name: str,
        nonce: bytes,
        quote: attestation_pb2.Quote,
        event_log: common_pb2.EventLog,
        ephemeral_key: common_pb2.RecipientKey,
        key_ids: Iterable[str] = (),
        snp_evidence: attestation_pb2.SnpEvidence | None = None,
    ) -> attestation_pb2.AttestResponse:
        """Presents the quote and event log (and, on an Azure SEV-SNP confidential VM, the
        vTPM's HCL report and the chip's VCEK); returns the released (sealed) keys.

        Sent at most once (the nonce is single use): on UnavailableError ask for a new
        challenge and attest again.

        Raises:
            BrokerClientError: PermissionDeniedError ("attestation denied") for any refusal,
                FailedPreconditionError for an expired nonce or an AK that is not enrolled;
                others per status code.
        """
        req = attestation_pb2.AttestRequest(
            ak_name=ak_name,
            nonce=nonce,
            quote=quote,
            event_log=event_log,
            ephemeral_key=ephemeral_key,
            key_ids=list(key_ids),
        )
        if snp_evidence is not None:
            req.snp_evidence.CopyFrom(snp_evidence)
        return self._call("Attest", self._attestation.Attest, req)

    def attest_stream(
        self,
        ak_name: str,
        evidence: Callable[[attestation_pb2.GetChallengeResponse], attestation_pb2.AttestRequest],
    ) -> attestation_pb2.AttestResponse:
        """One attestation on one ``AttestStream`` call: asks for a challenge, builds the
        evidence for it with ``evidence(challenge)`` (the quote of its nonce), sends it and
        returns the released (sealed) keys. ``evidence``'s request must carry the challenge's
        nonce and ``ak_name``.

        Sent at most once, like :meth:`attest`: on UnavailableError attest again (a new stream
        gets a new challenge). An exception raised by ``evidence`` ends the stream (the broker
        then burns the nonce) and propagates.

        Raises:
            BrokerClientError: as :meth:`get_challenge` for the challenge step and as
                :meth:`attest` for the evidence step (PermissionDeniedError "attestation
                denied", with the broker's ``AttestDenial``, for any refusal).
        """
        method = "AttestStream"
        if self._closed:
            raise ClientSetupError(f"{method}: the client is closed", method=method)
        self._ensure_connected(method)
        outbox: queue.SimpleQueue[attestation_pb2.AttestStreamRequest | None]
        outbox = queue.SimpleQueue()

        def requests() -> Iterator[attestation_pb2.AttestStreamRequest]:
            while (step := outbox.get()) is not None:
                yield step

        outbox.put(
            attestation_pb2.AttestStreamRequest(
                challenge=attestation_pb2.GetChallengeRequest(ak_name=ak_name)
            )
        )
        call = self._attestation.AttestStream(requests(), timeout=self.timeout, wait_for_ready=True)
        responses: Iterator[attestation_pb2.AttestStreamResponse] = iter(call)
        finished = False
        try:
            challenge = next(responses).challenge
            outbox.put(attestation_pb2.AttestStreamRequest(attest=evidence(challenge)))
            released: attestation_pb2.AttestResponse = next(responses).attest
            finished = True
        except grpc.RpcError as e:
            self._note(e.code() if isinstance(e, grpc.Call) else None)
            raise error_from_rpc(e, method=method, target=self.target) from e
        except StopIteration as e:
            raise BrokerClientError(
                f"{method}: the broker ended the stream early", method=method
            ) from e
        finally:
            outbox.put(None)
            if not finished:
                call.cancel()  # type: ignore[no-untyped-call]
        self._note(None)
        return released

    def end_session(
        self, session_id: str, *, workload_exit_code: int = 0, outputs: Iterable[str] = ()
    ) -> None:
        """Tells the broker that the attested session ended.

        Raises:
            BrokerClientError: the subclass for the status code.
        """
        req = attestation_pb2.EndSessionRequest(
            session_id=session_id, workload_exit_code=workload_exit_code, outputs=list(outputs)
        )
        self._call("EndSession", self._attestation.EndSession, req)

    # --- AdminService: broker, EKs and AKs (operator) --------------------------------------

    def get_broker_info(self) -> admin_pb2.GetBrokerInfoResponse:
        """The broker's version, trust domain and registration key.

        Raises:
            BrokerClientError: the subclass for the status code.
        """
        return self._call(
            "GetBrokerInfo", self._admin.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()
        )

    def get_status(self) -> admin_pb2.GetStatusResponse:
        """The broker's version, uptime, database, KEKs, processes, counts and schema revision
        (operator).

        Raises:
            BrokerClientError: the subclass for the status code (PermissionDeniedError for a
                caller that is not the operator).
        """
        return self._call("GetStatus", self._admin.GetStatus, admin_pb2.GetStatusRequest())

    def enroll_ek(
        self,
        ek_public: bytes,
        *,
        ek_certificate: bytes = b"",
        allow_without_certificate: bool = False,
    ) -> admin_pb2.EkInfo:
        """Enrolls an EK (TPM2B_PUBLIC or PEM), with its certificate or vouched for without.

        Raises:
            BrokerClientError: PermissionDeniedError for an untrusted certificate or a caller
                that is not the operator, AlreadyExistsError, InvalidArgumentError, ...
        """
        req = admin_pb2.EnrollEkRequest(
            ek_public=ek_public,
            ek_certificate=ek_certificate,
            allow_without_certificate=allow_without_certificate,
        )
        return self._call("EnrollEk", self._admin.EnrollEk, req).ek

    def revoke_ek(self, ek_id: str, *, reason: str = "") -> None:
        """Raises: BrokerClientError (NotFoundError for an unknown EK, ...)."""
        req = admin_pb2.RevokeEkRequest(ek_id=ek_id, reason=reason)
        self._call("RevokeEk", self._admin.RevokeEk, req)

    def readmit_ek(self, ek_id: str, *, reason: str = "") -> bool:
        """Re-admits a revoked EK; returns whether it was revoked.

        Raises:
            BrokerClientError: NotFoundError for an unknown EK, ...
        """
        req = admin_pb2.ReadmitEkRequest(ek_id=ek_id, reason=reason)
        return self._call("ReadmitEk", self._admin.ReadmitEk, req).was_revoked

    def list_eks(self) -> list[admin_pb2.EkInfo]:
        """Raises: BrokerClientError."""
        return list(self._call("ListEks", self._admin.ListEks, admin_pb2.ListEksRequest()).eks)

    def enroll_ak(self, ak_public: bytes, *, ek_id: str = "") -> admin_pb2.AkInfo:
        """Enrolls an AK directly (TPM2B_PUBLIC as ``tpm2_createak --public`` writes, or PEM).

        Raises:
            BrokerClientError: InvalidArgumentError for a refused key, AlreadyExistsError,
                PermissionDeniedError for a caller that is not the operator, ...
        """
        req = admin_pb2.EnrollAkRequest(ak_public=ak_public, ek_id=ek_id)
        return self._call("EnrollAk", self._admin.EnrollAk, req).ak

    def revoke_ak(self, ak_name: str, *, reason: str = "") -> None:
        """Raises: BrokerClientError (NotFoundError for an unknown AK, ...)."""
        req = admin_pb2.RevokeAkRequest(ak_name=ak_name, reason=reason)
        self._call("RevokeAk", self._admin.RevokeAk, req)

    def list_aks(self) -> list[admin_pb2.AkInfo]:
        """Raises: BrokerClientError."""
        return list(self._call("ListAks", self._admin.ListAks, admin_pb2.ListAksRequest()).aks)

    # --- golden PCR sets and parties (operator) --------------------------------------------

    def set_golden_pcr_set(
        self, name: str, accepted_values: Iterable[common_pb2.PcrValue]
    ) -> admin_pb2.GoldenPcrSet:
        """Creates or replaces the golden PCR set ``name``.

        Raises:
            BrokerClientError: InvalidArgumentError for a malformed set, ...
        """
        golden = admin_pb2.GoldenPcrSet(name=name, accepted_values=list(accepted_values))
        req = admin_pb2.SetGoldenPcrSetRequest(golden_set=golden)
        return self._call("SetGoldenPcrSet", self._admin.SetGoldenPcrSet, req).golden_set

    def list_golden_pcr_sets(self) -> list[admin_pb2.GoldenPcrSet]:
        """Raises: BrokerClientError."""
        req = admin_pb2.ListGoldenPcrSetsRequest()
        return list(self._call("ListGoldenPcrSets", self._admin.ListGoldenPcrSets, req).golden_sets)

    def delete_golden_pcr_set(self, name: str) -> None:
        """Raises: BrokerClientError (NotFoundError for an unknown set, ...)."""
        req = admin_pb2.DeleteGoldenPcrSetRequest(name=name)
        self._call("DeleteGoldenPcrSet", self._admin.DeleteGoldenPcrSet, req)

    def add_party(self, name: str, recipient_key: common_pb2.RecipientKey) -> admin_pb2.Party:
        """Adds a party with the key its outputs are sealed to.

        Raises:
            BrokerClientError: AlreadyExistsError, InvalidArgumentError for a bad key, ...
        """
        req = admin_pb2.AddPartyRequest(
            party=admin_pb2.Party(name=name, recipient_key=recipient_key)
        )
        return self._call("AddParty", self._admin.AddParty, req).party

    def list_parties(self) -> list[admin_pb2.Party]:
        """Raises: BrokerClientError."""
        req = admin_pb2.ListPartiesRequest()
        return list(self._call("ListParties", self._admin.ListParties, req).parties)

    # --- data keys and approvals (parties) -------------------------------------------------

    def register_data_key(
        self, key_id: str, sealed_data_key: bytes, *, description: str = ""
    ) -> admin_pb2.DataKeyInfo:
        """Registers a data key already sealed to the broker's registration key.

        Raises:
            BrokerClientError: AlreadyExistsError, InvalidArgumentError when the sealed key does
                not open, PermissionDeniedError for a caller that is not a party, ...
        """
        req = admin_pb2.RegisterDataKeyRequest(
            key_id=key_id, sealed_data_key=sealed_data_key, description=description
        )
        return self._call("RegisterDataKey", self._admin.RegisterDataKey, req).key

    def register_plain_data_key(
        self, key_id: str, data_key: bytes | bytearray, *, description: str = ""
    ) -> admin_pb2.DataKeyInfo:
        """Seals a 32-byte data key to the broker's registration key and registers it.

        The owner bound into the sealing is this client's party name, from its certificate.
        The key itself never leaves the process unsealed and is never logged.

        Raises:
            ClientSetupError: the client's identity is unknown or is not a party.
            CustodyError: the data key is not 32 bytes.
            BrokerClientError: the broker's registration key is unusable, or the subclass for
                the status code of either call.
        """
        from broker.keyseal import seal_for_registration
        from sealing.errors import SealingError
        from sealing.keys import RecipientPublicKey

        if self.identity is None or self.identity.kind != "party":
            who = str(self.identity) if self.identity else "an unknown identity"
            raise ClientSetupError(
                f"registering a data key needs a party certificate; this client is {who}"
            )
        info = self.get_broker_info()
        try:
            broker_key = RecipientPublicKey(
                kem=int(info.registration_key.kem), raw=bytes(info.registration_key.public_key)
            )
        except SealingError as e:
            raise BrokerClientError(f"the broker's registration key is unusable: {e}") from e
        sealed = seal_for_registration(
            broker_key, data_key, key_id=key_id, owner=self.identity.name
        )
        return self.register_data_key(key_id, sealed, description=description)

    def list_data_keys(self) -> list[admin_pb2.DataKeyInfo]:
        """Raises: BrokerClientError."""
        req = admin_pb2.ListDataKeysRequest()
        return list(self._call("ListDataKeys", self._admin.ListDataKeys, req).keys)

    def approve_workload(
        self,
        manifest: common_pb2.WorkloadManifest,
        *,
        key_ids: Sequence[str],
        output_recipients: Sequence[str],
        golden_set: str = "",
        require_snp: bool = False,
    ) -> admin_pb2.Approval:
        """Approves a workload (its measured files) for the caller's keys; with
        ``require_snp``, only for attesters with verified AMD SEV-SNP evidence.

        Raises:
            BrokerClientError: NotFoundError for an unknown key, party or golden set,
                PermissionDeniedError for another party's key, InvalidArgumentError, ...
        """
        req = admin_pb2.ApproveWorkloadRequest(
            manifest=manifest,
            key_ids=list(key_ids),
            output_recipients=list(output_recipients),
            golden_set=golden_set,
            require_snp=require_snp,
        )
        return self._call("ApproveWorkload", self._admin.ApproveWorkload, req).approval

    def revoke_approval(self, approval_id: str) -> None:
        """Raises: BrokerClientError (NotFoundError for an unknown approval, ...)."""
        req = admin_pb2.RevokeApprovalRequest(approval_id=approval_id)
        self._call("RevokeApproval", self._admin.RevokeApproval, req)

    def list_approvals(self) -> list[admin_pb2.Approval]:
        """Raises: BrokerClientError."""
        req = admin_pb2.ListApprovalsRequest()
        return list(self._call("ListApprovals", self._admin.ListApprovals, req).approvals)

    # --- key custody (operator) -------------------------------------------------------------

    def set_party_kek(self, party: str, kek_ref: str) -> admin_pb2.PartyKek:
        """Records an existing KEK (``azurekv:https://<vault>/keys/<name>[/<version>]`` or
        ``local``) for ``party``'s new data keys, once the broker has checked it can wrap and
        unwrap with it.

        Raises:
            BrokerClientError: FailedPreconditionError when the broker cannot use the KEK (the
                message says why: ``key not found``, ``forbidden``, ...), NotFoundError for an
                unknown party, InvalidArgumentError for a malformed ref, PermissionDeniedError
                for a caller that is not the operator, ...
        """
        req = admin_pb2.SetPartyKekRequest(party=party, kek_ref=kek_ref)
        return self._call("SetPartyKek", self._admin.SetPartyKek, req).party_kek

    def list_party_keks(self) -> list[admin_pb2.PartyKek]:
        """Which KEK each party's new data keys get, and why.

        Raises:
            BrokerClientError: the subclass for the status code.
        """
        req = admin_pb2.ListPartyKeksRequest()
        return list(self._call("ListPartyKeks", self._admin.ListPartyKeks, req).party_keks)

    def rewrap_data_key(self, key_id: str, new_kek_ref: str) -> admin_pb2.RewrapDataKeyResponse:
        """Rewraps data key ``key_id`` under ``new_kek_ref`` inside the broker (the plain key
        never leaves it). The response holds the key's new info and its previous KEK ref.

        Raises:
            BrokerClientError: NotFoundError for an unknown key, FailedPreconditionError when
                either KEK refuses (nothing changes then), InvalidArgumentError for a malformed
                ref, PermissionDeniedError for a caller that is not the operator, ...
        """
        req = admin_pb2.RewrapDataKeyRequest(key_id=key_id, new_kek_ref=new_kek_ref)
        return self._call("RewrapDataKey", self._admin.RewrapDataKey, req)

    def check_kek(self, kek_ref: str) -> admin_pb2.CheckKekResponse:
        """Asks the broker to wrap and unwrap a random key with ``kek_ref``; changes nothing.
        The response names what is in use (the versioned Key Vault key id).

        Raises:
            BrokerClientError: FailedPreconditionError when the broker cannot use the KEK, with
                the reason; InvalidArgumentError for a malformed ref; ...
        """
        req = admin_pb2.CheckKekRequest(kek_ref=kek_ref)
        return self._call("CheckKek", self._admin.CheckKek, req)

    # --- audit ------------------------------------------------------------------------------

    def list_audit_records(
        self, *, after_sequence: int = 0, limit: int = 0
    ) -> list[admin_pb2.AuditRecord]:
        """Audit records with a sequence number above ``after_sequence`` (``limit`` 0: the
        broker's default page size).

        The broker takes ``after_sequence`` up to 2**63 - 1 and ``limit`` up to 1000, and
        answers ``INVALID_ARGUMENT`` above that.

        Raises:
            ValueError: a number that does not fit its field (uint64, uint32); nothing is sent.
            BrokerClientError: the subclass for the status code (InvalidArgumentError for a
                number out of the broker's range).
        """
        req = admin_pb2.ListAuditRecordsRequest(after_sequence=after_sequence, limit=limit)
        return list(self._call("ListAuditRecords", self._admin.ListAuditRecords, req).records)

    def verify_audit_log(self) -> admin_pb2.VerifyAuditLogResponse:
        """Asks the broker to check its audit log's hash chain. A broken chain is reported in
        the response (``valid`` false), not raised: the caller decides what it means.

        Raises:
            BrokerClientError: the subclass for the status code.
        """
        req = admin_pb2.VerifyAuditLogRequest()
        return self._call("VerifyAuditLog", self._admin.VerifyAuditLog, req)


__all__ = [
    "ATTEST_DENIAL_METADATA",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "AlreadyExistsError",
    "BrokerClient",
    "BrokerClientError",
    "ClientSetupError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
]
