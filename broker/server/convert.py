"""Conversions between ``cleanroom.v1`` messages and the broker's domain objects.

Requests are validated (:mod:`broker.server.validate`) before they are converted, so the
functions that read requests assume well-formed input.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from broker.model import (
    AkRecord,
    Approval,
    AuditRecord,
    DataKeyRecord,
    DenialCode,
    EkRecord,
    GoldenPcrSet,
    Party,
    PcrKey,
)
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from evidence.launch import Launch
from evidence.pcr import WORKLOAD_PCR
from evidence.proto import bank_from_pb, bank_to_pb, launch_from_pb, manifest_to_pb


def timestamp(when: datetime | None) -> Timestamp:
    """A protobuf Timestamp of an aware datetime (the epoch for None)."""
    ts = Timestamp()
    if when is not None:
        ts.FromDatetime(when)
    return ts


_DENIAL_REASONS: dict[DenialCode, attestation_pb2.DenialReason.ValueType] = {
    DenialCode.NOT_APPROVED: attestation_pb2.DENIAL_REASON_NOT_APPROVED,
    DenialCode.PLATFORM_NOT_ACCEPTED: attestation_pb2.DENIAL_REASON_PLATFORM_NOT_ACCEPTED,
    DenialCode.ATTESTER_REVOKED: attestation_pb2.DENIAL_REASON_ATTESTER_REVOKED,
    DenialCode.ATTESTER_UNKNOWN: attestation_pb2.DENIAL_REASON_ATTESTER_UNKNOWN,
    DenialCode.EVIDENCE_INVALID: attestation_pb2.DENIAL_REASON_EVIDENCE_INVALID,
    DenialCode.NONCE_INVALID: attestation_pb2.DENIAL_REASON_NONCE_INVALID,
    DenialCode.KEY_CUSTODY: attestation_pb2.DENIAL_REASON_KEY_CUSTODY,
    DenialCode.KEYS_WITHHELD: attestation_pb2.DENIAL_REASON_KEYS_WITHHELD,
}


def denial_reason_pb(code: DenialCode) -> attestation_pb2.DenialReason.ValueType:
    """The ``DenialReason`` the sidecar is told for ``code``."""
    return _DENIAL_REASONS[code]


def pcr_values_from_pb(values: Iterable[common_pb2.PcrValue]) -> dict[tuple[int, str], bytes]:
    """``[(index, bank, value)]`` -> ``{(index, bank): value}`` (validated input)."""
    return {(v.index, bank_from_pb(v.bank)): bytes(v.value) for v in values}


def recipient_key_pb(kem: int, public_key: bytes) -> common_pb2.RecipientKey:
    return common_pb2.RecipientKey(
        kem=common_pb2.KemAlgorithm.ValueType(kem), public_key=public_key
    )


def party_to_pb(party: Party) -> admin_pb2.Party:
    return admin_pb2.Party(
        name=party.name, recipient_key=recipient_key_pb(party.kem, party.public_key)
    )


def party_from_pb(msg: admin_pb2.Party) -> Party:
    return Party(
        name=msg.name,
        kem=int(msg.recipient_key.kem),
        public_key=bytes(msg.recipient_key.public_key),
    )


def ek_to_pb(ek: EkRecord) -> admin_pb2.EkInfo:
    return admin_pb2.EkInfo(
        ek_id=ek.ek_id,
        ek_public=ek.public,
        ek_certificate=ek.certificate or b"",
        revoked=ek.revoked,
        enrolled_at=timestamp(ek.enrolled_at),
        revoked_reason=ek.revoked_reason,
    )


def ak_to_pb(ak: AkRecord) -> admin_pb2.AkInfo:
    return admin_pb2.AkInfo(
        ak_name=ak.ak_name,
        ak_public=ak.public,
        ek_id=ak.ek_id or "",
        revoked=ak.revoked,
        enrolled_at=timestamp(ak.enrolled_at),
        enrolled_by=ak.enrolled_by,
    )


def golden_set_to_pb(golden: GoldenPcrSet) -> admin_pb2.GoldenPcrSet:
    msg = admin_pb2.GoldenPcrSet(name=golden.name, updated_at=timestamp(golden.updated_at))
    for key in sorted(golden.accepted, key=lambda k: (k.index, k.bank)):
        for value in sorted(golden.accepted[key]):
            msg.accepted_values.add(index=key.index, bank=bank_to_pb(key.bank), value=value)
    return msg


def golden_set_from_pb(msg: admin_pb2.GoldenPcrSet, *, now: datetime) -> GoldenPcrSet:
    accepted: dict[PcrKey, set[bytes]] = {}
    for v in msg.accepted_values:
        accepted.setdefault(PcrKey(v.index, bank_from_pb(v.bank)), set()).add(bytes(v.value))
    return GoldenPcrSet(
        name=msg.name,
        accepted={k: frozenset(vs) for k, vs in accepted.items()},
        updated_at=now,
    )


def data_key_to_pb(key: DataKeyRecord) -> admin_pb2.DataKeyInfo:
    return admin_pb2.DataKeyInfo(
        key_id=key.key_id,
        owner_party=key.owner,
        description=key.description,
        kek_ref=key.kek_ref,
        created_at=timestamp(key.created_at),
    )


def party_kek_to_pb(
    *, party: str, kek_ref: str, source: str, checked_key: str, updated_at: datetime | None
) -> admin_pb2.PartyKek:
    msg = admin_pb2.PartyKek(party=party, kek_ref=kek_ref, source=source, checked_key=checked_key)
    if updated_at is not None:
        msg.updated_at.CopyFrom(timestamp(updated_at))
    return msg


def launch_from_manifest_pb(msg: common_pb2.WorkloadManifest) -> Launch | None:
    """The manifest's launch (validated already), or None when it has none.

    Raises:
        LaunchError: the launch is malformed (requests are validated before, so only for
            callers that skip validation).
    """
    return launch_from_pb(msg.launch) if msg.HasField("launch") else None


def approval_to_pb(approval: Approval) -> admin_pb2.Approval:
    msg = admin_pb2.Approval(
        approval_id=approval.approval_id,
        party=approval.party,
        manifest=manifest_to_pb(approval.workload_name, approval.manifest, approval.launch),
        key_ids=list(approval.key_ids),
        output_recipients=list(approval.output_recipients),
        golden_set=approval.golden_set or "",
        revoked=approval.revoked,
        created_at=timestamp(approval.created_at),
        require_snp=approval.require_snp,
    )
    for bank in sorted(approval.expected_pcrs):
        msg.expected_pcrs.add(
            index=WORKLOAD_PCR, bank=bank_to_pb(bank), value=approval.expected_pcrs[bank]
        )
    return msg


def audit_record_to_pb(record: AuditRecord) -> admin_pb2.AuditRecord:
    return admin_pb2.AuditRecord(
        sequence=record.sequence,
        time=timestamp(record.time),
        actor=record.actor,
        action=record.action,
        subject=record.subject,
        decision=record.decision,
        reason=record.reason,
        evidence_digest=record.evidence_digest,
        parties=list(record.parties),
        previous_hash=record.previous_hash,
        record_hash=record.record_hash,
    )


__all__ = [
    "ak_to_pb",
    "approval_to_pb",
    "audit_record_to_pb",
    "data_key_to_pb",
    "ek_to_pb",
    "golden_set_from_pb",
    "golden_set_to_pb",
    "launch_from_manifest_pb",
    "party_from_pb",
    "party_to_pb",
    "pcr_values_from_pb",
    "recipient_key_pb",
    "timestamp",
]
