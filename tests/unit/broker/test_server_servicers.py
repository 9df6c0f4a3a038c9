"""The broker's servicers behind the call guard, on grpcio-testing's in-process server.

A real :class:`~broker.core.Broker` over SQLite in ``tmp_path`` answers; only the transport is
in-process. The caller's identity is what the TLS handshake would have produced (a SPIFFE ID and
a certificate DER from a real ``init_pki``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.model import GoldenPcrSet, PcrKey
from broker.server.status import ATTESTATION_DENIED
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from pki.ca import init_pki
from pki.identity import SpiffeId
from tests.harness.launch import with_test_launch
from tests.support.servicers import (
    ADVERTISER,
    OPERATOR,
    PUBLISHER,
    SIDECAR,
    TD,
    Harness,
    _add_parties,
    _attest_request,
    _register,
)
from tests.vectors.evidence import quote_vector


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    pki = init_pki(tmp_path / "pki", parties=("advertiser", "publisher"))
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        challenge_rate_per_peer=1.0,
        challenge_rate_per_ak=1.0,
    )
    with open_broker(config) as broker:
        yield Harness(broker=broker, pki=pki)


def _manifest() -> common_pb2.WorkloadManifest:
    m = common_pb2.WorkloadManifest(name="join-and-train")
    for path, data in (("model/train.py", b"print('train')"), ("bin/run.sh", b"#!/bin/sh")):
        e = m.entries.add(path=path, size=len(data))
        e.digests.add(
            algorithm=common_pb2.HASH_ALGORITHM_SHA256, value=hashlib.sha256(data).digest()
        )
    return with_test_launch(m)


# --- admin ----------------------------------------------------------------------------------


def test_broker_info_gives_the_registration_key(h: Harness) -> None:
    info = h.ok(ADVERTISER, "GetBrokerInfo", admin_pb2.GetBrokerInfoRequest())
    assert info.trust_domain == TD
    assert info.registration_key.kem == common_pb2.KEM_ALGORITHM_X25519
    assert bytes(info.registration_key.public_key) == h.broker.registration_key.public_key().raw


def test_parties_register_keys_and_see_only_their_own(h: Harness) -> None:
    _add_parties(h)
    _, code, details = _register(h, ADVERTISER, "adv-key")
    assert code == grpc.StatusCode.OK, details
    _, code, _ = _register(h, PUBLISHER, "pub-key")
    assert code == grpc.StatusCode.OK
    mine = h.ok(ADVERTISER, "ListDataKeys", admin_pb2.ListDataKeysRequest())
    assert [k.key_id for k in mine.keys] == ["adv-key"]
    assert mine.keys[0].owner_party == "advertiser" and mine.keys[0].kek_ref == "local"
    everything = h.ok(OPERATOR, "ListDataKeys", admin_pb2.ListDataKeysRequest())
    assert sorted(k.key_id for k in everything.keys) == ["adv-key", "pub-key"]
    _, code, _ = _register(h, ADVERTISER, "adv-key")
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_a_party_cannot_register_a_key_sealed_for_another(h: Harness) -> None:
    _add_parties(h)
    _, code, details = _register(h, ADVERTISER, "pub-key-2", owner="publisher")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sealed_data_key")
    theirs = h.ok(PUBLISHER, "ListDataKeys", admin_pb2.ListDataKeysRequest())
    assert not theirs.keys


def test_approvals_only_for_own_keys(h: Harness) -> None:
    _add_parties(h)
    _register(h, ADVERTISER, "adv-key")
    _register(h, PUBLISHER, "pub-key")
    request = admin_pb2.ApproveWorkloadRequest(
        manifest=_manifest(), key_ids=["pub-key"], output_recipients=["advertiser"]
    )
    _, code, _ = h.call(ADVERTISER, "ApproveWorkload", request)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    request.key_ids[:] = ["adv-key"]
    approval = h.ok(ADVERTISER, "ApproveWorkload", request).approval
    assert approval.party == "advertiser" and list(approval.key_ids) == ["adv-key"]
    assert [p.index for p in approval.expected_pcrs] == [23]
    assert h.ok(PUBLISHER, "ListApprovals", admin_pb2.ListApprovalsRequest()).approvals == []
    # The publisher cannot revoke the advertiser's approval; the advertiser can.
    revoke = admin_pb2.RevokeApprovalRequest(approval_id=approval.approval_id)
    _, code, _ = h.call(PUBLISHER, "RevokeApproval", revoke)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    h.ok(ADVERTISER, "RevokeApproval", revoke)
    listed = h.ok(ADVERTISER, "ListApprovals", admin_pb2.ListApprovalsRequest()).approvals
    assert [a.revoked for a in listed] == [True]


def test_audit_records_are_filtered_by_party_and_the_chain_verifies(h: Harness) -> None:
    _add_parties(h)
    _register(h, ADVERTISER, "adv-key")
    _register(h, PUBLISHER, "pub-key")
    adv = h.ok(ADVERTISER, "ListAuditRecords", admin_pb2.ListAuditRecordsRequest())
    assert adv.records and all("advertiser" in r.parties for r in adv.records)
    assert "pub-key" not in {r.subject for r in adv.records}
    everything = h.ok(OPERATOR, "ListAuditRecords", admin_pb2.ListAuditRecordsRequest(limit=1000))
    assert {"adv-key", "pub-key"} <= {r.subject for r in everything.records}
    report = h.ok(OPERATOR, "VerifyAuditLog", admin_pb2.VerifyAuditLogRequest())
    assert report.valid and report.records_checked == len(everything.records)
    _, code, details = h.call(
        OPERATOR, "ListAuditRecords", admin_pb2.ListAuditRecordsRequest(limit=5000)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("limit")


def test_golden_sets_round_trip_and_unknown_ones_are_not_found(h: Harness) -> None:
    golden = admin_pb2.GoldenPcrSet(name="image-v1")
    for value in (b"\x01" * 32, b"\x02" * 32):
        golden.accepted_values.add(index=23, bank=common_pb2.HASH_ALGORITHM_SHA256, value=value)
    h.ok(OPERATOR, "SetGoldenPcrSet", admin_pb2.SetGoldenPcrSetRequest(golden_set=golden))
    listed = h.ok(ADVERTISER, "ListGoldenPcrSets", admin_pb2.ListGoldenPcrSetsRequest())
    assert [g.name for g in listed.golden_sets] == ["image-v1"]
    assert len(listed.golden_sets[0].accepted_values) == 2
    h.ok(OPERATOR, "DeleteGoldenPcrSet", admin_pb2.DeleteGoldenPcrSetRequest(name="image-v1"))
    _, code, _ = h.call(
        OPERATOR, "DeleteGoldenPcrSet", admin_pb2.DeleteGoldenPcrSetRequest(name="image-v1")
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_golden_set_over_a_pcr_no_quote_covers_is_invalid_argument(h: Harness) -> None:
    # The broker's challenge names PCR 23 and boot_pcrs (none here): a golden set on PCR 7
    # could never be met by a sidecar that does not happen to quote PCR 7 too.
    golden = admin_pb2.GoldenPcrSet(name="boot-image")
    golden.accepted_values.add(index=7, bank=common_pb2.HASH_ALGORITHM_SHA256, value=b"\1" * 32)
    golden.accepted_values.add(index=23, bank=common_pb2.HASH_ALGORITHM_SHA256, value=b"\2" * 32)
    _, code, details = h.call(
        OPERATOR, "SetGoldenPcrSet", admin_pb2.SetGoldenPcrSetRequest(golden_set=golden)
    )
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "golden set 'boot-image' names PCR 7, which no quote is sure to cover: quotes cover "
        "PCR 23 (PCR 23 and the broker's boot_pcrs); add the PCR to boot_pcrs or remove it from "
        "the golden set",
    )
    listed = h.ok(OPERATOR, "ListGoldenPcrSets", admin_pb2.ListGoldenPcrSetsRequest())
    assert list(listed.golden_sets) == []

    # A set stored while boot_pcrs still named PCR 7 (the broker restarted without it since):
    # an approval that names it is refused the same way, and nothing is stored.
    h.broker.store.put_golden_set(
        GoldenPcrSet(
            name="boot-image",
            accepted={PcrKey(7, "sha256"): frozenset({b"\1" * 32})},
            updated_at=datetime.now(UTC),
        )
    )
    _add_parties(h)
    _register(h, ADVERTISER, "adv-key")
    request = admin_pb2.ApproveWorkloadRequest(
        manifest=_manifest(),
        key_ids=["adv-key"],
        output_recipients=["advertiser"],
        golden_set="boot-image",
    )
    _, code, details = h.call(ADVERTISER, "ApproveWorkload", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "names PCR 7, which no quote is sure to cover: quotes cover PCR 23" in details
    assert h.ok(ADVERTISER, "ListApprovals", admin_pb2.ListApprovalsRequest()).approvals == []


def test_golden_sets_may_name_the_boot_pcrs(tmp_path: Path) -> None:
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        boot_pcrs=(0, 7),
    )
    with open_broker(config) as broker:
        h = Harness(broker=broker, pki=init_pki(tmp_path / "pki", parties=("advertiser",)))
        golden = admin_pb2.GoldenPcrSet(name="boot-image")
        for index in (0, 7, 23):
            golden.accepted_values.add(
                index=index, bank=common_pb2.HASH_ALGORITHM_SHA1, value=b"\1" * 20
            )
        h.ok(OPERATOR, "SetGoldenPcrSet", admin_pb2.SetGoldenPcrSetRequest(golden_set=golden))
        golden.accepted_values.add(index=8, bank=common_pb2.HASH_ALGORITHM_SHA256, value=b"\1" * 32)
        _, code, details = h.call(
            OPERATOR, "SetGoldenPcrSet", admin_pb2.SetGoldenPcrSetRequest(golden_set=golden)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "names PCR 8, which no quote is sure to cover: quotes cover PCR 0, 7, 23" in details


def test_operator_enrolls_and_revokes_an_ak(h: Harness) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    ak = h.ok(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public)).ak
    assert ak.enrolled_by == "operator" and not ak.revoked
    _, code, _ = h.call(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    h.ok(OPERATOR, "RevokeAk", admin_pb2.RevokeAkRequest(ak_name=ak.ak_name, reason="lost"))
    listed = h.ok(OPERATOR, "ListAks", admin_pb2.ListAksRequest()).aks
    assert [(a.ak_name, a.revoked) for a in listed] == [(ak.ak_name, True)]
    _, code, _ = h.call(OPERATOR, "RevokeAk", admin_pb2.RevokeAkRequest(ak_name="00" * 34))
    assert code == grpc.StatusCode.NOT_FOUND
    _, code, details = h.call(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=b"junk"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


# --- authorization through the guard --------------------------------------------------------


def test_role_denials_are_permission_denied_audited_and_counted(h: Harness) -> None:
    _, code, details = h.call(SIDECAR, "ListEks", admin_pb2.ListEksRequest())
    assert code == grpc.StatusCode.PERMISSION_DENIED and "operator" in details
    _, code, _ = h.call(OPERATOR, "GetChallenge", attestation_pb2.GetChallengeRequest(ak_name="00"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    records = h.broker.audit.list_records(limit=100)
    authz = [r for r in records if r.action == "authz"]
    assert [(r.actor, r.decision) for r in authz] == [
        (str(SIDECAR), "deny"),
        (str(OPERATOR), "deny"),
    ]
    assert "ListEks" in authz[0].subject and "may not call" in authz[0].reason
    assert (
        h.metric(
            "cleanroom_broker_authz_denials_total",
            method="cleanroom.v1.AdminService/ListEks",
            kind="sidecar",
        )
        == 1.0
    )


def test_foreign_trust_domain_and_missing_identity(h: Harness) -> None:
    foreign = SpiffeId.operator("other.example")
    _, code, _ = h.call(foreign, "ListEks", admin_pb2.ListEksRequest())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    _, code, _ = h.call(None, "ListEks", admin_pb2.ListEksRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    reasons = [r.reason for r in h.broker.audit.list_records(limit=10) if r.action == "authz"]
    assert "trust domain" in reasons[0] and "unauthenticated" in reasons[1]


def test_a_party_reading_audit_records_of_another_gets_none(h: Harness) -> None:
    _add_parties(h)
    _register(h, PUBLISHER, "pub-key")
    adv = h.ok(ADVERTISER, "ListAuditRecords", admin_pb2.ListAuditRecordsRequest())
    assert all("publisher" not in r.parties or "advertiser" in r.parties for r in adv.records)
    assert not any(r.subject == "pub-key" for r in adv.records)


# --- attestation ----------------------------------------------------------------------------


def test_challenge_for_unknown_ak_is_a_failed_precondition(h: Harness) -> None:
    _, code, _ = h.call(SIDECAR, "GetChallenge", attestation_pb2.GetChallengeRequest(ak_name="00"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_challenges_are_rate_limited(h: Harness) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    ak = h.ok(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public)).ak
    request = attestation_pb2.GetChallengeRequest(ak_name=ak.ak_name)
    # Rate 1/s with a burst of 10 (10 seconds' worth): the eleventh call in a row is refused.
    codes = [h.call(SIDECAR, "GetChallenge", request)[1] for _ in range(11)]
    assert codes[:10] == [grpc.StatusCode.OK] * 10
    assert codes[10] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.metric("cleanroom_broker_rate_limited_total", scope="peer") == 1.0


def test_challenge_carries_nonce_and_selection(h: Harness) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    ak = h.ok(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public)).ak
    response = h.ok(
        SIDECAR, "GetChallenge", attestation_pb2.GetChallengeRequest(ak_name=ak.ak_name)
    )
    assert len(response.nonce) == 32
    assert [(s.bank, list(s.indices)) for s in response.pcr_selection] == [
        (common_pb2.HASH_ALGORITHM_SHA256, [23])
    ]
    assert h.broker.nonces.count_outstanding() == 1


def test_attest_with_a_foreign_nonce_is_opaque_and_counted(h: Harness) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    h.ok(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public))
    _, code, details = h.call(SIDECAR, "Attest", _attest_request(b"\x07" * 32))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)
    assert h.metric("cleanroom_broker_attestations_total", result="deny", reason="nonce") == 1.0
    denial = [r for r in h.broker.audit.list_records(limit=100) if r.action == "attest"]
    assert denial and denial[-1].decision == "deny" and "nonce" in denial[-1].reason


def test_attest_with_a_real_nonce_but_someone_elses_quote_is_denied(h: Harness) -> None:
    vector = quote_vector("quote-rsa-rsassa-valid")
    ak = h.ok(OPERATOR, "EnrollAk", admin_pb2.EnrollAkRequest(ak_public=vector.ak_public)).ak
    nonce = h.ok(SIDECAR, "GetChallenge", attestation_pb2.GetChallengeRequest(ak_name=ak.ak_name))
    _, code, details = h.call(SIDECAR, "Attest", _attest_request(bytes(nonce.nonce)))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)
    assert h.metric("cleanroom_broker_attestations_total", result="deny", reason="evidence") == 1.0
    # The nonce was spent: it cannot be tried again.
    _, code, _ = h.call(SIDECAR, "Attest", _attest_request(bytes(nonce.nonce)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert h.metric("cleanroom_broker_attestations_total", result="deny", reason="nonce") == 1.0


def test_attest_for_an_unknown_ak_is_a_failed_precondition(h: Harness) -> None:
    _, code, _ = h.call(SIDECAR, "Attest", _attest_request(b"\x07" * 32))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert h.metric("cleanroom_broker_attestations_total", result="deny", reason="ak") == 1.0


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("quote"), "quote"),
        (lambda r: setattr(r.quote, "attest", b"\x00\x01"), "quote.attest"),
        (lambda r: setattr(r.quote, "attest", bytes(r.quote.attest) + b"\x00"), "quote.attest"),
        (lambda r: setattr(r.quote, "signature", b""), "quote.signature"),
        (lambda r: setattr(r.ephemeral_key, "kem", 7), "ephemeral_key.kem"),
        (
            lambda r: setattr(r.ephemeral_key, "public_key", b"\x01" * 31),
            "ephemeral_key.public_key",
        ),
        (lambda r: r.quote.pcr_values.add(index=23, bank=99), "quote.pcr_values[2].bank"),
        (lambda r: r.key_ids.append("two words"), "key_ids[0]"),
        (lambda r: setattr(r, "nonce", b""), "nonce"),
    ],
)
def test_malformed_attest_requests_name_the_field(h: Harness, mutate: Any, field: str) -> None:
    request = _attest_request(b"\x07" * 32)
    mutate(request)
    _, code, details = h.call(SIDECAR, "Attest", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field + ":"), details
    assert (
        h.metric("cleanroom_broker_attestations_total", result="deny", reason="invalid_request")
        == 1.0
    )


def test_end_session_of_unknown_session_is_not_found(h: Harness) -> None:
    _, code, _ = h.call(
        SIDECAR, "EndSession", attestation_pb2.EndSessionRequest(session_id="deadbeef")
    )
    assert code == grpc.StatusCode.NOT_FOUND
    _, code, details = h.call(SIDECAR, "EndSession", attestation_pb2.EndSessionRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("session_id")


def test_latency_is_recorded_by_method_and_code(h: Harness) -> None:
    h.call(SIDECAR, "ListEks", admin_pb2.ListEksRequest())
    h.ok(OPERATOR, "ListEks", admin_pb2.ListEksRequest())
    for code in ("PERMISSION_DENIED", "OK"):
        assert (
            h.metric(
                "cleanroom_broker_rpc_duration_seconds_count",
                method="cleanroom.v1.AdminService/ListEks",
                code=code,
            )
            == 1.0
        )


def test_an_approval_without_a_launch_is_refused_saying_how_to_approve_one(h: Harness) -> None:
    _add_parties(h)
    _register(h, ADVERTISER, "adv-key")
    manifest = _manifest()
    manifest.ClearField("launch")
    request = admin_pb2.ApproveWorkloadRequest(
        manifest=manifest, key_ids=["adv-key"], output_recipients=["advertiser"]
    )
    _, code, details = h.call(ADVERTISER, "ApproveWorkload", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("manifest.launch: is required: an approval covers the launch too")
    assert "--command" in details
    # A launch that names a program by a bare name is refused too: the sidecar never searches
    # PATH.
    request.manifest.CopyFrom(_manifest())
    request.manifest.launch.argv[0] = "python3"
    request.manifest.launch.executable = "python3"
    _, code, details = h.call(ADVERTISER, "ApproveWorkload", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be an absolute path" in details
