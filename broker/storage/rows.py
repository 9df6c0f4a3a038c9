"""Rows to domain objects and back: the one place that knows how each object is laid out in
its table (JSON columns, bytes, booleans). No I/O: the repositories run the statements."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Row

from broker.errors import BrokerError, PolicyError, UnknownPolicyObjectError
from broker.model import (
    APPROVAL_INDEX_BANK,
    AkRecord,
    Approval,
    AuditRecord,
    CredentialChallenge,
    DataKeyRecord,
    EkRecord,
    GoldenPcrSet,
    Party,
    PartyKek,
    PcrKey,
    Session,
)
from evidence.launch import Launch
from evidence.manifest import ManifestEntry, files_pcr23

# json.dumps with any option builds a new encoder per call; this one is built once (an encoder
# keeps no state between calls, so threads can share it).
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def json_list(text: str) -> list[str]:
    """A JSON list of strings column (an audit record's parties)."""
    return [str(x) for x in json.loads(text)]


def dumps(value: Any) -> str:
    """Canonical compact JSON (sorted keys) for a JSON column."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def values(record: EkRecord | AkRecord | Party | DataKeyRecord) -> dict[str, Any]:
    """The row that inserts ``record``: these records' fields are their tables' columns."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def ek(row: Row[Any], prefix: str = "") -> EkRecord:
    """The EK of a row; ``prefix`` is its columns' label prefix where a join labels them (the
    AK-and-EK lookup labels them ``ek_``, as the two tables share column names)."""
    certificate = getattr(row, prefix + "certificate")
    return EkRecord(
        ek_id=getattr(row, prefix + "ek_id"),
        public=bytes(getattr(row, prefix + "public")),
        certificate=None if certificate is None else bytes(certificate),
        enrolled_at=getattr(row, prefix + "enrolled_at"),
        revoked=bool(getattr(row, prefix + "revoked")),
        revoked_reason=getattr(row, prefix + "revoked_reason"),
    )


def ak(row: Row[Any]) -> AkRecord:
    return AkRecord(
        ak_name=row.ak_name,
        public=bytes(row.public),
        ek_id=row.ek_id,
        enrolled_by=row.enrolled_by,
        enrolled_at=row.enrolled_at,
        revoked=bool(row.revoked),
        revoked_reason=row.revoked_reason,
    )


def challenge(row: Row[Any]) -> CredentialChallenge:
    return CredentialChallenge(
        enrollment_id=row.enrollment_id,
        ak_name=row.ak_name,
        ak_public=bytes(row.ak_public),
        ek_id=row.ek_id,
        secret_digest=bytes(row.secret_digest),
        expires_at=row.expires_at,
        ek_public=bytes(row.ek_public),
        ek_certificate=None if row.ek_certificate is None else bytes(row.ek_certificate),
        ek_basis=row.ek_basis,
        requester=row.requester,
    )


def encode_accepted(accepted: Mapping[PcrKey, frozenset[bytes]]) -> str:
    entries = [
        {"index": key.index, "bank": key.bank, "values": sorted(v.hex() for v in values)}
        for key, values in accepted.items()
    ]
    entries.sort(key=lambda e: (e["index"], e["bank"]))
    return dumps(entries)


def golden(row: Row[Any]) -> GoldenPcrSet:
    accepted = {
        PcrKey(index=int(e["index"]), bank=str(e["bank"])): frozenset(
            bytes.fromhex(v) for v in e["values"]
        )
        for e in json.loads(row.accepted)
    }
    return GoldenPcrSet(name=row.name, accepted=accepted, updated_at=row.updated_at)


def party(row: Row[Any]) -> Party:
    return Party(name=row.name, kem=int(row.kem), public_key=bytes(row.public_key))


def party_kek(row: Row[Any]) -> PartyKek:
    return PartyKek(
        party=row.party,
        kek_ref=row.kek_ref,
        checked_key=row.checked_key,
        updated_at=row.updated_at,
    )


def data_key(row: Row[Any]) -> DataKeyRecord:
    return DataKeyRecord(
        key_id=row.key_id,
        owner=row.owner,
        wrapped_key=bytes(row.wrapped_key),
        kek_ref=row.kek_ref,
        created_at=row.created_at,
        description=row.description,
    )


def approval_problem(
    approval: Approval, known_parties: set[str], owners: Mapping[str, str], golden_exists: bool
) -> BrokerError | None:
    if approval.party not in known_parties:
        return UnknownPolicyObjectError(f"party {approval.party!r} does not exist")
    for key_id in approval.key_ids:
        owner = owners.get(key_id)
        if owner is None:
            return UnknownPolicyObjectError(f"data key {key_id!r} does not exist")
        if owner != approval.party:
            return PolicyError(f"data key {key_id!r} belongs to another party")
    for recipient in approval.output_recipients:
        if recipient not in known_parties:
            return UnknownPolicyObjectError(f"output recipient {recipient!r} does not exist")
    if not golden_exists:
        return UnknownPolicyObjectError(f"golden set {approval.golden_set!r} does not exist")
    return None


def approval_values(approval: Approval, sha256: bytes) -> dict[str, Any]:
    manifest = [
        {
            "path": e.path,
            "size": e.size,
            "digests": {bank: d.hex() for bank, d in e.digests.items()},
        }
        for e in approval.manifest
    ]
    return {
        "approval_id": approval.approval_id,
        "party": approval.party,
        "workload_name": approval.workload_name,
        "manifest": dumps(manifest),
        "expected_pcrs": dumps({b: v.hex() for b, v in approval.expected_pcrs.items()}),
        "expected_pcr_sha256": sha256,
        "key_ids": dumps(list(approval.key_ids)),
        "output_recipients": dumps(list(approval.output_recipients)),
        "golden_set": approval.golden_set,
        "created_at": approval.created_at,
        "revoked": approval.revoked,
        "require_snp": approval.require_snp,
        "launch": None if approval.launch is None else dumps(launch_doc(approval.launch)),
        "files_pcr_sha256": files_pcr_sha256(approval.manifest),
    }


def files_pcr_sha256(manifest: Sequence[ManifestEntry]) -> bytes | None:
    # An empty manifest is indexed by the reset value (its files' PCR is all zeros).
    return files_pcr23(manifest, APPROVAL_INDEX_BANK)


def launch_doc(launch: Launch) -> dict[str, Any]:
    return {
        "argv": list(launch.argv),
        "executable": launch.executable,
        "executable_sha256": launch.executable_sha256.hex(),
        "env": [list(item) for item in launch.env],
        "cwd": launch.cwd,
    }


def launch_from_doc(text: str | None) -> Launch | None:
    if text is None:
        return None
    doc = json.loads(text)
    return Launch(
        argv=tuple(doc["argv"]),
        executable=str(doc["executable"]),
        executable_sha256=bytes.fromhex(doc["executable_sha256"]),
        env=tuple((str(n), str(v)) for n, v in doc["env"]),
        cwd=str(doc["cwd"]),
    )


def approval(row: Row[Any]) -> Approval:
    manifest = tuple(
        ManifestEntry(
            path=str(e["path"]),
            size=int(e["size"]),
            digests={str(b): bytes.fromhex(d) for b, d in e["digests"].items()},
        )
        for e in json.loads(row.manifest)
    )
    return Approval(
        approval_id=row.approval_id,
        party=row.party,
        workload_name=row.workload_name,
        manifest=manifest,
        expected_pcrs={str(b): bytes.fromhex(v) for b, v in json.loads(row.expected_pcrs).items()},
        key_ids=tuple(json.loads(row.key_ids)),
        output_recipients=tuple(json.loads(row.output_recipients)),
        golden_set=row.golden_set,
        created_at=row.created_at,
        revoked=bool(row.revoked),
        require_snp=bool(row.require_snp),
        launch=launch_from_doc(row.launch),
    )


def session(row: Row[Any]) -> Session:
    return Session(
        session_id=row.session_id,
        ak_name=row.ak_name,
        peer=row.peer,
        started_at=row.started_at,
        expires_at=row.expires_at,
        released_key_ids=tuple(json.loads(row.released_key_ids)),
        ended_at=row.ended_at,
        exit_code=row.exit_code,
    )


def audit_record_values(r: AuditRecord) -> dict[str, Any]:
    """The ``audit_records`` row of a sealed record: its pending row, numbered and chained."""
    return {
        "sequence": r.sequence,
        **audit_pending_values(r),
        "previous_hash": r.previous_hash,
        "record_hash": r.record_hash,
    }


def audit_record(row: Row[Any]) -> AuditRecord:
    return AuditRecord(
        sequence=int(row.sequence),
        time=row.recorded_at,
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        decision=row.decision,
        reason=row.reason,
        evidence_digest=row.evidence_digest,
        parties=tuple(json.loads(row.parties)),
        previous_hash=row.previous_hash,
        record_hash=row.record_hash,
    )


def audit_pending_values(r: AuditRecord) -> dict[str, Any]:
    """The ``audit_pending`` row of an unsealed record (its number comes from the sequence)."""
    return {
        "recorded_at": r.time,
        "actor": r.actor,
        "action": r.action,
        "subject": r.subject,
        "decision": r.decision,
        "reason": r.reason,
        "evidence_digest": r.evidence_digest,
        "parties": _COMPACT_JSON.encode(list(r.parties)),
    }
