"""``AttestStream``: challenge and evidence on one stream, against a real broker process.

A real broker (``cleanroom broker serve``, mTLS, SQLite) with two parties who approved one
workload, and two sidecars, each with its own certificate and software AK (the TPM2B_PUBLIC of
a key with ``tpm2_createak``'s attributes, enrolled by the operator). The tests show that the
stream releases the keys as the unary calls do, and that it keeps their promises: a nonce is
used once, only by the AK (and stream) it was issued to; a stream abandoned after its challenge
leaves no usable nonce and holds no worker past the nonce's lifetime; an oversized message is
refused; a refusal is as opaque as the unary call's, with its audit record written.
"""

from __future__ import annotations

import queue
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.client import ATTEST_DENIAL_METADATA, BrokerClient, PermissionDeniedError
from cleanroom.closing import Closeable
from cleanroom.v1 import admin_pb2, attestation_pb2
from evidence.binding import qualifying_data
from evidence.pcr import WORKLOAD_PCR, Measurement
from evidence.proto import bank_to_pb, event_log_to_pb
from pki.ca import init_pki
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from tests.harness.launch import approved_manifest, measure_workload
from tests.support.broker import (
    TIMEOUT,
    BrokerProcess,
    add_parties,
    approve_with_keys,
    open_released,
    start_broker,
    write_config,
)
from tests.support.softtpm import QUOTED_BANKS, QuoteMaker, SoftAk

PARTIES = ("advertiser", "publisher")
SIDECARS = ("sidecar-1", "sidecar-2")
WORKLOAD = (("run.py", b"print('join')\n"), ("model.py", b"def train(df):\n    return df\n"))
OTHER_WORKLOAD = (("run.py", b"print('exfiltrate')\n"),)
#: Short, so that the test of a stalled stream waits little; long enough for an attestation.
NONCE_TTL = 4.0
MAX_MESSAGE = 64 * 1024


@dataclass
class Rig:
    broker: BrokerProcess
    aks: dict[str, SoftAk]
    measured: Measurement
    other: Measurement
    data_keys: dict[str, bytes]
    cert_der: dict[str, bytes]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("attest-stream")
    pki = init_pki(workdir / "pki", parties=PARTIES, sidecars=SIDECARS)
    config = write_config(
        workdir / "broker.toml",
        workdir,
        pki,
        nonce_ttl_seconds=NONCE_TTL,
        max_message_bytes=MAX_MESSAGE,
    )
    b = start_broker(config, pki, workdir)
    try:
        measured = measure_workload(workdir / "workload", WORKLOAD)
        other = measure_workload(workdir / "other", OTHER_WORKLOAD)
        add_parties(b, *PARTIES)
        manifest = approved_manifest("join", measured)
        data_keys = approve_with_keys(b, PARTIES, manifest)
        aks = {}
        certs = {}
        for sidecar in SIDECARS:
            ak = SoftAk.generate("ecc")
            b.admin("operator").EnrollAk(
                admin_pb2.EnrollAkRequest(ak_public=ak.tpm2b_public), timeout=TIMEOUT
            )
            aks[sidecar] = ak
            cert, _ = pki.cert_and_key("sidecar", sidecar)
            certs[sidecar] = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
        yield Rig(b, aks, measured, other, data_keys, certs)
    finally:
        assert b.stop() == 0, b.stderr()


def _evidence(
    rig: Rig,
    sidecar: str,
    nonce: bytes,
    ephemeral: RecipientPrivateKey,
    *,
    measured: Measurement | None = None,
    ak_name: str | None = None,
) -> attestation_pb2.AttestRequest:
    """Evidence of ``sidecar`` (its AK, bound to its certificate) for ``nonce``."""
    m = measured or rig.measured
    ak = rig.aks[sidecar]
    public = ephemeral.public_key()
    binding = qualifying_data(
        nonce=nonce,
        kem=public.kem,
        ephemeral_public_key=public.raw,
        tls_certificate_der=rig.cert_der[sidecar],
    )
    attest, signature = QuoteMaker(ak, dict(m.pcrs)).quote(binding)
    request = attestation_pb2.AttestRequest(
        ak_name=ak_name or ak.name_hex,
        nonce=nonce,
        event_log=event_log_to_pb(m.events),
        key_ids=sorted(rig.data_keys),
    )
    request.quote.attest = attest
    request.quote.signature = signature
    for bank in QUOTED_BANKS:
        request.quote.pcr_values.add(index=WORKLOAD_PCR, bank=bank_to_pb(bank), value=m.pcrs[bank])
    request.ephemeral_key.kem = public.kem  # type: ignore[assignment]
    request.ephemeral_key.public_key = public.raw
    return request


class Stream(Closeable):
    """One AttestStream call, driven a message at a time; closing it ends the requests."""

    def __init__(self, rig: Rig, sidecar: str, *, timeout: float = TIMEOUT) -> None:
        self._out: queue.SimpleQueue[attestation_pb2.AttestStreamRequest | None]
        self._out = queue.SimpleQueue()
        stub = rig.broker.attestation("sidecar", sidecar)
        self.call: Any = stub.AttestStream(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[attestation_pb2.AttestStreamRequest]:
        while (item := self._out.get()) is not None:
            yield item

    def send(self, request: attestation_pb2.AttestStreamRequest) -> None:
        self._out.put(request)

    def challenge(self, ak_name: str) -> Any:
        self.send(
            attestation_pb2.AttestStreamRequest(
                challenge=attestation_pb2.GetChallengeRequest(ak_name=ak_name)
            )
        )
        return next(self.call).challenge

    def attest(self, evidence: attestation_pb2.AttestRequest) -> Any:
        self.send(attestation_pb2.AttestStreamRequest(attest=evidence))
        return next(self.call).attest

    def refused(self, evidence: attestation_pb2.AttestRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.attest(evidence)
        return e.value

    def close(self) -> None:
        self._out.put(None)


def _unary_attest_error(rig: Rig, sidecar: str, request: attestation_pb2.AttestRequest) -> Any:
    with pytest.raises(grpc.RpcError) as e:
        rig.broker.attestation("sidecar", sidecar).Attest(request, timeout=TIMEOUT)
    return e.value


def _denial(error: Any) -> attestation_pb2.AttestDenial:
    for key, value in error.trailing_metadata() or ():
        if key == ATTEST_DENIAL_METADATA:
            return attestation_pb2.AttestDenial.FromString(value)
    raise AssertionError(f"no {ATTEST_DENIAL_METADATA} in {error.trailing_metadata()}")


def _audit(rig: Rig, after: int = 0) -> list[admin_pb2.AuditRecord]:
    listed = rig.broker.admin("operator").ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(after_sequence=after, limit=1000), timeout=TIMEOUT
    )
    return list(listed.records)


def _last_sequence(rig: Rig) -> int:
    records = _audit(rig)
    while len(records) == 1000:
        records = _audit(rig, records[-1].sequence)
    return records[-1].sequence if records else 0


def test_a_stream_attests_and_releases_the_approved_keys(rig: Rig) -> None:
    with Stream(rig, "sidecar-1") as stream:
        challenge = stream.challenge(rig.aks["sidecar-1"].name_hex)
        assert len(challenge.nonce) == 32 and challenge.pcr_selection
        with generate_recipient_key() as ephemeral:
            response = stream.attest(_evidence(rig, "sidecar-1", challenge.nonce, ephemeral))
            assert sorted(k.key_id for k in response.released_keys) == sorted(rig.data_keys)
            for key in response.released_keys:
                opened = open_released(ephemeral, response, key)
                assert opened == rig.data_keys[key.key_id]
        # The broker ends the stream after the release.
        assert next(stream.call, None) is None
        assert stream.call.code() == grpc.StatusCode.OK


def test_a_nonce_used_on_a_stream_cannot_be_replayed(rig: Rig) -> None:
    ak = rig.aks["sidecar-1"].name_hex
    with Stream(rig, "sidecar-1") as first:
        used = first.challenge(ak).nonce
        with generate_recipient_key() as ephemeral:
            first.attest(_evidence(rig, "sidecar-1", used, ephemeral))
    # Replayed with the unary call: the nonce is burned.
    with generate_recipient_key() as ephemeral:
        error = _unary_attest_error(rig, "sidecar-1", _evidence(rig, "sidecar-1", used, ephemeral))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _denial(error).reason == attestation_pb2.DENIAL_REASON_NONCE_INVALID
    # Replayed on another stream: refused (it does not answer that stream's challenge) and
    # recorded; that stream's own nonce is burned with the refusal.
    before = _last_sequence(rig)
    with Stream(rig, "sidecar-1") as second:
        fresh = second.challenge(ak).nonce
        with generate_recipient_key() as ephemeral:
            error = second.refused(_evidence(rig, "sidecar-1", used, ephemeral))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = [r for r in _audit(rig, before) if r.action == "attest"]
    assert [r.decision for r in records] == ["deny"]
    assert "challenge of this stream" in records[0].reason
    with generate_recipient_key() as ephemeral:
        error = _unary_attest_error(rig, "sidecar-1", _evidence(rig, "sidecar-1", fresh, ephemeral))
    assert _denial(error).reason == attestation_pb2.DENIAL_REASON_NONCE_INVALID


def test_evidence_for_another_requesters_nonce_is_refused(rig: Rig) -> None:
    # sidecar-2 holds a nonce for its own AK.
    other_ak = rig.aks["sidecar-2"].name_hex
    theirs = (
        rig.broker.attestation("sidecar", "sidecar-2")
        .GetChallenge(attestation_pb2.GetChallengeRequest(ak_name=other_ak), timeout=TIMEOUT)
        .nonce
    )
    before = _last_sequence(rig)
    with Stream(rig, "sidecar-1") as stream:
        stream.challenge(rig.aks["sidecar-1"].name_hex)
        with generate_recipient_key() as ephemeral:
            error = stream.refused(_evidence(rig, "sidecar-1", theirs, ephemeral))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.decision for r in _audit(rig, before) if r.action == "attest"] == ["deny"]
    # Nor can a stream's challenge for one AK be answered with evidence naming another AK.
    with Stream(rig, "sidecar-1") as stream:
        mine = stream.challenge(rig.aks["sidecar-1"].name_hex).nonce
        with generate_recipient_key() as ephemeral:
            evidence = _evidence(rig, "sidecar-2", mine, ephemeral, ak_name=other_ak)
            assert stream.refused(evidence).code() == grpc.StatusCode.INVALID_ARGUMENT
    # The refusal did not burn sidecar-2's nonce: its owner still attests with it.
    with generate_recipient_key() as ephemeral:
        response = rig.broker.attestation("sidecar", "sidecar-2").Attest(
            _evidence(rig, "sidecar-2", theirs, ephemeral), timeout=TIMEOUT
        )
    assert len(response.released_keys) == len(rig.data_keys)


def test_a_stream_abandoned_after_its_challenge_leaves_no_usable_nonce(rig: Rig) -> None:
    ak = rig.aks["sidecar-1"].name_hex
    stream = Stream(rig, "sidecar-1")
    nonce = stream.challenge(ak).nonce
    stream.call.cancel()
    stream.close()
    # The broker burns the nonce as the stream ends (asynchronously to the client's cancel).
    deadline = time.monotonic() + TIMEOUT
    while True:
        with generate_recipient_key() as ephemeral:
            request = _evidence(rig, "sidecar-1", nonce, ephemeral)
        try:
            rig.broker.attestation("sidecar", "sidecar-1").Attest(request, timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert _denial(e).reason == attestation_pb2.DENIAL_REASON_NONCE_INVALID
            break
        raise AssertionError("the nonce of an abandoned stream released keys")
    assert time.monotonic() < deadline


def test_a_stalled_stream_is_ended_when_its_nonce_expires(rig: Rig) -> None:
    with Stream(rig, "sidecar-1", timeout=NONCE_TTL * 4) as stream:
        start = time.monotonic()
        stream.challenge(rig.aks["sidecar-1"].name_hex)
        # The client neither sends its evidence nor closes: the broker cancels the call at the
        # nonce's expiry, well before the client's own deadline, freeing its worker thread.
        with pytest.raises(grpc.RpcError) as e:
            next(stream.call)
        waited = time.monotonic() - start
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert NONCE_TTL - 0.5 <= waited < NONCE_TTL * 3


def test_an_oversized_message_on_the_stream_is_refused(rig: Rig) -> None:
    ak = rig.aks["sidecar-1"].name_hex
    with Stream(rig, "sidecar-1") as stream:
        nonce = stream.challenge(ak).nonce
        with generate_recipient_key() as ephemeral:
            evidence = _evidence(rig, "sidecar-1", nonce, ephemeral)
        evidence.snp_evidence.hcl_report = b"\0" * (MAX_MESSAGE + 1)
        error = stream.refused(evidence)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Its nonce is burned with the stream.
    deadline = time.monotonic() + TIMEOUT
    with generate_recipient_key() as ephemeral:
        request = _evidence(rig, "sidecar-1", nonce, ephemeral)
    error = _unary_attest_error(rig, "sidecar-1", request)
    assert _denial(error).reason == attestation_pb2.DENIAL_REASON_NONCE_INVALID
    assert time.monotonic() < deadline


def test_a_denial_on_the_stream_is_opaque_and_recorded(rig: Rig) -> None:
    before = _last_sequence(rig)
    with Stream(rig, "sidecar-1") as stream:
        nonce = stream.challenge(rig.aks["sidecar-1"].name_hex).nonce
        with generate_recipient_key() as ephemeral:
            evidence = _evidence(rig, "sidecar-1", nonce, ephemeral, measured=rig.other)
            error = stream.refused(evidence)
    # The same answer as the unary Attest: one opaque message, the coarse class and the record.
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "attestation denied"
    denial = _denial(error)
    assert denial.audit_record > before
    records = {r.sequence: r for r in _audit(rig, before)}
    record = records[denial.audit_record]
    assert (record.action, record.decision) == ("attest", "deny")
    assert record.reason  # the exact reason is the operator's, not the sidecar's
    assert record.reason not in (error.details() or "")


def test_only_sidecars_may_open_an_attest_stream(rig: Rig) -> None:
    stub = rig.broker.attestation("party", "advertiser")
    request = attestation_pb2.AttestStreamRequest(
        challenge=attestation_pb2.GetChallengeRequest(ak_name=rig.aks["sidecar-1"].name_hex)
    )
    with pytest.raises(grpc.RpcError) as e:
        call: Any = stub.AttestStream(iter([request]), timeout=TIMEOUT)
        next(call)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_stream_must_start_with_a_challenge(rig: Rig) -> None:
    with Stream(rig, "sidecar-1") as stream:
        with generate_recipient_key() as ephemeral:
            evidence = _evidence(rig, "sidecar-1", secrets.token_bytes(32), ephemeral)
        error = stream.refused(evidence)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_attests_on_one_stream_and_maps_a_denial(rig: Rig, tmp_path: Path) -> None:
    pki = rig.broker.pki
    cert, key = pki.cert_and_key("sidecar", "sidecar-1")
    client = BrokerClient.connect(
        target=rig.broker.grpc_address, cert_file=cert, key_file=key, ca_file=pki.ca_cert
    )
    with client, generate_recipient_key() as ephemeral:
        response = client.attest_stream(
            rig.aks["sidecar-1"].name_hex,
            lambda challenge: _evidence(rig, "sidecar-1", challenge.nonce, ephemeral),
        )
        assert sorted(k.key_id for k in response.released_keys) == sorted(rig.data_keys)
        with pytest.raises(PermissionDeniedError) as e:
            client.attest_stream(
                rig.aks["sidecar-1"].name_hex,
                lambda c: _evidence(rig, "sidecar-1", c.nonce, ephemeral, measured=rig.other),
            )
        assert e.value.denial is not None
        assert e.value.denial.reason == attestation_pb2.DENIAL_REASON_NOT_APPROVED
