"""The broker's gRPC servicers in process: a harness with a real Broker core, its store and PKI,
and helpers to add parties, register keys and build attestation requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from broker.core import Broker
from broker.keyseal import seal_for_registration
from broker.server.interceptor import CallGuard, Peer, guarded_servicer
from broker.server.metrics import BrokerMetrics
from broker.server.servicers import AdminServicer, AttestationServicer
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from pki.ca import PkiLayout
from pki.errors import PeerIdentityError
from pki.identity import SpiffeId
from sealing.keys import generate_recipient_key
from tests.vectors.evidence import quote_vector

TD = "cleanroom.local"


OPERATOR = SpiffeId.operator(TD)


ADVERTISER = SpiffeId.party(TD, "advertiser")


PUBLISHER = SpiffeId.party(TD, "publisher")


SIDECAR = SpiffeId.sidecar(TD, "sidecar-1")


ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


ATTESTATION = attestation_pb2.DESCRIPTOR.services_by_name["AttestationService"]


def _der(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Harness:
    broker: Broker
    pki: PkiLayout
    metrics: BrokerMetrics = field(default_factory=lambda: BrokerMetrics(CollectorRegistry()))
    _servicers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._servicers = {
            "admin": AdminServicer(self.broker),
            "attestation": AttestationServicer(self.broker, metrics=self.metrics),
        }

    def call(
        self, who: SpiffeId | None, method: str, request: Message
    ) -> tuple[Any, grpc.StatusCode, str]:
        """Calls ``method`` as ``who`` (None: a peer without a certificate)."""
        der = _der(self.pki.paths_for(who).cert) if who and who.trust_domain == TD else b"x"

        def identify(context: grpc.ServicerContext) -> Peer:
            if who is None:
                raise PeerIdentityError("the peer presented no client certificate")
            return Peer(who, der)

        guard = CallGuard(
            trust_domain=TD, audit=self.broker.audit, metrics=self.metrics, identify=identify
        )
        server = grpc_testing.server_from_dictionary(
            {
                ADMIN: guarded_servicer(self._servicers["admin"], ADMIN, guard),
                ATTESTATION: guarded_servicer(self._servicers["attestation"], ATTESTATION, guard),
            },
            grpc_testing.strict_real_time(),
        )
        service = ADMIN if method in ADMIN.methods_by_name else ATTESTATION
        rpc = server.invoke_unary_unary(service.methods_by_name[method], (), request, None)
        response, _, code, details = rpc.termination()
        return response, code, details

    def ok(self, who: SpiffeId, method: str, request: Message) -> Any:
        response, code, details = self.call(who, method, request)
        assert code == grpc.StatusCode.OK, f"{method}: {code} {details}"
        return response

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def _add_parties(h: Harness) -> None:
    for name in ("advertiser", "publisher"):
        party = admin_pb2.Party(name=name)
        party.recipient_key.kem = common_pb2.KEM_ALGORITHM_X25519
        party.recipient_key.public_key = generate_recipient_key().public_key().raw
        h.ok(OPERATOR, "AddParty", admin_pb2.AddPartyRequest(party=party))


def _register(h: Harness, who: SpiffeId, key_id: str, *, owner: str | None = None) -> Any:
    info = h.ok(who, "GetBrokerInfo", admin_pb2.GetBrokerInfoRequest())
    from sealing.keys import RecipientPublicKey

    broker_key = RecipientPublicKey(
        kem=info.registration_key.kem, raw=bytes(info.registration_key.public_key)
    )
    sealed = seal_for_registration(broker_key, b"\x11" * 32, key_id=key_id, owner=owner or who.name)
    return h.call(
        who,
        "RegisterDataKey",
        admin_pb2.RegisterDataKeyRequest(key_id=key_id, sealed_data_key=sealed),
    )


def _attest_request(nonce: bytes) -> attestation_pb2.AttestRequest:
    vector = quote_vector("quote-rsa-rsassa-valid")
    from broker.tpmkeys import load_public
    from evidence.proto import bank_to_pb, event_log_to_pb

    name = load_public(vector.ak_public).name
    assert name is not None
    req = attestation_pb2.AttestRequest(ak_name=name.hex(), nonce=nonce)
    req.quote.attest = vector.attest
    req.quote.signature = vector.signature
    for (index, bank), value in vector.pcr_values.items():
        req.quote.pcr_values.add(index=index, bank=bank_to_pb(bank), value=value)
    assert vector.event_log is not None
    req.event_log.CopyFrom(event_log_to_pb(vector.event_log))
    req.ephemeral_key.kem = common_pb2.KEM_ALGORITHM_X25519
    req.ephemeral_key.public_key = generate_recipient_key().public_key().raw
    return req
