"""The broker's domain objects: immutable values that storage keeps and policy reasons about.

Digests and PCR values are raw bytes here; banks are the names in ``evidence.pcr.BANK_SIZES``
("sha1", "sha256", ...). Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from evidence.launch import Launch
from evidence.manifest import ManifestEntry

#: The PCR bank whose PCR 23 value indexes approvals: an approval must carry it, and an
#: attestation finds the approvals of its quoted value in that bank.
APPROVAL_INDEX_BANK: Final = "sha256"


@dataclass(frozen=True)
class EkRecord:
    """An enrolled endorsement key."""

    #: The canonical identity (broker.tpmkeys.ek_identity): hex SHA-256 of the DER
    #: SubjectPublicKeyInfo, the same for every encoding of the key.
    ek_id: str
    public: bytes  # marshalled TPM2B_PUBLIC, as first enrolled
    certificate: bytes | None  # DER, when the TPM had one
    enrolled_at: datetime
    #: Revoked by the operator (``ek revoke``) or kept out after one of its AKs was revoked
    #: (``ak revoke``); either way until the operator re-admits it (``ek readmit``).
    revoked: bool = False
    revoked_reason: str = ""


@dataclass(frozen=True)
class AkRecord:
    """An enrolled attestation key."""

    ak_name: str  # hex TPM name (nameAlg || digest of TPMT_PUBLIC)
    public: bytes  # marshalled TPM2B_PUBLIC
    ek_id: str | None  # None for an AK the operator enrolled directly without an EK
    enrolled_by: str  # "credential-activation" or "operator"
    enrolled_at: datetime
    revoked: bool = False
    revoked_reason: str = ""


@dataclass(frozen=True)
class CredentialChallenge:
    """An outstanding MakeCredential challenge: one per AK, with an expiry.

    The EK is not enrolled when the challenge is issued: its public area and certificate wait
    here until the TPM proves it holds the EK (the activation), and only the identity that asked
    for the challenge may answer it.
    """

    enrollment_id: str
    ak_name: str
    ak_public: bytes
    ek_id: str  # canonical EK identity
    secret_digest: bytes  # SHA-256 of the secret; the secret itself is not stored
    expires_at: datetime
    ek_public: bytes = b""  # marshalled TPM2B_PUBLIC, as the sidecar sent it
    ek_certificate: bytes | None = None
    #: What vouched for an EK that is not enrolled yet (its certificate, an SEV-SNP report, the
    #: configuration), for the record of its enrollment; empty when the EK is enrolled already.
    ek_basis: str = ""
    requester: str = ""  # SPIFFE ID that started the enrollment


@dataclass(frozen=True)
class PcrKey:
    """One PCR in one bank."""

    index: int
    bank: str


@dataclass(frozen=True)
class GoldenPcrSet:
    """Accepted values per PCR and bank. Several values for one PCR allow rolling updates."""

    name: str
    accepted: Mapping[PcrKey, frozenset[bytes]]
    updated_at: datetime


@dataclass(frozen=True)
class Party:
    """A data owner and the HPKE key its outputs are sealed to."""

    name: str
    kem: int  # cleanroom.v1.KemAlgorithm number
    public_key: bytes


@dataclass(frozen=True)
class DataKeyRecord:
    """A party's data key, stored wrapped by a KEK. The plain key never is."""

    key_id: str
    owner: str
    wrapped_key: bytes
    kek_ref: str  # "local" or a Key Vault key id
    created_at: datetime
    description: str = ""


@dataclass(frozen=True)
class Approval:
    """A party's approval of a measured workload for some of its keys.

    ``launch`` is the approved launch (command, executable and its digest, environment,
    working directory), measured after the files; ``expected_pcrs`` covers it. Approvals
    stored before launches were measured have none and never match (docs/policy.md).
    """

    approval_id: str
    party: str
    workload_name: str
    manifest: tuple[ManifestEntry, ...]
    expected_pcrs: Mapping[str, bytes]  # bank -> expected PCR 23 value
    key_ids: tuple[str, ...]
    output_recipients: tuple[str, ...]
    golden_set: str | None
    created_at: datetime
    revoked: bool = False
    #: The party demands verified AMD SEV-SNP evidence (an Azure confidential VM's HCL report
    #: binding the AK) before its keys are released under this approval.
    require_snp: bool = False
    launch: Launch | None = None


@dataclass(frozen=True)
class AuditEntry:
    """What a caller asks the audit log to record."""

    actor: str  # SPIFFE id of the caller, or "broker" for internal events
    action: str  # e.g. "ak.enroll", "attest", "key.release"
    subject: str
    decision: str  # "allow" or "deny"
    reason: str = ""
    evidence_digest: str = ""
    parties: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class AuditRecord:
    """An audit log record as stored, with its place in the hash chain."""

    sequence: int
    time: datetime
    actor: str
    action: str
    subject: str
    decision: str
    reason: str
    evidence_digest: str
    parties: tuple[str, ...]
    previous_hash: str
    record_hash: str


@dataclass(frozen=True)
class Session:
    """An attested sidecar session: keys were released under it until it ends or expires."""

    session_id: str
    ak_name: str
    peer: str
    started_at: datetime
    expires_at: datetime
    released_key_ids: tuple[str, ...]
    ended_at: datetime | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class PartyKek:
    """The KEK an operator imported for a party (see :meth:`Store.set_party_kek`)."""

    party: str
    kek_ref: str
    #: What the broker's check of the KEK found: the versioned Key Vault key id, or the ref.
    checked_key: str
    updated_at: datetime


class DenialCode(enum.Enum):
    """The coarse class of a refusal, which the refused sidecar may learn (the exact reason
    stays in the audit log). Each names what the sidecar's operator can act on, never another
    party's policy: which file, PCR or approval differed stays with the owner and the operator.
    """

    #: No active approval by the key's owner matches the measurement (or no such key).
    NOT_APPROVED = "not_approved"
    #: The measurement is approved, but the owner's golden set does not accept the machine.
    PLATFORM_NOT_ACCEPTED = "platform_not_accepted"
    #: The AK or its EK is revoked.
    ATTESTER_REVOKED = "attester_revoked"
    #: The AK or its EK is not enrolled.
    ATTESTER_UNKNOWN = "attester_unknown"
    #: The quote or the event log failed verification.
    EVIDENCE_INVALID = "evidence_invalid"
    #: The nonce is unknown, used, expired or another AK's.
    NONCE_INVALID = "nonce_invalid"
    #: A granted key's KEK refused to unwrap it, or it could not be sealed.
    KEY_CUSTODY = "key_custody"
    #: Every requested key was withheld, for different reasons.
    KEYS_WITHHELD = "keys_withheld"


@dataclass(frozen=True)
class WithheldKey:
    """A requested key that was not released: the exact reason (server-side only), its coarse
    code (which the sidecar learns) and the sequence of the audit record that holds the reason.
    """

    key_id: str
    reason: str
    code: DenialCode
    audit_record: int
