"""A full attestation over gRPC against a real broker process, with the evidence made by
tpm2-tools on swtpm the way the manual recipe makes it.

The sidecar's side is played by tpm2-tools: ``tpm2_createek``/``tpm2_createak``, credential
activation (``tpm2_activatecredential``) answering the broker's MakeCredential, PCR 23 extends,
and ``tpm2_quote`` with the qualifying data that binds the broker's nonce, an ephemeral HPKE key
and the sidecar's TLS certificate. Released keys are opened with ``broker.release.open_release``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.client import ATTEST_DENIAL_METADATA
from broker.quote import pcr_values_from_tools
from broker.tpmkeys import to_tools_credential_file
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from evidence.binding import qualifying_data
from evidence.launch import Launch
from evidence.pcr import MeasurementEvent
from evidence.proto import bank_to_pb, event_log_to_pb
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from tests.harness.launch import TEST_LAUNCH, with_test_launch
from tests.harness.swtpm import Swtpm
from tests.support.broker import (
    TIMEOUT,
    BrokerProcess,
    add_parties,
    open_released,
    register_key,
    rpc_error,
    running_swtpm_broker,
)
from tests.support.pki import make_pki
from tests.vectors import tpm2tools as tt

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

WORKLOAD = [("model/train.py", b"print('join and train')\n"), ("bin/run.sh", b"#!/bin/sh\n")]
OTHER_WORKLOAD = [("model/train.py", b"print('exfiltrate')\n")]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with running_swtpm_broker(tmp_path, make_pki(tmp_path / "pki")) as process:
        yield process


def _cert_der(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def _manifest(name: str, files: list[tuple[str, bytes]]) -> common_pb2.WorkloadManifest:
    import hashlib

    manifest = common_pb2.WorkloadManifest(name=name)
    for path, data in files:
        entry = manifest.entries.add(path=path, size=len(data))
        for bank in ("sha1", "sha256"):
            entry.digests.add(algorithm=bank_to_pb(bank), value=hashlib.new(bank, data).digest())
    return with_test_launch(manifest)


def _approve(
    broker: BrokerProcess,
    party: str,
    name: str,
    files: list[tuple[str, bytes]],
    key_id: str,
    recipients: list[str],
    golden_set: str = "",
) -> None:
    """``party`` approves the workload ``name`` of ``files`` for its key ``key_id``."""
    broker.admin("party", party).ApproveWorkload(
        admin_pb2.ApproveWorkloadRequest(
            manifest=_manifest(name, files),
            key_ids=[key_id],
            output_recipients=recipients,
            golden_set=golden_set,
        ),
        timeout=TIMEOUT,
    )


def _start_enrollment(
    broker: BrokerProcess, swtpm: Swtpm, workdir: Path
) -> tuple[Any, attestation_pb2.StartEnrollmentResponse, tt.KeyFiles, tt.KeyFiles, Path]:
    """Creates an EK and a tpm2_createak AK and sends StartEnrollment as sidecar-1.

    Returns the sidecar's stub, the broker's challenge, the EK, the AK and the challenge written
    as a tpm2-tools credential file.
    """
    ek = tt.create_ek(swtpm, workdir, alg="rsa")
    ak = tt.create_ak(swtpm, workdir, ek)
    cert = workdir / "ek.der"
    swtpm.tools("tpm2_nvread", "0x1c00002", "-o", str(cert))
    sidecar = broker.attestation("sidecar", "sidecar-1")
    start = sidecar.StartEnrollment(
        attestation_pb2.StartEnrollmentRequest(
            ek_public=ek.public.read_bytes(),
            ek_certificate=cert.read_bytes(),
            ak_public=ak.public.read_bytes(),
        ),
        timeout=TIMEOUT,
    )
    credential = workdir / "credential.out"
    credential.write_bytes(
        to_tools_credential_file(bytes(start.credential_blob), bytes(start.encrypted_secret))
    )
    return sidecar, start, ek, ak, credential


def _enroll_by_credential_activation(
    broker: BrokerProcess, swtpm: Swtpm, workdir: Path
) -> tuple[str, tt.KeyFiles]:
    """Enrolls a tpm2_createak AK through StartEnrollment/CompleteEnrollment."""
    sidecar, start, ek, ak, credential = _start_enrollment(broker, swtpm, workdir)
    secret = tt.activate_credential(swtpm, workdir, ak=ak, ek=ek, credential=credential)
    assert secret is not None
    done = sidecar.CompleteEnrollment(
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=secret),
        timeout=TIMEOUT,
    )
    return done.ak_name, ak


def _evidence(
    broker: BrokerProcess,
    swtpm: Swtpm,
    workdir: Path,
    ak: tt.KeyFiles,
    ak_name: str,
    *,
    files: list[tuple[str, bytes]],
    bind_certificate: bytes,
    prefix: str,
    launch: Launch = TEST_LAUNCH,
) -> tuple[attestation_pb2.AttestRequest, RecipientPrivateKey]:
    """GetChallenge, then measure and quote as the sidecar would, into an AttestRequest."""
    sidecar = broker.attestation("sidecar", "sidecar-1")
    challenge = sidecar.GetChallenge(
        attestation_pb2.GetChallengeRequest(ak_name=ak_name), timeout=TIMEOUT
    )
    assert [(s.bank, list(s.indices)) for s in challenge.pcr_selection] == [
        (common_pb2.HASH_ALGORITHM_SHA256, [23])
    ]
    ephemeral = generate_recipient_key()
    public = ephemeral.public_key()
    binding = qualifying_data(
        nonce=bytes(challenge.nonce),
        kem=public.kem,
        ephemeral_public_key=public.raw,
        tls_certificate_der=bind_certificate,
    )
    tt.reset_pcr23(swtpm)
    events: tuple[MeasurementEvent, ...] = (
        *tt.measure(swtpm, files),
        tt.measure_launch(swtpm, launch),
    )
    quote = tt.quote(swtpm, workdir, ak, qualification=binding, prefix=prefix)
    attest = quote.message.read_bytes()
    request = attestation_pb2.AttestRequest(ak_name=ak_name, nonce=challenge.nonce)
    request.quote.attest = attest
    request.quote.signature = quote.signature.read_bytes()
    for (index, bank), value in pcr_values_from_tools(
        quote.pcrs.read_bytes(), attest=attest
    ).items():
        request.quote.pcr_values.add(index=index, bank=bank_to_pb(bank), value=value)
    request.event_log.CopyFrom(event_log_to_pb(events))
    request.ephemeral_key.kem = public.kem  # type: ignore[assignment]
    request.ephemeral_key.public_key = public.raw
    return request, ephemeral


def test_full_attestation_releases_approved_keys_only(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    add_parties(broker, "advertiser", "publisher")
    adv_key, pub_key = secrets.token_bytes(32), secrets.token_bytes(32)
    register_key(broker, "advertiser", "adv-data", adv_key)
    register_key(broker, "publisher", "pub-data", pub_key)
    # The advertiser approves the workload; the publisher approves another one, so its key is
    # withheld while the advertiser's is released (partial release).
    _approve(
        broker, "advertiser", "join-and-train", WORKLOAD, "adv-data", ["advertiser", "publisher"]
    )
    _approve(broker, "publisher", "other", OTHER_WORKLOAD, "pub-data", ["publisher"])

    ak_name, ak = _enroll_by_credential_activation(broker, swtpm, tmp_path)
    aks = broker.admin("operator").ListAks(admin_pb2.ListAksRequest(), timeout=TIMEOUT).aks
    assert [(a.ak_name, a.enrolled_by) for a in aks] == [(ak_name, "credential-activation")]

    sidecar_der = _cert_der(broker.pki.cert_and_key("sidecar", "sidecar-1").cert)
    request, ephemeral = _evidence(
        broker,
        swtpm,
        tmp_path,
        ak,
        ak_name,
        files=WORKLOAD,
        bind_certificate=sidecar_der,
        prefix="q1",
    )
    request.key_ids[:] = ["adv-data", "pub-data"]
    sidecar = broker.attestation("sidecar", "sidecar-1")
    response = sidecar.Attest(request, timeout=TIMEOUT)

    assert [(k.key_id, k.owner_party) for k in response.released_keys] == [
        ("adv-data", "advertiser")
    ]
    assert [(d.key_id, d.reason) for d in response.denied_keys] == [
        ("pub-data", attestation_pb2.DENIAL_REASON_NOT_APPROVED)
    ]
    withheld_record = _record(broker, response.denied_keys[0].audit_record)
    assert (withheld_record.action, withheld_record.subject) == ("key.release", "pub-data")
    assert sorted(r.party for r in response.output_recipients) == ["advertiser", "publisher"]
    released = response.released_keys[0]
    opened = open_released(ephemeral, response, released)
    assert opened == adv_key

    # The same evidence again: the nonce is spent. The sidecar learns that class of refusal
    # and the record that holds the exact reason, nothing more.
    error = rpc_error(sidecar.Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "attestation denied",
    )
    denial = _denial(error)
    assert denial.reason == attestation_pb2.DENIAL_REASON_NONCE_INVALID
    assert not denial.denied_keys
    verdict = _record(broker, denial.audit_record)
    assert (verdict.action, verdict.decision) == ("attest", "deny")
    assert verdict.reason.startswith("nonce refused: ")

    sidecar.EndSession(
        attestation_pb2.EndSessionRequest(
            session_id=response.session_id, workload_exit_code=0, outputs=["insights.sealed"]
        ),
        timeout=TIMEOUT,
    )
    metrics = broker.metrics()
    assert (
        metrics[
            ("cleanroom_broker_attestations_total", (("reason", "partial"), ("result", "allow")))
        ]
        == 1
    )
    releases = "cleanroom_broker_key_releases_total"
    assert metrics[(releases, (("reason", "approved"), ("result", "released")))] == 1
    assert metrics[(releases, (("reason", "not_approved"), ("result", "withheld")))] == 1
    assert (
        metrics[("cleanroom_broker_attestations_total", (("reason", "nonce"), ("result", "deny")))]
        == 1
    )

    # The publisher's audit trail says exactly why its key was withheld; the sidecar never saw it.
    records = broker.admin("party", "publisher").ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    )
    withheld = [r for r in records.records if r.action == "key.release" and r.decision == "deny"]
    assert [r.subject for r in withheld] == ["pub-data"]
    assert "not approved by publisher" in withheld[0].reason


def _denial(error: grpc.RpcError) -> attestation_pb2.AttestDenial:
    """The AttestDenial that the broker sent with a refused Attest."""
    assert isinstance(error, grpc.Call)
    sent = [v for k, v in error.trailing_metadata() or () if k == ATTEST_DENIAL_METADATA]
    assert len(sent) == 1, error.trailing_metadata()
    denial = attestation_pb2.AttestDenial()
    denial.ParseFromString(sent[0])
    return denial


def _record(broker: BrokerProcess, sequence: int) -> admin_pb2.AuditRecord:
    """The operator's view of audit record ``sequence``."""
    records = (
        broker.admin("operator")
        .ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(after_sequence=sequence - 1, limit=1), timeout=TIMEOUT
        )
        .records
    )
    assert [r.sequence for r in records] == [sequence]
    return records[0]


def test_a_golden_set_denial_tells_the_sidecar_its_class_and_record(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    # The owner approved this very workload, but with a golden set that does not accept the
    # machine: the sidecar is told PLATFORM_NOT_ACCEPTED (not "not approved"), with the audit
    # record of the verdict and of the key, and the metric counts a golden denial.
    add_parties(broker, "advertiser")
    register_key(broker, "advertiser", "adv-data", secrets.token_bytes(32))
    golden = admin_pb2.GoldenPcrSet(name="image-v1")
    golden.accepted_values.add(index=23, bank=common_pb2.HASH_ALGORITHM_SHA256, value=b"\1" * 32)
    broker.admin("operator").SetGoldenPcrSet(
        admin_pb2.SetGoldenPcrSetRequest(golden_set=golden), timeout=TIMEOUT
    )
    _approve(
        broker,
        "advertiser",
        "join-and-train",
        WORKLOAD,
        "adv-data",
        ["advertiser"],
        golden_set="image-v1",
    )
    ak_name, ak = _enroll_by_credential_activation(broker, swtpm, tmp_path)
    sidecar_der = _cert_der(broker.pki.cert_and_key("sidecar", "sidecar-1").cert)
    request, _ = _evidence(
        broker, swtpm, tmp_path, ak, ak_name, files=WORKLOAD, bind_certificate=sidecar_der,
        prefix="q-golden",
    )  # fmt: skip
    request.key_ids[:] = ["adv-data"]
    error = rpc_error(broker.attestation("sidecar", "sidecar-1").Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "attestation denied",
    )
    denial = _denial(error)
    assert denial.reason == attestation_pb2.DENIAL_REASON_PLATFORM_NOT_ACCEPTED
    assert [(k.key_id, k.reason) for k in denial.denied_keys] == [
        ("adv-data", attestation_pb2.DENIAL_REASON_PLATFORM_NOT_ACCEPTED)
    ]
    verdict = _record(broker, denial.audit_record)
    assert (verdict.action, verdict.decision) == ("attest", "deny")
    key_record = _record(broker, denial.denied_keys[0].audit_record)
    assert (key_record.action, key_record.subject, key_record.decision) == (
        "key.release",
        "adv-data",
        "deny",
    )
    assert "golden set 'image-v1': PCR 23 (sha256)" in key_record.reason
    metrics = broker.metrics()
    attestations = "cleanroom_broker_attestations_total"
    assert metrics[(attestations, (("reason", "golden"), ("result", "deny")))] == 1
    assert (attestations, (("reason", "not_approved"), ("result", "deny"))) not in metrics


def test_a_quote_bound_to_another_certificate_is_refused(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    add_parties(broker, "advertiser")
    register_key(broker, "advertiser", "adv-data", secrets.token_bytes(32))
    _approve(broker, "advertiser", "join-and-train", WORKLOAD, "adv-data", ["advertiser"])
    ak_name, ak = _enroll_by_credential_activation(broker, swtpm, tmp_path)
    # A quote made for another TLS identity (here the operator's certificate), relayed over the
    # sidecar's connection: the qualifying data does not match this connection.
    other_der = _cert_der(broker.pki.cert_and_key("operator").cert)
    request, _ = _evidence(
        broker,
        swtpm,
        tmp_path,
        ak,
        ak_name,
        files=WORKLOAD,
        bind_certificate=other_der,
        prefix="relay",
    )
    error = rpc_error(broker.attestation("sidecar", "sidecar-1").Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "attestation denied",
    )
    metrics = broker.metrics()
    assert (
        metrics[
            ("cleanroom_broker_attestations_total", (("reason", "evidence"), ("result", "deny")))
        ]
        == 1
    )
    assert "QualifyingDataError" in broker.stderr()


def test_a_wrong_credential_secret_is_refused_and_audited(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    sidecar, start, ek, ak, credential = _start_enrollment(broker, swtpm, tmp_path)
    secret = tt.activate_credential(swtpm, tmp_path, ak=ak, ek=ek, credential=credential)
    assert secret is not None
    wrong = bytes([secret[0] ^ 1]) + secret[1:]

    error = rpc_error(
        sidecar.CompleteEnrollment,
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=wrong),
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "wrong credential secret",
    )
    # The challenge was spent by the wrong answer: the right secret cannot follow a guess.
    error = rpc_error(
        sidecar.CompleteEnrollment,
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=secret),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    operator = broker.admin("operator")
    assert not operator.ListAks(admin_pb2.ListAksRequest(), timeout=TIMEOUT).aks

    records = operator.ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    ).records
    activations = [r for r in records if r.action == "ak.activate"]
    assert [(r.actor, r.subject, r.decision) for r in activations] == [
        ("spiffe://cleanroom.local/sidecar/sidecar-1", start.enrollment_id, "deny")
    ] * 2
    assert activations[0].reason == "wrong credential secret"
    assert secret.hex() not in activations[0].reason + activations[1].reason
    assert operator.VerifyAuditLog(admin_pb2.VerifyAuditLogRequest(), timeout=TIMEOUT).valid


def test_the_approved_files_launched_with_another_command_get_nothing_and_the_audit_says_why(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    add_parties(broker, "advertiser")
    register_key(broker, "advertiser", "adv-launch", secrets.token_bytes(32))
    _approve(broker, "advertiser", "join-and-train", WORKLOAD, "adv-launch", ["advertiser"])
    ak_name, ak = _enroll_by_credential_activation(broker, swtpm, tmp_path)
    sidecar_der = _cert_der(broker.pki.cert_and_key("sidecar", "sidecar-1").cert)
    other = Launch.create(
        argv=(*TEST_LAUNCH.argv[:1], "-c", "import workload; print(workload.read_csv('a'))"),
        executable_sha256=TEST_LAUNCH.executable_sha256,
        env={**TEST_LAUNCH.environment, "PYTHONPATH": "/tmp/inject"},
        cwd=TEST_LAUNCH.cwd,
    )
    request, _ = _evidence(
        broker,
        swtpm,
        tmp_path,
        ak,
        ak_name,
        files=WORKLOAD,
        bind_certificate=sidecar_der,
        prefix="q-launch",
        launch=other,
    )
    request.key_ids[:] = ["adv-launch"]
    error = rpc_error(broker.attestation("sidecar", "sidecar-1").Attest, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "attestation denied",
    )
    records = (
        broker.admin("party", "advertiser")
        .ListAuditRecords(admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT)
        .records
    )
    (withheld,) = [r for r in records if r.action == "key.release" and r.subject == "adv-launch"]
    assert withheld.decision == "deny"
    assert (
        "launch differs from the approved launch (command: approved `/usr/bin/python3 run.py`, "
        "measured `/usr/bin/python3 -c 'import workload; print(workload.read_csv("
        "'\"'\"'a'\"'\"'))'`"
    ) in withheld.reason
    assert withheld.reason.endswith("; environment: not approved PYTHONPATH)")
