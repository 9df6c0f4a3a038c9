"""A scriptable stand-in for the broker: a real gRPC server over mTLS on loopback.

It serves every method of ``AdminService`` and ``AttestationService`` from the protobuf
descriptors, records each request, and answers from a script: a queue of status codes per method
to fail with before answering normally, an optional delay, and canned responses. The client and
the admin CLI are tested against it where the real broker cannot easily be made to misbehave
(UNAVAILABLE twice, then success). Tests of behaviour against the real broker are in
``tests/integration/broker``. This is the tests' one fake broker.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2_grpc

from broker.client import BrokerClient, RetryPolicy
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from pki.ca import PkiLayout
from pki.tls import server_credentials
from sealing.keys import RecipientPrivateKey, generate_recipient_key

SERVICES = (
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    attestation_pb2.DESCRIPTOR.services_by_name["AttestationService"],
)


@dataclass
class FakeBroker:
    """What the fake answers. Mutate it between calls; it is read under a lock."""

    registration_key: RecipientPrivateKey = field(default_factory=generate_recipient_key)
    #: Per method: codes to fail with, one per call, before answering normally.
    failures: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    #: Per method: seconds to wait before answering.
    delays: dict[str, float] = field(default_factory=dict)
    #: Per method: the response to give (default: an empty one, or GetBrokerInfo's key).
    responses: dict[str, Message] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    #: Methods to answer UNIMPLEMENTED (only ``AttestStream`` so far: an older broker).
    disabled: set[str] = field(default_factory=set)
    requests: defaultdict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.failures.clear()
            self.delays.clear()
            self.responses.clear()
            self.calls.clear()
            self.requests.clear()
            self.disabled.clear()

    def _answer(self, method: str, request: Message, context: grpc.ServicerContext) -> Message:
        with self.lock:
            self.calls[method] += 1
            self.requests[method].append(request)
            queue = self.failures.get(method) or []
            code = queue.pop(0) if queue else None
            delay = self.delays.get(method, 0.0)
            response = self.responses.get(method)
        if delay:
            time.sleep(delay)
        if code is not None:
            context.abort(code, f"scripted {code.name.lower()} for {method}")
        if response is not None:
            return response
        if method == "GetBrokerInfo":
            pub = self.registration_key.public_key()
            return admin_pb2.GetBrokerInfoResponse(
                version="fake",
                trust_domain="cleanroom.local",
                registration_key=common_pb2.RecipientKey(
                    kem=common_pb2.KemAlgorithm.ValueType(pub.kem), public_key=pub.raw
                ),
            )
        out_cls = _OUTPUT_TYPES[method]
        return out_cls()

    def _attest_stream(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[attestation_pb2.AttestStreamResponse]:
        """AttestStream as its two steps, each answered (and counted, and failed when
        scripted) as the unary ``GetChallenge`` and ``Attest`` are; ``disabled`` methods
        answer UNIMPLEMENTED, as a broker without them does."""
        with self.lock:
            self.calls["AttestStream"] += 1
            disabled = "AttestStream" in self.disabled
        if disabled:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        # The challenge, then the attestation: each step is the unary method's scripted answer.
        for method, part in (("GetChallenge", "challenge"), ("Attest", "attest")):
            request = next(requests, None)
            if request is None:
                return
            step = attestation_pb2.AttestStreamResponse()
            getattr(step, part).MergeFromString(
                self._answer(method, getattr(request, part), context).SerializeToString()
            )
            yield step


_OUTPUT_TYPES: dict[str, type[Message]] = {}


def _handlers(fake: FakeBroker) -> list[grpc.GenericRpcHandler[Any, Any]]:
    handlers: list[grpc.GenericRpcHandler[Any, Any]] = []
    for service in SERVICES:
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for m in service.methods:
            in_cls = message_factory.GetMessageClass(m.input_type)
            out_cls = message_factory.GetMessageClass(m.output_type)
            _OUTPUT_TYPES[m.name] = out_cls

            def behaviour(
                name: str,
            ) -> Callable[[Message, grpc.ServicerContext], Message]:
                return lambda req, ctx: fake._answer(name, req, ctx)

            if m.name == "AttestStream":
                methods[m.name] = grpc.stream_stream_rpc_method_handler(
                    fake._attest_stream,
                    request_deserializer=in_cls.FromString,
                    response_serializer=out_cls.SerializeToString,
                )
                continue
            methods[m.name] = grpc.unary_unary_rpc_method_handler(
                behaviour(m.name),
                request_deserializer=in_cls.FromString,
                response_serializer=out_cls.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


@dataclass
class RunningFake:
    fake: FakeBroker
    layout: PkiLayout
    port: int
    server: grpc.Server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(
        self, who: str = "operator", *, retries: int = 3, timeout: float = 5.0
    ) -> BrokerClient:
        """A client with the certificate of ``who`` (``operator`` or ``party-<name>``) and
        short backoffs so that retry tests stay fast."""
        kind, _, name = who.partition("-")
        cert, key = self.layout.cert_and_key(kind, name)
        return BrokerClient.connect(
            target=self.target,
            cert_file=cert,
            key_file=key,
            ca_file=self.layout.ca_cert,
            timeout=timeout,
            retry=RetryPolicy(retries=retries, initial_backoff=0.02, max_backoff=0.2),
        )


def start_fake_server(
    fake: FakeBroker, layout: PkiLayout, *, port: int = 0, with_health: bool = True
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for h in _handlers(fake):
        server.add_generic_rpc_handlers((h,))
    if with_health:
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = server_credentials(
        cert_file=layout.cert_and_key("broker").cert,
        key_file=layout.cert_and_key("broker").key,
        ca_file=layout.ca_cert,
    )
    bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    return server, bound


@contextmanager
def running_fake(
    layout: PkiLayout, *, with_health: bool = True, fake: FakeBroker | None = None
) -> Iterator[RunningFake]:
    fake = fake or FakeBroker()
    server, port = start_fake_server(fake, layout, with_health=with_health)
    try:
        yield RunningFake(fake=fake, layout=layout, port=port, server=server)
    finally:
        server.stop(grace=None)
