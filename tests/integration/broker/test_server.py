"""The broker as a real process: ``cleanroom broker serve`` over mTLS on loopback, SQLite.

Shows who may call what (roles and parties' own data), which connections the TLS handshake
refuses, that health, reflection and metrics work, that malformed, oversized and incomplete
requests get INVALID_ARGUMENT or RESOURCE_EXHAUSTED and never INTERNAL or a crash, and that
SIGTERM stops the server cleanly.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cleanroom.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    common_pb2,
)
from pki.ca import (
    PkiLayout,
    cert_to_pem,
    init_pki,
    issue_certificate,
    key_to_pem,
    load_ca,
)
from pki.identity import SpiffeId
from sealing.keys import generate_recipient_key
from tests.harness.launch import with_test_launch
from tests.support.broker import (
    TD,
    TIMEOUT,
    BrokerProcess,
    add_parties,
    code_of,
    register_key,
    rpc_error,
    start_broker,
    write_config,
)
from tests.support.pki import make_pki
from tests.vectors.evidence import quote_vector

# --- a broker process -----------------------------------------------------------------------


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Foreign:
    """Certificates the broker must not accept, or must accept only at the TLS level."""

    rogue: PkiLayout  # same trust domain, another CA: the handshake fails
    other_domain: PkiLayout  # another trust domain whose CA the broker's bundle holds
    expired_cert: Path
    expired_key: Path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker-server")


@pytest.fixture(scope="module")
def foreign(workdir: Path) -> Foreign:
    rogue = make_pki(workdir / "rogue-pki")
    other = init_pki(workdir / "other-pki", trust_domain="other.example", parties=(), sidecars=())
    return Foreign(rogue, other, workdir / "expired.crt", workdir / "expired.key")


@pytest.fixture(scope="module")
def broker(workdir: Path, foreign: Foreign) -> Iterator[BrokerProcess]:
    pki = make_pki(workdir / "pki")
    # An expired operator certificate from the broker's own CA.
    ca_key, ca_cert = load_ca(pki.directory)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=SpiffeId.operator(TD),
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    foreign.expired_cert.write_bytes(cert_to_pem(cert))
    foreign.expired_key.write_bytes(key_to_pem(key))
    foreign.expired_key.chmod(0o600)
    # The bundle trusts a federated domain's CA too, so its certificates pass the handshake and
    # the broker's own trust-domain check is what refuses them.
    bundle = workdir / "bundle.crt"
    bundle.write_bytes(pki.ca_cert.read_bytes() + foreign.other_domain.ca_cert.read_bytes())
    config = write_config(
        workdir / "broker.toml", workdir, pki, ca_file=bundle, max_message_bytes=65536
    )
    process = start_broker(config, pki, workdir)
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.stderr()


# --- health, reflection ---------------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_both_services(broker: BrokerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(broker.channel("sidecar", "sidecar-1"))
    for service in ("", "cleanroom.v1.AttestationService", "cleanroom.v1.AdminService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    unknown = health_pb2.HealthCheckRequest(service="nope")
    assert code_of(stub.Check, unknown) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(broker: BrokerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(broker.channel("party", "advertiser"))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "cleanroom.v1.AttestationService",
        "cleanroom.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names


# --- roles ----------------------------------------------------------------------------------


def test_a_sidecar_cannot_call_admin_methods(broker: BrokerProcess) -> None:
    stub = broker.admin("sidecar", "sidecar-1")
    for call, request in (
        (stub.ListEks, admin_pb2.ListEksRequest()),
        (stub.EnrollAk, admin_pb2.EnrollAkRequest(ak_public=b"x")),
        (stub.AddParty, admin_pb2.AddPartyRequest()),
        (stub.ListAuditRecords, admin_pb2.ListAuditRecordsRequest()),
        (stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()),
    ):
        assert code_of(call, request) == grpc.StatusCode.PERMISSION_DENIED
    records = broker.admin("operator").ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    )
    denials = [
        r
        for r in records.records
        if r.action == "authz" and r.actor == "spiffe://cleanroom.local/sidecar/sidecar-1"
    ]
    assert {r.subject.rsplit("/", 1)[1] for r in denials} >= {"ListEks", "EnrollAk", "AddParty"}
    assert all(r.decision == "deny" and "needs operator" in r.reason for r in denials)


def test_parties_and_operator_cannot_attest(broker: BrokerProcess) -> None:
    request = attestation_pb2.GetChallengeRequest(ak_name="00")
    for kind, name in (("party", "advertiser"), ("operator", "")):
        stub = broker.attestation(kind, name)
        assert code_of(stub.GetChallenge, request) == grpc.StatusCode.PERMISSION_DENIED


def test_party_a_cannot_act_on_or_read_party_b(broker: BrokerProcess) -> None:
    add_parties(broker, "advertiser", "publisher")
    register_key(broker, "publisher", "pub-data", b"\x22" * 32)
    register_key(broker, "advertiser", "adv-data", b"\x11" * 32)
    # A key sealed for the publisher, registered by the advertiser, does not open: the broker
    # always takes the caller as the owner.
    with pytest.raises(grpc.RpcError) as refused:
        register_key(broker, "advertiser", "pub-data-2", b"\x33" * 32, owner="publisher")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    publisher_keys = broker.admin("party", "publisher").ListDataKeys(
        admin_pb2.ListDataKeysRequest(), timeout=TIMEOUT
    )
    assert [k.key_id for k in publisher_keys.keys] == ["pub-data"]

    # Approving a workload for the publisher's key is refused.
    advertiser = broker.admin("party", "advertiser")
    manifest = with_test_launch(common_pb2.WorkloadManifest(name="join"))
    entry = manifest.entries.add(path="run.py", size=3)
    entry.digests.add(algorithm=common_pb2.HASH_ALGORITHM_SHA256, value=b"\x01" * 32)
    approve = admin_pb2.ApproveWorkloadRequest(
        manifest=manifest, key_ids=["pub-data"], output_recipients=["advertiser"]
    )
    assert code_of(advertiser.ApproveWorkload, approve) == grpc.StatusCode.PERMISSION_DENIED
    assert (
        not broker.admin("party", "publisher")
        .ListApprovals(admin_pb2.ListApprovalsRequest(), timeout=TIMEOUT)
        .approvals
    )

    # The advertiser reads only records that name it.
    mine = advertiser.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(), timeout=TIMEOUT)
    assert mine.records
    assert all("advertiser" in r.parties for r in mine.records)
    assert "pub-data" not in {r.subject for r in mine.records}
    assert [k.key_id for k in advertiser.ListDataKeys(admin_pb2.ListDataKeysRequest()).keys] == [
        "adv-data"
    ]


# --- the handshake --------------------------------------------------------------------------


def _call_with(broker: BrokerProcess, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    stub = admin_pb2_grpc.AdminServiceStub(grpc.secure_channel(broker.grpc_address, creds))
    return code_of(stub.ListEks, admin_pb2.ListEksRequest())


def test_connections_without_an_acceptable_client_certificate_are_refused(
    broker: BrokerProcess, foreign: Foreign
) -> None:
    ca = broker.pki.ca_cert.read_bytes()
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    assert _call_with(broker, no_cert) == grpc.StatusCode.UNAVAILABLE
    rogue_cert, rogue_key = foreign.rogue.cert_and_key("operator")
    rogue = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=rogue_key.read_bytes(),
        certificate_chain=rogue_cert.read_bytes(),
    )
    assert _call_with(broker, rogue) == grpc.StatusCode.UNAVAILABLE
    expired = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=foreign.expired_key.read_bytes(),
        certificate_chain=foreign.expired_cert.read_bytes(),
    )
    assert _call_with(broker, expired) == grpc.StatusCode.UNAVAILABLE
    # The broker is unharmed.
    assert broker.proc.poll() is None
    broker.admin("operator").ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT)


def test_another_trust_domain_is_denied_after_the_handshake(
    broker: BrokerProcess, foreign: Foreign
) -> None:
    cert, key = foreign.other_domain.cert_and_key("operator")
    creds = grpc.ssl_channel_credentials(
        root_certificates=broker.pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    assert _call_with(broker, creds) == grpc.StatusCode.PERMISSION_DENIED
    health = health_pb2_grpc.HealthStub(grpc.secure_channel(broker.grpc_address, creds))
    assert code_of(health.Check, health_pb2.HealthCheckRequest()) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


# --- malformed input ------------------------------------------------------------------------


def _raw(broker: BrokerProcess, method: str, payload: bytes) -> grpc.RpcError:
    channel = broker.channel("sidecar", "sidecar-1")
    # No serializers: bytes in, bytes out.
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return rpc_error(call, payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x05ab",  # a length-delimited field that claims more bytes than follow
        b"\x0a\x02\xff\xfe",  # a string field that is not UTF-8
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint tag that never ends
        b"\x07",  # wire type 7 does not exist
    ],
)
def test_malformed_protobufs_are_invalid_argument(broker: BrokerProcess, payload: bytes) -> None:
    for method in (
        "/cleanroom.v1.AttestationService/Attest",
        "/cleanroom.v1.AttestationService/GetChallenge",
        "/grpc.health.v1.Health/Check",
    ):
        error = _raw(broker, method, payload)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
    assert broker.proc.poll() is None


def test_oversized_messages_are_resource_exhausted(broker: BrokerProcess) -> None:
    stub = broker.admin("operator")
    request = admin_pb2.EnrollEkRequest(ek_public=b"\x00" * 100_000)
    assert code_of(stub.EnrollEk, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert broker.proc.poll() is None


def test_unknown_enums_and_missing_fields_are_invalid_argument(broker: BrokerProcess) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    sidecar = broker.attestation("sidecar", "sidecar-1")
    request = attestation_pb2.AttestRequest(ak_name="00" * 34, nonce=b"\x01" * 32)
    request.quote.attest = vector.attest
    request.quote.signature = vector.signature
    request.quote.pcr_values.add(index=23, bank=common_pb2.HASH_ALGORITHM_SHA256, value=b"\0" * 32)
    request.event_log.SetInParent()
    request.ephemeral_key.kem = 42  # type: ignore[assignment]
    request.ephemeral_key.public_key = b"\x01" * 32
    error = rpc_error(sidecar.Attest, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ephemeral_key.kem" in (error.details() or "")

    request.ephemeral_key.kem = common_pb2.KEM_ALGORITHM_X25519
    request.ClearField("quote")
    error = rpc_error(sidecar.Attest, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("quote:")

    operator = broker.admin("operator")
    golden = admin_pb2.GoldenPcrSet(name="boot")
    golden.accepted_values.add(index=0, bank=9, value=b"\0" * 32)
    for call, req in (
        (operator.SetGoldenPcrSet, admin_pb2.SetGoldenPcrSetRequest(golden_set=golden)),
        (operator.SetGoldenPcrSet, admin_pb2.SetGoldenPcrSetRequest()),
        (operator.AddParty, admin_pb2.AddPartyRequest(party=admin_pb2.Party(name="x"))),
        (operator.EnrollEk, admin_pb2.EnrollEkRequest()),
        (operator.RevokeAk, admin_pb2.RevokeAkRequest()),
        (sidecar.GetChallenge, attestation_pb2.GetChallengeRequest()),
        (sidecar.CompleteEnrollment, attestation_pb2.CompleteEnrollmentRequest()),
    ):
        assert code_of(call, req) == grpc.StatusCode.INVALID_ARGUMENT


def test_numbers_beyond_what_the_database_holds_are_invalid_argument(
    broker: BrokerProcess,
) -> None:
    # The operator's query and a party's (joined on the records that name it) both bind it.
    for who in (broker.admin("operator"), broker.admin("party", "advertiser")):
        for after in (2**63, 2**64 - 1):
            error = rpc_error(
                who.ListAuditRecords, admin_pb2.ListAuditRecordsRequest(after_sequence=after)
            )
            assert (error.code(), error.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "after_sequence: must be at most 9223372036854775807",
            )
        last = admin_pb2.ListAuditRecordsRequest(after_sequence=2**63 - 1, limit=1000)
        assert list(who.ListAuditRecords(last, timeout=TIMEOUT).records) == []
    assert broker.proc.poll() is None


def test_a_malformed_attest_is_in_the_audit_log(broker: BrokerProcess) -> None:
    sidecar = broker.attestation("sidecar", "sidecar-1")
    request = attestation_pb2.AttestRequest(ak_name="ab" * 34, nonce=b"\x01" * 31)
    error = rpc_error(sidecar.Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "nonce: must be 32 bytes, got 31",
    )
    operator = broker.admin("operator")
    records = operator.ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    ).records
    last = [r for r in records if r.action == "attest"][-1]
    assert (last.actor, last.subject, last.decision, last.reason) == (
        f"spiffe://{TD}/sidecar/sidecar-1",
        "ab" * 34,
        "deny",
        "nonce: must be 32 bytes, got 31",
    )

    # Bytes that are not an AttestRequest at all are refused (and recorded) before parsing.
    error = _raw(broker, "/cleanroom.v1.AttestationService/Attest", b"\x07")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = operator.ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(after_sequence=last.sequence, limit=1000),
        timeout=TIMEOUT,
    ).records
    assert [(r.action, r.actor, r.subject, r.decision, r.reason) for r in records] == [
        (
            "attest",
            f"spiffe://{TD}/sidecar/sidecar-1",
            "",
            "deny",
            error.details(),
        )
    ]


# --- metrics --------------------------------------------------------------------------------


def test_metrics_count_a_denied_attestation_under_its_reason(broker: BrokerProcess) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    operator = broker.admin("operator")
    try:
        ak = operator.EnrollAk(admin_pb2.EnrollAkRequest(ak_public=vector.ak_public)).ak
        ak_name = ak.ak_name
    except grpc.RpcError as e:  # enrolled by an earlier test of this module
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
        ak_name = operator.ListAks(admin_pb2.ListAksRequest()).aks[0].ak_name
    sidecar = broker.attestation("sidecar", "sidecar-1")
    before = broker.metrics()
    key = ("cleanroom_broker_attestations_total", (("reason", "nonce"), ("result", "deny")))
    challenge = sidecar.GetChallenge(attestation_pb2.GetChallengeRequest(ak_name=ak_name))
    assert len(challenge.nonce) == 32
    request = attestation_pb2.AttestRequest(ak_name=ak_name, nonce=b"\x05" * 32)  # never issued
    request.quote.attest = vector.attest
    request.quote.signature = vector.signature
    for (index, bank), value in vector.pcr_values.items():
        request.quote.pcr_values.add(
            index=index,
            bank=common_pb2.HASH_ALGORITHM_SHA1
            if bank == "sha1"
            else common_pb2.HASH_ALGORITHM_SHA256,
            value=value,
        )
    request.event_log.SetInParent()
    request.ephemeral_key.kem = common_pb2.KEM_ALGORITHM_X25519
    request.ephemeral_key.public_key = generate_recipient_key().public_key().raw
    error = rpc_error(sidecar.Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "attestation denied",
    )
    after = broker.metrics()
    assert after.get(key, 0.0) == before.get(key, 0.0) + 1
    assert after[("cleanroom_broker_outstanding_nonces", ())] >= 1
    latency = (
        "cleanroom_broker_rpc_duration_seconds_count",
        (("code", "PERMISSION_DENIED"), ("method", "cleanroom.v1.AttestationService/Attest")),
    )
    assert after[latency] >= 1
    # The exact reason is in the server's log, not in the client's status.
    assert "nonce" in broker.stderr()


# --- shutdown -------------------------------------------------------------------------------


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    process = start_broker(write_config(tmp_path / "b.toml", tmp_path, pki), pki, tmp_path)
    try:
        stub = process.admin("operator")
        stub.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT)
        # Clients keep calling while the signal arrives: every call the server started
        # completes; the rest are refused because the server no longer accepts calls.
        codes: list[grpc.StatusCode] = []
        stop_clients = threading.Event()

        def client() -> None:
            while not stop_clients.is_set():
                try:
                    stub.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(), timeout=TIMEOUT)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        return

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert process.stop(signal.SIGTERM) == 0
        stop_clients.set()
        for t in threads:
            t.join(timeout=TIMEOUT)
        completed = codes.count(grpc.StatusCode.OK)
        assert completed > 0
        # gRPC cancels calls that arrived but never reached a handler; no started call was cut.
        allowed = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert set(codes) <= allowed, set(codes)
        access = [json.loads(line) for line in process.stderr().splitlines() if '"call"' in line]
        calls = [a for a in access if a.get("method", "").endswith("/ListAuditRecords")]
        assert [a["code"] for a in calls] == ["OK"] * completed
        log = process.stderr()
        assert "SIGTERM" in log and "broker stopped" in log
        assert '"request_id"' in log  # --log-json
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
