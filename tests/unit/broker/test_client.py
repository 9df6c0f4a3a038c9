"""BrokerClient against a real gRPC server over mTLS on loopback (the scripted fake broker).

Covers the retry policy (UNAVAILABLE only; idempotent calls retried, once-only calls never
repeated after they were sent), the mapping of status codes to error classes, deadlines, the
checks made before connecting, and that requests carry what the caller passed.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from broker.client import (
    IDEMPOTENT_METHODS,
    AlreadyExistsError,
    BrokerClient,
    BrokerClientError,
    ClientSetupError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from broker.errors import BrokerError, CustodyError
from broker.keyseal import open_registered_key
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from pki.ca import PkiLayout, cert_to_pem, issue_certificate, key_to_pem, load_ca
from pki.identity import SpiffeId
from tests.harness.net import free_port
from tests.support.fake_broker import (
    SERVICES,
    FakeBroker,
    RunningFake,
    running_fake,
    start_fake_server,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def fake(module_fake: RunningFake) -> RunningFake:
    module_fake.fake.reset()
    return module_fake


# --- retries --------------------------------------------------------------------------------


def test_idempotent_call_is_retried_after_unavailable_twice(fake: RunningFake) -> None:
    fake.fake.failures["ListAks"] = [UNAVAILABLE, UNAVAILABLE]
    fake.fake.responses["ListAks"] = admin_pb2.ListAksResponse(
        aks=[admin_pb2.AkInfo(ak_name="000b" + "ab" * 32, enrolled_by="operator")]
    )
    with fake.client(retries=3) as client:
        aks = client.list_aks()
    assert [a.ak_name for a in aks] == ["000b" + "ab" * 32]
    assert fake.fake.calls["ListAks"] == 3


def test_unavailable_gives_up_after_the_configured_retries(fake: RunningFake) -> None:
    fake.fake.failures["ListEks"] = [UNAVAILABLE] * 10
    with fake.client(retries=2) as client, pytest.raises(UnavailableError) as info:
        client.list_eks()
    assert fake.fake.calls["ListEks"] == 3
    err = info.value
    assert err.code is UNAVAILABLE
    assert err.method == "ListEks"
    assert "scripted unavailable" in err.details
    assert str(err).startswith("ListEks: ")
    assert isinstance(err, BrokerError)


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED],
)
def test_other_codes_are_not_retried(fake: RunningFake, code: grpc.StatusCode) -> None:
    fake.fake.failures["ListParties"] = [code, code]
    with fake.client(retries=3) as client, pytest.raises(BrokerClientError) as info:
        client.list_parties()
    assert fake.fake.calls["ListParties"] == 1
    assert info.value.code is code


def test_once_only_call_is_not_repeated_after_unavailable(fake: RunningFake) -> None:
    fake.fake.failures["ApproveWorkload"] = [UNAVAILABLE]
    manifest = common_pb2.WorkloadManifest(name="w")
    with fake.client(retries=3) as client:
        client.list_parties()  # the channel is connected: the call goes out at once
        with pytest.raises(UnavailableError):
            client.approve_workload(manifest, key_ids=["k"], output_recipients=["p"])
    assert fake.fake.calls["ApproveWorkload"] == 1


def test_attest_is_sent_at_most_once(fake: RunningFake) -> None:
    fake.fake.failures["Attest"] = [UNAVAILABLE, UNAVAILABLE]
    with fake.client("sidecar-sidecar-1", retries=3) as client, pytest.raises(UnavailableError):
        client.attest(
            ak_name="00",
            nonce=b"n" * 32,
            quote=attestation_pb2.Quote(),
            event_log=common_pb2.EventLog(),
            ephemeral_key=common_pb2.RecipientKey(),
        )
    assert fake.fake.calls["Attest"] == 1


def test_once_only_call_waits_for_a_broker_that_starts_late(layout: PkiLayout) -> None:
    # Connection failures happen before anything is sent, so even a once-only call survives
    # them: the client proves the connection with a health check first and retries that.
    port = free_port()
    fake = FakeBroker()
    started: list[grpc.Server] = []

    def start_later() -> None:
        time.sleep(0.4)
        server, _ = start_fake_server(fake, layout, port=port)
        started.append(server)

    t = threading.Thread(target=start_later)
    t.start()
    cert, key = layout.cert_and_key("operator")
    try:
        with BrokerClient.connect(
            target=f"127.0.0.1:{port}",
            cert_file=cert,
            key_file=key,
            ca_file=layout.ca_cert,
            retry=RetryPolicy(retries=8, initial_backoff=0.1, max_backoff=0.4),
        ) as client:
            client.add_party("p", common_pb2.RecipientKey())
    finally:
        t.join()
        for s in started:
            s.stop(grace=None)
    assert fake.calls["AddParty"] == 1


def test_once_only_call_without_health_service(layout: PkiLayout) -> None:
    # A server without the health service still proves the connection (UNIMPLEMENTED).
    with running_fake(layout, with_health=False) as running, running.client() as client:
        client.enroll_ak(b"ak")
        assert running.fake.calls["EnrollAk"] == 1


def test_unreachable_broker_fails_fast_with_unavailable(layout: PkiLayout) -> None:
    cert, key = layout.cert_and_key("operator")
    port = free_port()
    with BrokerClient.connect(
        target=f"127.0.0.1:{port}",
        cert_file=cert,
        key_file=key,
        ca_file=layout.ca_cert,
        retry=RetryPolicy(retries=1, initial_backoff=0.01, max_backoff=0.01),
    ) as client:
        start = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            client.list_aks()
        with pytest.raises(UnavailableError):
            client.enroll_ak(b"ak")
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "\n" not in str(info.value)


def test_every_method_is_classified_and_exists() -> None:
    names = {m.name for s in SERVICES for m in s.methods}
    assert IDEMPOTENT_METHODS <= names
    once = names - IDEMPOTENT_METHODS
    assert once == {
        "EnrollEk",
        "EnrollAk",
        "AddParty",
        "RegisterDataKey",
        "ApproveWorkload",
        "CompleteEnrollment",
        "Attest",
        "AttestStream",
    }


def test_retry_policy_delays_grow_with_jitter_and_cap() -> None:
    policy = RetryPolicy(retries=5, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(7)
    for n, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        samples = [policy.delay(n, rng) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling / 10  # jittered, not constant


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retries": -1},
        {"initial_backoff": 0.0},
        {"initial_backoff": 2.0, "max_backoff": 1.0},
        {"multiplier": 0.5},
    ],
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- errors and deadlines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgumentError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
        (grpc.StatusCode.INTERNAL, BrokerClientError),
    ],
)
def test_status_codes_map_to_error_classes(
    fake: RunningFake, code: grpc.StatusCode, cls: type[BrokerClientError]
) -> None:
    fake.fake.failures["GetChallenge"] = [code]
    with fake.client("sidecar-sidecar-1") as client, pytest.raises(cls) as info:
        client.get_challenge("00")
    assert type(info.value) is cls
    assert info.value.code is code
    assert info.value.details == f"scripted {code.name.lower()} for GetChallenge"
    assert str(info.value) == f"GetChallenge: {info.value.details} [{code.name}]"


def test_deadline_is_enforced_and_not_retried(fake: RunningFake) -> None:
    fake.fake.delays["ListApprovals"] = 1.0
    with fake.client(timeout=0.2, retries=3) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.list_approvals()
    assert time.monotonic() - start < 0.9
    assert fake.fake.calls["ListApprovals"] == 1


# --- requests and responses -----------------------------------------------------------------


def test_requests_carry_the_arguments(fake: RunningFake) -> None:
    fake.fake.responses["EnrollEk"] = admin_pb2.EnrollEkResponse(
        ek=admin_pb2.EkInfo(ek_id="ab" * 32)
    )
    fake.fake.responses["VerifyAuditLog"] = admin_pb2.VerifyAuditLogResponse(
        valid=False, records_checked=4, first_bad_sequence=3, problem="hash mismatch"
    )
    with fake.client() as client:
        ek = client.enroll_ek(b"ek-public", allow_without_certificate=True)
        client.revoke_ak("00ab", reason="lost")
        client.list_audit_records(after_sequence=5, limit=7)
        report = client.verify_audit_log()
        client.end_session("s1", workload_exit_code=3, outputs=["a", "b"])
    assert ek.ek_id == "ab" * 32
    assert report.first_bad_sequence == 3 and not report.valid
    (enroll,) = fake.fake.requests["EnrollEk"]
    assert isinstance(enroll, admin_pb2.EnrollEkRequest)
    assert enroll.ek_public == b"ek-public" and enroll.allow_without_certificate
    (revoke,) = fake.fake.requests["RevokeAk"]
    assert isinstance(revoke, admin_pb2.RevokeAkRequest)
    assert (revoke.ak_name, revoke.reason) == ("00ab", "lost")
    (audit,) = fake.fake.requests["ListAuditRecords"]
    assert isinstance(audit, admin_pb2.ListAuditRecordsRequest)
    assert (audit.after_sequence, audit.limit) == (5, 7)
    (end,) = fake.fake.requests["EndSession"]
    assert isinstance(end, attestation_pb2.EndSessionRequest)
    assert (end.workload_exit_code, list(end.outputs)) == (3, ["a", "b"])


def test_register_plain_data_key_seals_to_the_broker_for_this_party(fake: RunningFake) -> None:
    data_key = bytes(range(32))
    with fake.client("party-advertiser") as client:
        assert client.identity == SpiffeId.party("cleanroom.local", "advertiser")
        client.register_plain_data_key("adv-1", data_key, description="ads")
    (req,) = fake.fake.requests["RegisterDataKey"]
    assert isinstance(req, admin_pb2.RegisterDataKeyRequest)
    assert (req.key_id, req.description) == ("adv-1", "ads")
    assert data_key not in req.sealed_data_key
    opened = open_registered_key(
        fake.fake.registration_key, req.sealed_data_key, key_id="adv-1", owner="advertiser"
    )
    assert opened == data_key
    # The owner and key id are bound: the sealed key does not open for another party.
    with pytest.raises(CustodyError):
        open_registered_key(
            fake.fake.registration_key, req.sealed_data_key, key_id="adv-1", owner="publisher"
        )


def test_register_plain_data_key_needs_a_party_certificate(fake: RunningFake) -> None:
    with fake.client("operator") as client, pytest.raises(ClientSetupError, match="party"):
        client.register_plain_data_key("k", bytes(32))
    assert fake.fake.calls["RegisterDataKey"] == 0


def test_register_plain_data_key_refuses_a_short_key(fake: RunningFake) -> None:
    with fake.client("party-advertiser") as client, pytest.raises(CustodyError, match="32"):
        client.register_plain_data_key("k", bytes(16))
    assert fake.fake.calls["RegisterDataKey"] == 0


def test_closed_client_refuses_calls(fake: RunningFake) -> None:
    client = fake.client()
    with client:
        client.list_eks()
    client.close()  # twice is harmless
    with pytest.raises(ClientSetupError, match="closed"):
        client.list_eks()


# --- setup ----------------------------------------------------------------------------------


def test_connect_rejects_a_key_that_does_not_match(layout: PkiLayout) -> None:
    cert, _ = layout.cert_and_key("operator")
    _, other_key = layout.cert_and_key("party", "advertiser")
    with pytest.raises(ClientSetupError, match="not the private key"):
        BrokerClient.connect(
            target="127.0.0.1:1", cert_file=cert, key_file=other_key, ca_file=layout.ca_cert
        )


def test_connect_names_an_expired_certificate(layout: PkiLayout, tmp_path: Path) -> None:
    ca_key, ca_cert = load_ca(layout.directory)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=SpiffeId.operator("cleanroom.local"),
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    (tmp_path / "old.crt").write_bytes(cert_to_pem(cert))
    (tmp_path / "old.key").write_bytes(key_to_pem(key))
    with pytest.raises(ClientSetupError, match="expired on"):
        BrokerClient.connect(
            target="127.0.0.1:1",
            cert_file=tmp_path / "old.crt",
            key_file=tmp_path / "old.key",
            ca_file=layout.ca_cert,
        )


def test_connect_names_a_missing_file(layout: PkiLayout, tmp_path: Path) -> None:
    cert, key = layout.cert_and_key("operator")
    with pytest.raises(ClientSetupError, match="does not exist"):
        BrokerClient.connect(
            target="127.0.0.1:1", cert_file=cert, key_file=key, ca_file=tmp_path / "none.crt"
        )


@pytest.mark.parametrize("target", ["localhost", ":50051", "host:port", "host:0", "h:70000"])
def test_connect_rejects_a_malformed_target(layout: PkiLayout, target: str) -> None:
    cert, key = layout.cert_and_key("operator")
    with pytest.raises(ClientSetupError, match="HOST:PORT"):
        BrokerClient.connect(target=target, cert_file=cert, key_file=key, ca_file=layout.ca_cert)


def test_server_name_override_is_checked_against_the_broker_certificate(
    fake: RunningFake,
) -> None:
    cert, key = fake.layout.cert_and_key("operator")
    with (
        BrokerClient.connect(
            target=fake.target,
            cert_file=cert,
            key_file=key,
            ca_file=fake.layout.ca_cert,
            server_name="not-the-broker.example",
            retry=RetryPolicy(retries=0),
        ) as client,
        pytest.raises(UnavailableError),
    ):
        client.list_eks()
    assert fake.fake.calls["ListEks"] == 0
    with BrokerClient.connect(
        target=fake.target,
        cert_file=cert,
        key_file=key,
        ca_file=fake.layout.ca_cert,
        server_name="localhost",
    ) as client:
        client.list_eks()
    assert fake.fake.calls["ListEks"] == 1
