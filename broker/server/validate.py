"""Checks every field of every request before the core sees it.

Each ``check_*`` function takes a request message and raises :class:`InvalidRequestError`
naming the first offending field (``quote.pcr_values[2].value``) with what is wrong: a required
field missing, a bytes field of the wrong length, a string that is too long or has characters
that do not belong in it, an enum value that is unknown or unspecified, a repeated field with
too many or duplicate entries. A malformed TPM structure (``quote.attest``,
``quote.signature``) is refused here too, before a nonce is spent on it.

The limits are generous for well-formed input and small enough that a request cannot make the
broker do unbounded work.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from broker.server.errors import InvalidRequestError
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from evidence.errors import LaunchError
from evidence.pcr import BANK_SIZES, WORKLOAD_PCR
from evidence.proto import bank_from_pb, launch_from_pb
from pki.errors import IdentityError
from pki.identity import validate_name
from sealing.errors import SealingError
from sealing.keys import RecipientPublicKey

# --- limits ---------------------------------------------------------------------------------

#: A marshalled TPM2B_PUBLIC is a few hundred bytes; a PEM RSA-4096 public key about 800.
MAX_PUBLIC_KEY_BYTES: Final = 4096
#: An EK certificate (DER or PEM) from a TPM vendor is 1-2 KiB.
MAX_CERTIFICATE_BYTES: Final = 16384
#: ActivateCredential returns the secret the broker chose (32 bytes); TPM2B_DIGEST caps it at 64.
MAX_CREDENTIAL_SECRET_BYTES: Final = 64
NONCE_BYTES: Final = 32
#: A TPMS_ATTEST for a quote is about 150 bytes; a TPMT_SIGNATURE at most about 520 (RSA-4096).
MAX_ATTEST_BYTES: Final = 4096
#: An Azure vTPM's HCL report NV index holds a few KiB (2600 bytes on today's VMs).
MAX_HCL_REPORT_BYTES: Final = 16384
MAX_SIGNATURE_BYTES: Final = 2048
MAX_PCR_INDEX: Final = 23
MAX_PCR_VALUES: Final = (MAX_PCR_INDEX + 1) * len(BANK_SIZES)
MAX_KEY_IDS: Final = 256
MAX_KEY_ID_LENGTH: Final = 128
#: A data key sealed with HPKE: the encapsulated key (32 or 1,120 + 32 bytes) and 48 bytes.
MAX_SEALED_DATA_KEY_BYTES: Final = 4096
MAX_TEXT_LENGTH: Final = 1024
MAX_PATH_LENGTH: Final = 4096
MAX_NAME_LENGTH: Final = 128
MAX_OUTPUTS: Final = 1024
MAX_MANIFEST_ENTRIES: Final = 4096
MAX_RECIPIENTS: Final = 64
MAX_AUDIT_PAGE: Final = 1000
#: Audit sequence numbers are SQL BIGINTs (signed 64-bit) in SQLite and PostgreSQL alike; a
#: uint64 above this cannot be compared with them (the driver refuses to bind it).
MAX_AUDIT_SEQUENCE: Final = 2**63 - 1
#: TPM names are nameAlg (2 bytes) and a digest of at most 64 bytes, in hex.
MAX_AK_NAME_LENGTH: Final = 2 * (2 + 64)
#: A Key Vault key id is a vault host, a name of at most 127 and a version of 32 characters.
MAX_KEK_REF_LENGTH: Final = 1024
#: KEK ref forms (``broker.custody.LOCAL_KEK_REF``, ``broker.kek_azure.KEYVAULT_REF_PREFIX``).
LOCAL_KEK_REF: Final = "local"
KEYVAULT_REF_PREFIX: Final = "azurekv:"

_HEX_RE: Final = re.compile(r"[0-9a-f]+")
_KEY_ID_RE: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_OPAQUE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def _fail(field: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(field, problem)


# --- scalar helpers -------------------------------------------------------------------------


def require_message(msg: Message, field: str, where: str = "") -> None:
    """Raises: InvalidRequestError: the sub-message ``field`` is not set."""
    if not msg.HasField(field):
        raise _fail(_join(where, field), "is required")


def _join(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field


def check_bytes(value: bytes, field: str, *, min_len: int = 1, max_len: int) -> None:
    """Raises: InvalidRequestError: ``value`` is shorter than ``min_len`` or longer than
    ``max_len`` bytes (an empty required field is reported as missing)."""
    if len(value) < min_len:
        raise _fail(field, "is required" if not value else f"must be at least {min_len} bytes")
    if len(value) > max_len:
        raise _fail(field, f"must be at most {max_len} bytes, got {len(value)}")


def check_exact_bytes(value: bytes, field: str, size: int) -> None:
    """Raises: InvalidRequestError: ``value`` is not exactly ``size`` bytes."""
    if len(value) != size:
        raise _fail(field, f"must be {size} bytes, got {len(value)}")


def check_text(value: str, field: str, *, max_len: int = MAX_TEXT_LENGTH, required: bool) -> None:
    """Free text (descriptions, reasons, workload names): no control characters.

    Raises:
        InvalidRequestError: missing when required, too long, or a control character.
    """
    if not value:
        if required:
            raise _fail(field, "is required")
        return
    if len(value) > max_len:
        raise _fail(field, f"must be at most {max_len} characters")
    if _CONTROL_RE.search(value):
        raise _fail(field, "must not contain control characters")


def check_hex(value: str, field: str, *, max_len: int, exact: int | None = None) -> None:
    """Raises: InvalidRequestError: missing, not lowercase hex, or of the wrong length."""
    if not value:
        raise _fail(field, "is required")
    if exact is not None and len(value) != exact:
        raise _fail(field, f"must be {exact} hex digits")
    if len(value) > max_len or len(value) % 2:
        raise _fail(field, f"must be an even number of hex digits, at most {max_len}")
    if not _HEX_RE.fullmatch(value):
        raise _fail(field, "must be lowercase hex")


def check_ak_name(value: str, field: str = "ak_name") -> None:
    """Raises: InvalidRequestError: not a TPM name (or key id) in lowercase hex."""
    check_hex(value, field, max_len=MAX_AK_NAME_LENGTH)


def check_ek_id(value: str, field: str = "ek_id") -> None:
    """Raises: InvalidRequestError: not a SHA-256 in lowercase hex."""
    check_hex(value, field, max_len=64, exact=64)


def check_opaque_id(value: str, field: str) -> None:
    """Ids the broker hands out (enrollment, approval, session): short tokens.

    Raises:
        InvalidRequestError: missing, too long, or characters outside ``[A-Za-z0-9_-]``.
    """
    if not value:
        raise _fail(field, "is required")
    if not _OPAQUE_ID_RE.fullmatch(value):
        raise _fail(field, "must be 1-64 letters, digits, '_' or '-'")


def check_key_id(value: str, field: str) -> None:
    """A data key id: 1-128 printable ASCII characters without spaces.

    Raises:
        InvalidRequestError: missing, too long or a character outside printable ASCII.
    """
    if not value:
        raise _fail(field, "is required")
    if len(value) > MAX_KEY_ID_LENGTH:
        raise _fail(field, f"must be at most {MAX_KEY_ID_LENGTH} characters")
    if not _KEY_ID_RE.fullmatch(value):
        raise _fail(field, "must be printable ASCII without spaces")


def check_key_ids(values: Sequence[str], field: str, *, required: bool) -> None:
    """Raises: InvalidRequestError: empty when required, too many, a bad or duplicate id."""
    if required and not values:
        raise _fail(field, "needs at least one key id")
    if len(values) > MAX_KEY_IDS:
        raise _fail(field, f"must list at most {MAX_KEY_IDS} key ids")
    seen: set[str] = set()
    for n, value in enumerate(values):
        check_key_id(value, f"{field}[{n}]")
        if value in seen:
            raise _fail(f"{field}[{n}]", f"lists key id {value!r} twice")
        seen.add(value)


def check_party_name(value: str, field: str) -> None:
    """Raises: InvalidRequestError: not a valid party name (as in its SPIFFE ID)."""
    if not value:
        raise _fail(field, "is required")
    try:
        validate_name("party", value)
    except IdentityError as e:
        raise _fail(field, str(e)) from e


def check_object_name(value: str, field: str) -> None:
    """Names of golden sets: 1-128 letters, digits, ``.``, ``_`` or ``-``.

    Raises:
        InvalidRequestError: missing, too long or a character outside the set.
    """
    if not value:
        raise _fail(field, "is required")
    if len(value) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(value):
        raise _fail(field, f"must be 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'")


def check_enum(value: int, enum: EnumDescriptor, field: str) -> None:
    """Raises: InvalidRequestError: the value is unspecified (0) or not a value of ``enum``."""
    if value == 0:
        raise _fail(field, f"is required ({enum.values_by_number[0].name} is not a value)")
    if value not in enum.values_by_number:
        raise _fail(field, f"unknown {enum.name} value {value}")


def check_bank(value: int, field: str) -> str:
    """Raises: InvalidRequestError: not a supported PCR bank."""
    check_enum(value, common_pb2.HashAlgorithm.DESCRIPTOR, field)
    try:
        return bank_from_pb(value)
    except Exception as e:  # EventLogError: a known enum value without a bank of ours
        raise _fail(field, f"unsupported hash algorithm {value}") from e


def check_recipient_key(msg: common_pb2.RecipientKey, field: str) -> RecipientPublicKey:
    """Raises: InvalidRequestError: unknown KEM, or a public key of the wrong size or invalid."""
    check_enum(msg.kem, common_pb2.KemAlgorithm.DESCRIPTOR, f"{field}.kem")
    if not msg.public_key:
        raise _fail(f"{field}.public_key", "is required")
    try:
        return RecipientPublicKey(kem=msg.kem, raw=bytes(msg.public_key))
    except SealingError as e:
        raise _fail(f"{field}.public_key", str(e)) from e


def check_pcr_values(
    values: Iterable[common_pb2.PcrValue], field: str, *, required: bool, max_count: int
) -> None:
    """Raises: InvalidRequestError: empty when required, too many, an index outside 0..23, an
    unknown bank, a value of the wrong size for its bank, or a duplicate (index, bank)."""
    items = list(values)
    if required and not items:
        raise _fail(field, "needs at least one PCR value")
    if len(items) > max_count:
        raise _fail(field, f"must list at most {max_count} PCR values")
    for n, v in enumerate(items):
        where = f"{field}[{n}]"
        if v.index > MAX_PCR_INDEX:
            raise _fail(f"{where}.index", f"must be 0..{MAX_PCR_INDEX}")
        bank = check_bank(v.bank, f"{where}.bank")
        check_exact_bytes(v.value, f"{where}.value", BANK_SIZES[bank])


def _check_digests(digests: Sequence[common_pb2.Digest], field: str) -> None:
    if not digests:
        raise _fail(field, "needs at least one digest")
    seen: set[str] = set()
    for n, d in enumerate(digests):
        bank = check_bank(d.algorithm, f"{field}[{n}].algorithm")
        check_exact_bytes(d.value, f"{field}[{n}].value", BANK_SIZES[bank])
        if bank in seen:
            raise _fail(f"{field}[{n}]", f"has two {bank} digests")
        seen.add(bank)


def check_path(value: str, field: str) -> None:
    """Raises: InvalidRequestError: a path that is empty, too long or has control characters."""
    check_text(value, field, max_len=MAX_PATH_LENGTH, required=True)


# --- TPM structures -------------------------------------------------------------------------


@functools.cache
def _tpm_type(kind: str) -> Any:
    # Imported on first use (tpm2-pytss loads libtss2), then looked up once per kind.
    from tpm2_pytss import types as tpm_types

    return getattr(tpm_types, kind)


def check_tpm_structure(data: bytes, field: str, kind: str) -> None:
    """Checks that ``data`` unmarshals as the TPM structure ``kind`` with no trailing bytes.

    ``kind`` is ``"TPMS_ATTEST"`` or ``"TPMT_SIGNATURE"``; tpm2-pytss does the parsing.

    Raises:
        InvalidRequestError: the bytes do not parse, or bytes follow the structure.
    """
    cls = _tpm_type(kind)
    try:
        _, consumed = cls.unmarshal(bytes(data))
    except Exception as e:  # TSS2_Exception and friends: the structure is malformed
        raise _fail(field, f"is not a valid {kind}") from e
    if consumed != len(data):
        raise _fail(field, f"has {len(data) - consumed} bytes after the {kind}")


# --- attestation service --------------------------------------------------------------------


def check_start_enrollment(req: attestation_pb2.StartEnrollmentRequest) -> None:
    """Raises: InvalidRequestError."""
    check_bytes(req.ek_public, "ek_public", max_len=MAX_PUBLIC_KEY_BYTES)
    check_bytes(req.ek_certificate, "ek_certificate", min_len=0, max_len=MAX_CERTIFICATE_BYTES)
    check_bytes(req.ak_public, "ak_public", max_len=MAX_PUBLIC_KEY_BYTES)
    _check_snp_evidence(req)


def _check_snp_evidence(
    req: attestation_pb2.StartEnrollmentRequest | attestation_pb2.AttestRequest,
) -> None:
    if req.HasField("snp_evidence"):
        snp = req.snp_evidence
        check_bytes(snp.hcl_report, "snp_evidence.hcl_report", max_len=MAX_HCL_REPORT_BYTES)
        check_bytes(snp.vcek, "snp_evidence.vcek", max_len=MAX_CERTIFICATE_BYTES)


def check_complete_enrollment(req: attestation_pb2.CompleteEnrollmentRequest) -> None:
    """Raises: InvalidRequestError."""
    check_opaque_id(req.enrollment_id, "enrollment_id")
    check_bytes(req.secret, "secret", max_len=MAX_CREDENTIAL_SECRET_BYTES)


def check_get_challenge(req: attestation_pb2.GetChallengeRequest) -> None:
    """Raises: InvalidRequestError."""
    check_ak_name(req.ak_name)


def check_attest(
    req: attestation_pb2.AttestRequest, *, max_event_log_entries: int
) -> RecipientPublicKey:
    """Returns the validated ephemeral key (so the caller does not parse it again).

    Raises:
        InvalidRequestError: naming the first offending field.
    """
    check_ak_name(req.ak_name)
    check_exact_bytes(req.nonce, "nonce", NONCE_BYTES)
    require_message(req, "quote")
    check_bytes(req.quote.attest, "quote.attest", max_len=MAX_ATTEST_BYTES)
    check_tpm_structure(req.quote.attest, "quote.attest", "TPMS_ATTEST")
    check_bytes(req.quote.signature, "quote.signature", max_len=MAX_SIGNATURE_BYTES)
    check_tpm_structure(req.quote.signature, "quote.signature", "TPMT_SIGNATURE")
    check_pcr_values(
        req.quote.pcr_values, "quote.pcr_values", required=True, max_count=MAX_PCR_VALUES
    )
    seen: set[tuple[int, int]] = set()
    for n, v in enumerate(req.quote.pcr_values):
        if (v.index, v.bank) in seen:
            raise _fail(f"quote.pcr_values[{n}]", "repeats a PCR and bank")
        seen.add((v.index, v.bank))
    require_message(req, "event_log")
    events = req.event_log.events
    if len(events) > max_event_log_entries:
        raise _fail("event_log.events", f"must hold at most {max_event_log_entries} events")
    for n, e in enumerate(events):
        where = f"event_log.events[{n}]"
        if e.pcr_index > MAX_PCR_INDEX:
            raise _fail(f"{where}.pcr_index", f"must be 0..{MAX_PCR_INDEX}")
        check_path(e.path, f"{where}.path")
        _check_digests(e.digests, f"{where}.digests")
        if e.HasField("launch"):
            check_launch(e.launch, f"{where}.launch")
    require_message(req, "ephemeral_key")
    ephemeral = check_recipient_key(req.ephemeral_key, "ephemeral_key")
    check_key_ids(req.key_ids, "key_ids", required=False)
    _check_snp_evidence(req)
    return ephemeral


def check_end_session(req: attestation_pb2.EndSessionRequest) -> None:
    """Raises: InvalidRequestError."""
    check_opaque_id(req.session_id, "session_id")
    if len(req.outputs) > MAX_OUTPUTS:
        raise _fail("outputs", f"must list at most {MAX_OUTPUTS} outputs")
    for n, name in enumerate(req.outputs):
        check_path(name, f"outputs[{n}]")


# --- admin service --------------------------------------------------------------------------


def check_enroll_ek(req: admin_pb2.EnrollEkRequest) -> None:
    """Raises: InvalidRequestError."""
    check_bytes(req.ek_public, "ek_public", max_len=MAX_PUBLIC_KEY_BYTES)
    check_bytes(req.ek_certificate, "ek_certificate", min_len=0, max_len=MAX_CERTIFICATE_BYTES)


def check_revoke_ek(req: admin_pb2.RevokeEkRequest) -> None:
    """Raises: InvalidRequestError."""
    check_ek_id(req.ek_id)
    check_text(req.reason, "reason", required=False)


def check_readmit_ek(req: admin_pb2.ReadmitEkRequest) -> None:
    """Raises: InvalidRequestError."""
    check_ek_id(req.ek_id)
    check_text(req.reason, "reason", required=False)


def check_enroll_ak(req: admin_pb2.EnrollAkRequest) -> None:
    """Raises: InvalidRequestError."""
    check_bytes(req.ak_public, "ak_public", max_len=MAX_PUBLIC_KEY_BYTES)
    if req.ek_id:
        check_ek_id(req.ek_id)


def check_revoke_ak(req: admin_pb2.RevokeAkRequest) -> None:
    """Raises: InvalidRequestError."""
    check_ak_name(req.ak_name)
    check_text(req.reason, "reason", required=False)


def check_set_golden_set(req: admin_pb2.SetGoldenPcrSetRequest) -> None:
    """Raises: InvalidRequestError."""
    require_message(req, "golden_set")
    g = req.golden_set
    check_object_name(g.name, "golden_set.name")
    check_pcr_values(
        g.accepted_values, "golden_set.accepted_values", required=True, max_count=4 * MAX_PCR_VALUES
    )


def check_delete_golden_set(req: admin_pb2.DeleteGoldenPcrSetRequest) -> None:
    """Raises: InvalidRequestError."""
    check_object_name(req.name, "name")


def check_add_party(req: admin_pb2.AddPartyRequest) -> None:
    """Raises: InvalidRequestError."""
    require_message(req, "party")
    check_party_name(req.party.name, "party.name")
    require_message(req.party, "recipient_key", "party")
    check_recipient_key(req.party.recipient_key, "party.recipient_key")


def check_register_data_key(req: admin_pb2.RegisterDataKeyRequest) -> None:
    """Raises: InvalidRequestError."""
    check_key_id(req.key_id, "key_id")
    check_bytes(req.sealed_data_key, "sealed_data_key", max_len=MAX_SEALED_DATA_KEY_BYTES)
    check_text(req.description, "description", required=False)


#: Why an approval without a launch is refused, and how to approve one.
LAUNCH_REQUIRED = (
    "is required: an approval covers the launch too; approve it with "
    '\'cleanroom admin workload approve ... --command "/absolute/program ARGS" '
    "[--env NAME=VALUE ...]' (docs/policy.md)"
)


def check_launch(msg: common_pb2.Launch, field: str) -> None:
    """Raises: InvalidRequestError: the launch is malformed (argv[0] not absolute, an
    environment unsorted or repeating a name, a digest that is not 32 bytes, too large)."""
    try:
        launch_from_pb(msg)
    except LaunchError as e:
        raise _fail(field, f"is malformed: {e}") from e


def check_approve_workload(req: admin_pb2.ApproveWorkloadRequest) -> None:
    """Raises: InvalidRequestError."""
    require_message(req, "manifest")
    m = req.manifest
    check_text(m.name, "manifest.name", max_len=256, required=True)
    if not m.entries:
        raise _fail("manifest.entries", "needs at least one file")
    if len(m.entries) > MAX_MANIFEST_ENTRIES:
        raise _fail("manifest.entries", f"must list at most {MAX_MANIFEST_ENTRIES} files")
    for n, e in enumerate(m.entries):
        check_path(e.path, f"manifest.entries[{n}].path")
        _check_digests(e.digests, f"manifest.entries[{n}].digests")
        banks = {bank_from_pb(d.algorithm) for d in e.digests}
        if "sha256" not in banks:
            raise _fail(f"manifest.entries[{n}].digests", "needs a sha256 digest")
    if not m.HasField("launch"):
        raise _fail("manifest.launch", LAUNCH_REQUIRED)
    check_launch(m.launch, "manifest.launch")
    check_key_ids(req.key_ids, "key_ids", required=True)
    if len(req.output_recipients) > MAX_RECIPIENTS:
        raise _fail("output_recipients", f"must list at most {MAX_RECIPIENTS} parties")
    seen: set[str] = set()
    for n, name in enumerate(req.output_recipients):
        check_party_name(name, f"output_recipients[{n}]")
        if name in seen:
            raise _fail(f"output_recipients[{n}]", f"lists party {name!r} twice")
        seen.add(name)
    if req.golden_set:
        check_object_name(req.golden_set, "golden_set")


def check_revoke_approval(req: admin_pb2.RevokeApprovalRequest) -> None:
    """Raises: InvalidRequestError."""
    check_opaque_id(req.approval_id, "approval_id")


def check_kek_ref(value: str, field: str) -> None:
    """A KEK ref: ``local`` or ``azurekv:https://<vault>/keys/<name>[/<version>]``.

    Whether the broker can use it is for the broker to find out; this checks its form only.

    Raises:
        InvalidRequestError: missing, too long, or neither form.
    """
    if not value:
        raise _fail(field, "is required")
    if len(value) > MAX_KEK_REF_LENGTH:
        raise _fail(field, f"must be at most {MAX_KEK_REF_LENGTH} characters")
    if value == LOCAL_KEK_REF:
        return
    if not value.startswith(KEYVAULT_REF_PREFIX):
        raise _fail(
            field, f"must be {LOCAL_KEK_REF!r} or {KEYVAULT_REF_PREFIX}https://<vault>/keys/<name>"
        )
    from broker.errors import KekError
    from broker.kek_azure import parse_ref

    try:
        parse_ref(value)
    except KekError as e:
        raise _fail(field, str(e)) from e


def check_set_party_kek(req: admin_pb2.SetPartyKekRequest) -> None:
    """Raises: InvalidRequestError."""
    check_party_name(req.party, "party")
    check_kek_ref(req.kek_ref, "kek_ref")


def check_rewrap_data_key(req: admin_pb2.RewrapDataKeyRequest) -> None:
    """Raises: InvalidRequestError."""
    check_key_id(req.key_id, "key_id")
    check_kek_ref(req.new_kek_ref, "new_kek_ref")


def check_check_kek(req: admin_pb2.CheckKekRequest) -> None:
    """Raises: InvalidRequestError."""
    check_kek_ref(req.kek_ref, "kek_ref")


def check_list_audit_records(req: admin_pb2.ListAuditRecordsRequest) -> None:
    """Raises: InvalidRequestError."""
    if req.after_sequence > MAX_AUDIT_SEQUENCE:
        raise _fail("after_sequence", f"must be at most {MAX_AUDIT_SEQUENCE}")
    if req.limit > MAX_AUDIT_PAGE:
        raise _fail("limit", f"must be at most {MAX_AUDIT_PAGE} (0 for the default)")


__all__ = [
    "MAX_AUDIT_PAGE",
    "MAX_AUDIT_SEQUENCE",
    "NONCE_BYTES",
    "WORKLOAD_PCR",
    "check_add_party",
    "check_ak_name",
    "check_approve_workload",
    "check_attest",
    "check_bytes",
    "check_check_kek",
    "check_complete_enrollment",
    "check_delete_golden_set",
    "check_end_session",
    "check_enroll_ak",
    "check_enroll_ek",
    "check_enum",
    "check_get_challenge",
    "check_kek_ref",
    "check_key_ids",
    "check_list_audit_records",
    "check_readmit_ek",
    "check_register_data_key",
    "check_revoke_ak",
    "check_revoke_approval",
    "check_revoke_ek",
    "check_rewrap_data_key",
    "check_set_golden_set",
    "check_set_party_kek",
    "check_start_enrollment",
    "check_tpm_structure",
]
