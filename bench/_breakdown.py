"""Where the broker's CPU goes in one attestation, without the transport (``--breakdown``).

The broker's own work for GetChallenge and Attest runs in this process, one attestation at a
time: the call guard (identity, authorization, parsing, metrics, the JSON access log to a file),
the servicers (validation, conversion) and the core (storage, nonces, quote verification,
policy, audit, release), over a real database, with the evidence of a software AK as in the load
benchmark. The gRPC server and TLS are left out: the servicer context is a stand-in that only
answers what the guard asks (the peer's certificate, metadata). The CPU time (``thread_time``)
of each component is summed by wrapping its entry point for the duration of the measurement.
"""

from __future__ import annotations

import functools
import logging
import secrets
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from bench._attest_setup import PARTIES, WORKLOAD
from broker import nonces, policy, quote, release
from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core.attestation import Attestation
from broker.keyseal import seal_for_registration
from broker.model import Party
from broker.server import interceptor, servicers, validate
from broker.server.interceptor import CallGuard
from broker.server.logs import configure_logging
from broker.server.metrics import BrokerMetrics
from cleanroom.app.emulators.softak import QUOTED_BANKS, QuoteMaker, SoftAk
from cleanroom.v1 import admin_pb2, attestation_pb2
from evidence.binding import qualifying_data
from evidence.manifest import ManifestEntry
from evidence.proto import bank_to_pb, event_log_to_pb
from pki.ca import init_pki
from pki.identity import SpiffeId
from sealing.keys import KEM_X25519, generate_recipient_key
from tests.harness.launch import TEST_LAUNCH, measure_workload

TD = "cleanroom.local"
GET_CHALLENGE = "/cleanroom.v1.AttestationService/GetChallenge"
ATTEST = "/cleanroom.v1.AttestationService/Attest"
GET_BROKER_INFO = "/cleanroom.v1.AdminService/GetBrokerInfo"


class _Context:
    """What the guard and servicers read from a gRPC servicer context, for one peer."""

    def __init__(self, pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [pem], "transport_security_type": [b"ssl"]}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python"),)

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    def abort(self, code: object, message: str) -> None:
        raise RuntimeError(f"call aborted: {code}: {message}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> Mapping[str, object]:
        return dict(self._auth)


class _Timer:
    """Sums the CPU time spent under each wrapped function (outermost wrapped call only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inside = False

    @contextmanager
    def wrapping(self, targets: list[tuple[object, str, str]]) -> Iterator[None]:
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
        try:
            for (obj, name, label), (_, _, fn) in zip(targets, saved, strict=True):
                setattr(obj, name, self._wrap(fn, label))
            yield
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return fn(*args, **kwargs)
            self._inside = True
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.thread_time() - start
                self.calls[label] += 1
                self._inside = False

        return timed


def run_breakdown(*, database_url: str | None, attestations: int, ak_alg: str) -> None:
    """Prints the CPU time per attestation of each part of the broker's own work."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-breakdown-")))
        pki = init_pki(work / "pki", sidecars=("bench-000",))
        log_file = stack.enter_context(open(work / "broker.log", "w"))
        configure_logging(json_output=True, level=logging.INFO, stream=log_file)
        config = BrokerConfig(
            database_url=database_url or f"sqlite:///{work / 'broker.db'}",
            state_dir=str(work / "state"),
            trust_domain=TD,
            # One AK and one peer attest back to back here; the limiter still runs every call.
            challenge_rate_per_ak=1e9,
            challenge_rate_per_peer=1e9,
        )
        broker = stack.enter_context(open_broker(config))
        operator = SpiffeId.operator(TD)
        ak = SoftAk.generate(ak_alg)
        broker.enroll_ak(operator, ak_public=ak.tpm2b_public, ek_id=None)
        measured = measure_workload(work / "workload", WORKLOAD)
        manifest = [
            ManifestEntry(path=e.path, size=e.size, digests=dict(e.digests))
            for e in measured.events
            if e.launch is None
        ]
        for name in PARTIES:
            public = generate_recipient_key().public_key().raw
            broker.add_party(operator, Party(name=name, kem=KEM_X25519, public_key=public))
        key_ids = []
        for name in PARTIES:
            party = SpiffeId.party(TD, name)
            key_id = f"{name}-data"
            sealed = seal_for_registration(
                broker.registration_key.public_key(),
                secrets.token_bytes(32),
                key_id=key_id,
                owner=name,
            )
            broker.register_data_key(party, key_id=key_id, sealed_data_key=sealed, description="")
            broker.approve_workload(
                party,
                workload_name="join-and-train",
                manifest=manifest,
                key_ids=[key_id],
                output_recipients=list(PARTIES),
                golden_set=None,
                launch=TEST_LAUNCH,
            )
            key_ids.append(key_id)

        metrics = BrokerMetrics(CollectorRegistry())
        guard = CallGuard(trust_domain=TD, audit=broker.audit, metrics=metrics)
        attestation = servicers.AttestationServicer(broker, metrics=metrics)
        admin = servicers.AdminServicer(broker)
        cert_pem = pki.cert_and_key("sidecar", "bench-000").cert.read_bytes()
        cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        sidecar = _Context(cert_pem)
        operator_ctx = _Context(pki.cert_and_key("operator").cert.read_bytes())
        maker = QuoteMaker(ak, measured.pcrs)
        ephemeral = generate_recipient_key().public_key()
        event_log = event_log_to_pb(measured.events)
        challenge_raw = attestation_pb2.GetChallengeRequest(ak_name=ak.name_hex).SerializeToString()
        server_cpu = [0.0]

        def one() -> None:
            start = time.thread_time()
            response = guard.run(
                GET_CHALLENGE,
                sidecar,  # type: ignore[arg-type]
                challenge_raw,
                attestation.GetChallenge,
                attestation_pb2.GetChallengeRequest.FromString,
            )
            nonce = response.nonce
            answer = response.SerializeToString()
            server_cpu[0] += time.thread_time() - start
            assert answer
            binding = qualifying_data(
                nonce=nonce,
                kem=ephemeral.kem,
                ephemeral_public_key=ephemeral.raw,
                tls_certificate_der=cert_der,
            )
            attest, signature = maker.quote(binding)
            request = attestation_pb2.AttestRequest(
                ak_name=ak.name_hex, nonce=nonce, event_log=event_log, key_ids=key_ids
            )
            request.quote.attest = attest
            request.quote.signature = signature
            for bank in QUOTED_BANKS:
                request.quote.pcr_values.add(
                    index=23, bank=bank_to_pb(bank), value=measured.pcrs[bank]
                )
            request.ephemeral_key.kem = ephemeral.kem  # type: ignore[assignment]
            request.ephemeral_key.public_key = ephemeral.raw
            raw = request.SerializeToString()
            start = time.thread_time()
            outcome = guard.run(
                ATTEST,
                sidecar,  # type: ignore[arg-type]
                raw,
                attestation.Attest,
                attestation_pb2.AttestRequest.FromString,
            )
            answer = outcome.SerializeToString()
            server_cpu[0] += time.thread_time() - start
            assert len(outcome.released_keys) == 2 and answer

        info_raw = admin_pb2.GetBrokerInfoRequest().SerializeToString()

        def echo() -> None:
            guard.run(
                GET_BROKER_INFO,
                operator_ctx,  # type: ignore[arg-type]
                info_raw,
                admin.GetBrokerInfo,
                admin_pb2.GetBrokerInfoRequest.FromString,
            ).SerializeToString()

        for _ in range(min(300, attestations)):
            one()
            echo()
        start = time.thread_time()
        for _ in range(attestations):
            echo()
        echo_us = (time.thread_time() - start) / attestations * 1e6

        server_cpu[0] = 0.0
        for _ in range(attestations):
            one()
        plain = server_cpu[0] / attestations * 1e6
        server_cpu[0] = 0.0
        timer = _Timer()
        targets: list[tuple[object, str, str]] = [
            (
                Attestation,
                "_commit_release",
                "audit log: the attestation's records (hash chain) + the nonce's burn, the "
                "approvals' re-check and the session, one transaction",
            ),
            (release, "seal_records", "release: unwrap + HPKE-seal one key per call"),
            (quote, "verify_quote", "quote: verify_quote"),
            (policy, "evaluate", "policy: evaluate"),
            (
                nonces.NonceService,
                "issue_recorded",
                "nonces: issue + the challenge's audit record, one transaction",
            ),
            (nonces.NonceService, "consume_in", "nonces: consume (in the release's transaction)"),
            (validate, "check_attest", "servicer: validate AttestRequest"),
            (servicers, "event_log_from_pb", "servicer: event log from protobuf"),
            (CallGuard, "_finish", "guard: access log line + latency metric"),
            (CallGuard, "authenticate", "guard: peer identity"),
            (interceptor, "authorize", "guard: authorization table"),
        ]
        # The store's methods are its repositories' bound methods, set on the instance when it
        # is built (broker.storage.store), so they are wrapped on the broker's store itself.
        for method in (
            "get_attester",
            "find_active_approvals",
            "get_data_key",
            "get_golden_set",
            "get_party",
            "still_active",
        ):
            targets.append((broker.store, method, f"storage: {method}"))
        with timer.wrapping(targets):
            for _ in range(attestations):
                one()
        total = server_cpu[0] / attestations * 1e6
        print(
            "broker's own CPU per attestation (GetChallenge + Attest, no gRPC/TLS): "
            f"{total:,.0f} us  [{attestations} attestations, "
            f"database {config.database_url.split(':')[0]}]"
        )
        accounted = 0.0
        for label, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
            us = seconds / attestations * 1e6
            accounted += us
            per = timer.calls[label] / attestations
            print(f"  {us:7.0f} us {us / total:6.1%}  {label} ({per:g}x)")
        rest = total - accounted
        print(
            f"  {rest:7.0f} us {rest / total:6.1%}  the rest: guard and servicer glue, request "
            "parsing, responses, core bookkeeping"
        )
        print(
            f"  (the same without the timers: {plain:,.0f} us); echo (GetBrokerInfo) through "
            f"the same pipeline: {echo_us:,.0f} us"
        )
