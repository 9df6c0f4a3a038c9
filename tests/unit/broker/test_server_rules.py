"""The broker server's pure parts: the authorization table, the status mapping, request
validation, the rate limiter, structured logs and metrics address parsing."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from broker import errors
from broker.errors import AttestationRefusedError
from broker.model import DenialCode
from broker.server import authz, validate
from broker.server.errors import (
    CallerDeniedError,
    CallerUnauthenticatedError,
    InvalidRequestError,
    RateLimitedError,
    ServerSetupError,
)
from broker.server.logs import configure_logging, new_request_id, request_id_var
from broker.server.metrics import format_address, parse_listen
from broker.server.ratelimit import TokenBucketLimiter
from broker.server.status import (
    ATTEST_METHOD,
    ATTESTATION_DENIED,
    KEK_UNAVAILABLE_MESSAGE,
    KEK_UNUSABLE_MESSAGE,
    attestation_reason_class,
    status_for,
)
from cleanroom.v1 import admin_pb2, attestation_pb2, common_pb2
from evidence.errors import BindingError
from pki.identity import SpiffeId

TD = "cleanroom.local"
OPERATOR = SpiffeId.operator(TD)
PARTY_A = SpiffeId.party(TD, "advertiser")
SIDECAR = SpiffeId.sidecar(TD, "sidecar-1")
ADMIN = f"/{authz.ADMIN_SERVICE}"
ATT = f"/{authz.ATTESTATION_SERVICE}"

# --- authorization --------------------------------------------------------------------------


def test_every_rpc_of_both_services_has_a_rule_and_no_rule_is_stale() -> None:
    methods = {
        f"/{svc.full_name}/{m.name}"
        for fd in (admin_pb2.DESCRIPTOR, attestation_pb2.DESCRIPTOR)
        for svc in fd.services_by_name.values()
        for m in svc.methods
    }
    assert set(authz.RULES) == methods


@pytest.mark.parametrize(
    ("caller", "method"),
    [
        (OPERATOR, f"{ADMIN}/EnrollAk"),
        (OPERATOR, f"{ADMIN}/ListAuditRecords"),
        (OPERATOR, f"{ADMIN}/VerifyAuditLog"),
        (PARTY_A, f"{ADMIN}/RegisterDataKey"),
        (PARTY_A, f"{ADMIN}/ListGoldenPcrSets"),
        (PARTY_A, f"{ADMIN}/GetBrokerInfo"),
        (SIDECAR, f"{ATT}/Attest"),
        (SIDECAR, f"{ATT}/GetChallenge"),
        (SIDECAR, "/grpc.health.v1.Health/Check"),
        (PARTY_A, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
    ],
)
def test_allowed(caller: SpiffeId, method: str) -> None:
    authz.authorize(method, caller, trust_domain=TD)


@pytest.mark.parametrize(
    ("caller", "method"),
    [
        (SIDECAR, f"{ADMIN}/EnrollAk"),
        (SIDECAR, f"{ADMIN}/ListParties"),
        (SIDECAR, f"{ADMIN}/GetBrokerInfo"),
        (PARTY_A, f"{ADMIN}/EnrollEk"),
        (PARTY_A, f"{ADMIN}/AddParty"),
        (PARTY_A, f"{ADMIN}/VerifyAuditLog"),
        (PARTY_A, f"{ATT}/GetChallenge"),
        (OPERATOR, f"{ATT}/Attest"),
        (OPERATOR, f"{ADMIN}/RegisterDataKey"),
        (OPERATOR, f"{ADMIN}/ApproveWorkload"),
        (SpiffeId.broker(TD), f"{ADMIN}/ListEks"),
        # The broker's own identity may call nothing (docs/protocol.md), health included.
        (SpiffeId.broker(TD), "/grpc.health.v1.Health/Check"),
        (SpiffeId.broker(TD), "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
        (OPERATOR, f"{ADMIN}/NoSuchMethod"),
    ],
)
def test_denied(caller: SpiffeId, method: str) -> None:
    with pytest.raises(CallerDeniedError) as e:
        authz.authorize(method, caller, trust_domain=TD)
    assert str(caller) in e.value.reason or "not open" in e.value.reason
    assert e.value.public_message.startswith("permission denied")


def test_foreign_trust_domain_is_denied_even_for_health() -> None:
    other = SpiffeId.operator("other.example")
    for method in (f"{ADMIN}/ListEks", "/grpc.health.v1.Health/Check"):
        with pytest.raises(CallerDeniedError, match="trust domain"):
            authz.authorize(method, other, trust_domain=TD)


# --- status mapping -------------------------------------------------------------------------


def _denied_from(cause: BaseException) -> AttestationRefusedError:
    try:
        raise AttestationRefusedError(f"exact: {cause}") from cause
    except AttestationRefusedError as e:
        return e


@pytest.mark.parametrize(
    ("exc", "method", "code"),
    [
        (InvalidRequestError("nonce", "must be 32 bytes"), ATTEST_METHOD, "INVALID_ARGUMENT"),
        (CallerUnauthenticatedError("x"), f"{ADMIN}/ListEks", "UNAUTHENTICATED"),
        (CallerDeniedError("x"), f"{ADMIN}/ListEks", "PERMISSION_DENIED"),
        (RateLimitedError("slow down"), f"{ATT}/GetChallenge", "RESOURCE_EXHAUSTED"),
        (errors.DuplicateError("exists"), f"{ADMIN}/AddParty", "ALREADY_EXISTS"),
        (errors.StorageError("db down"), f"{ADMIN}/ListEks", "UNAVAILABLE"),
        (errors.UnknownKeyError("no AK"), f"{ADMIN}/RevokeAk", "NOT_FOUND"),
        (errors.UnknownKeyError("no AK"), f"{ATT}/GetChallenge", "FAILED_PRECONDITION"),
        (errors.UnknownPolicyObjectError("no set"), f"{ADMIN}/DeleteGoldenPcrSet", "NOT_FOUND"),
        (errors.CredentialError("expired"), f"{ATT}/CompleteEnrollment", "FAILED_PRECONDITION"),
        (errors.NonceExpiredError("late"), f"{ATT}/GetChallenge", "FAILED_PRECONDITION"),
        (errors.KeyAttributeError("not restricted"), f"{ADMIN}/EnrollAk", "INVALID_ARGUMENT"),
        (errors.EkCertificateError("untrusted"), f"{ADMIN}/EnrollEk", "PERMISSION_DENIED"),
        (errors.PolicyError("bad set"), f"{ADMIN}/SetGoldenPcrSet", "INVALID_ARGUMENT"),
        (errors.NotApprovedError("B's key"), f"{ADMIN}/ApproveWorkload", "PERMISSION_DENIED"),
        (errors.CustodyError("no open"), f"{ADMIN}/RegisterDataKey", "INVALID_ARGUMENT"),
        (errors.KekError("forbidden: vault"), f"{ADMIN}/RegisterDataKey", "FAILED_PRECONDITION"),
        (errors.KekUnavailableError("throttled"), f"{ADMIN}/RegisterDataKey", "UNAVAILABLE"),
        (errors.KekUnavailableError("unreachable"), f"{ADMIN}/CheckKek", "UNAVAILABLE"),
        (BindingError("short nonce"), f"{ATT}/Attest", "INVALID_ARGUMENT"),
        (RuntimeError("bug"), f"{ADMIN}/ListEks", "INTERNAL"),
    ],
)
def test_status_codes(exc: BaseException, method: str, code: str) -> None:
    assert status_for(exc, full_method=method).code == getattr(grpc.StatusCode, code)


def test_unexpected_errors_get_a_generic_message_and_a_traceback_flag() -> None:
    s = status_for(RuntimeError("secret detail"), full_method=f"{ADMIN}/ListEks")
    assert s.unexpected and "secret" not in s.message
    s = status_for(errors.StorageError("password=hunter2"), full_method=f"{ADMIN}/ListEks")
    assert "hunter2" not in s.message


@pytest.mark.parametrize(
    "cause",
    [
        errors.NonceReplayError("used"),
        errors.NonceBindingError("other AK"),
        errors.SignatureError("bad signature"),
        errors.QualifyingDataError("wrong binding"),
        errors.GoldenValueError("PCR 0"),
        errors.NotApprovedError("not approved by b"),
    ],
)
def test_attest_refusals_are_opaque(cause: BaseException) -> None:
    s = status_for(_denied_from(cause), full_method=ATTEST_METHOD)
    assert (s.code, s.message) == (grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)


def test_attest_expired_nonce_and_unknown_ak_are_preconditions() -> None:
    s = status_for(_denied_from(errors.NonceExpiredError("late")), full_method=ATTEST_METHOD)
    assert s.code == grpc.StatusCode.FAILED_PRECONDITION
    s = status_for(_denied_from(errors.UnknownKeyError("AK x")), full_method=ATTEST_METHOD)
    assert s.code == grpc.StatusCode.FAILED_PRECONDITION
    s = status_for(AttestationRefusedError("no key released"), full_method=ATTEST_METHOD)
    assert (s.code, s.message) == (grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)


VAULT_KEY = "https://cleanroom-kv.vault.azure.net/keys/advertiser-kek"


@pytest.mark.parametrize(
    "exc",
    [
        errors.KekUnavailableError(
            f"throttled: Key Vault kept answering 429 to unwrap {VAULT_KEY}"
        ),
        errors.KekUnavailableError(f"unreachable: cannot reach Key Vault to wrap {VAULT_KEY}"),
        errors.KekUnavailableError(f"unavailable: Key Vault failed to wrap {VAULT_KEY} (503 x)"),
    ],
)
@pytest.mark.parametrize("method", [f"{ADMIN}/RegisterDataKey", ATTEST_METHOD])
def test_a_transient_kek_fault_is_unavailable_for_clients_with_a_generic_message(
    exc: errors.KekUnavailableError, method: str
) -> None:
    # At Attest the core turns the fault into a denial raised from it.
    raised = _denied_from(exc) if method == ATTEST_METHOD else exc
    s = status_for(raised, full_method=method)
    assert (s.code, s.message) == (grpc.StatusCode.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    assert "vault" not in s.message.lower() and not s.unexpected


@pytest.mark.parametrize(
    "exc",
    [
        errors.KekUnavailableError(
            f"throttled: Key Vault kept answering 429 to unwrap {VAULT_KEY}"
        ),
        errors.KekUnavailableError(
            f"unreachable (refused): the connection to x was refused; cannot wrap with {VAULT_KEY}"
        ),
        errors.KekUnavailableError(f"unavailable: Key Vault failed to wrap {VAULT_KEY} (503 x)"),
    ],
)
@pytest.mark.parametrize(
    "method", [f"{ADMIN}/SetPartyKek", f"{ADMIN}/RewrapDataKey", f"{ADMIN}/CheckKek"]
)
def test_a_transient_kek_fault_names_its_cause_to_the_operator(
    exc: errors.KekUnavailableError, method: str
) -> None:
    # These methods are the operator's alone (the authorization table): the cause class is
    # what the operator acts on.
    from broker.server import authz

    assert authz.RULES[method] == frozenset({"operator"})
    s = status_for(exc, full_method=method)
    assert s.code is grpc.StatusCode.UNAVAILABLE and not s.unexpected
    assert s.message == f"key custody is temporarily unavailable ({exc}); retry later"


@pytest.mark.parametrize(
    "reason",
    [
        f"forbidden: the broker's identity may not wrap with {VAULT_KEY} (ForbiddenByRbac)",
        f"key not found: {VAULT_KEY} (KeyNotFound)",
        f"key disabled: Key Vault refuses to wrap with {VAULT_KEY}",
        "no KEK is configured for ref 'hsm:1'",
    ],
)
def test_a_kek_that_refuses_for_good_is_a_precondition_that_names_no_vault(reason: str) -> None:
    s = status_for(errors.KekError(reason), full_method=f"{ADMIN}/RegisterDataKey")
    assert (s.code, s.message) == (grpc.StatusCode.FAILED_PRECONDITION, KEK_UNUSABLE_MESSAGE)
    assert "cleanroom admin kek check" in s.message
    assert "vault.azure.net" not in s.message and reason not in s.message
    # The operator's own KEK calls keep the reason.
    s = status_for(errors.KekError(reason), full_method=f"{ADMIN}/CheckKek")
    assert (s.code, s.message) == (grpc.StatusCode.FAILED_PRECONDITION, reason)
    # Attest keeps its one opaque denial: a key that does not unwrap is a refusal.
    s = status_for(_denied_from(errors.KekError(reason)), full_method=ATTEST_METHOD)
    assert (s.code, s.message) == (grpc.StatusCode.PERMISSION_DENIED, ATTESTATION_DENIED)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (AttestationRefusedError("no key released: k: not approved"), "not_approved"),
        (_denied_from(errors.NotApprovedError("x")), "not_approved"),
        (_denied_from(errors.NonceReplayError("x")), "nonce"),
        (_denied_from(errors.UnknownKeyError("x")), "ak"),
        (_denied_from(errors.SignatureError("x")), "evidence"),
        (_denied_from(BindingError("x")), "evidence"),
        (_denied_from(errors.GoldenValueError("x")), "golden"),
        (_denied_from(errors.PolicyError("x")), "policy"),
        (_denied_from(errors.KekError("forbidden: x")), "custody"),
        (_denied_from(errors.KekUnavailableError("throttled: x")), "custody"),
        (_denied_from(errors.CustodyError("cannot seal")), "custody"),
        (InvalidRequestError("nonce", "x"), "invalid_request"),
        (RuntimeError("x"), "error"),
        # The core's denials carry their code, which decides: a golden-set denial is "golden"
        # although no exception caused it (it was "not_approved" before codes).
        (AttestationRefusedError("x", code=DenialCode.PLATFORM_NOT_ACCEPTED), "golden"),
        (AttestationRefusedError("x", code=DenialCode.KEYS_WITHHELD), "keys_withheld"),
        (AttestationRefusedError("x", code=DenialCode.ATTESTER_REVOKED), "ak"),
        (AttestationRefusedError("x", code=DenialCode.EVIDENCE_INVALID), "evidence"),
    ],
)
def test_attestation_reason_classes(exc: BaseException, reason: str) -> None:
    assert attestation_reason_class(exc) == reason


# --- validation -----------------------------------------------------------------------------


def _field_of(call: object) -> str:
    with pytest.raises(InvalidRequestError) as e:
        call()  # type: ignore[operator]
    return e.value.field


def test_validation_names_the_field() -> None:
    req = attestation_pb2.AttestRequest(ak_name="00", nonce=b"\x00" * 31)
    assert _field_of(lambda: validate.check_attest(req, max_event_log_entries=8)) == "nonce"
    req.nonce = b"\x00" * 32
    assert _field_of(lambda: validate.check_attest(req, max_event_log_entries=8)) == "quote"
    req.quote.attest = b"\xff\x54\x43\x47"
    assert _field_of(lambda: validate.check_attest(req, max_event_log_entries=8)) == (
        "quote.attest"
    )
    assert _field_of(lambda: validate.check_get_challenge(attestation_pb2.GetChallengeRequest()))
    bad_hex = attestation_pb2.GetChallengeRequest(ak_name="ZZ")
    assert _field_of(lambda: validate.check_get_challenge(bad_hex)) == "ak_name"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (admin_pb2.ListAuditRecordsRequest(after_sequence=2**63), "after_sequence"),
        (admin_pb2.ListAuditRecordsRequest(after_sequence=2**64 - 1), "after_sequence"),
        (admin_pb2.ListAuditRecordsRequest(limit=validate.MAX_AUDIT_PAGE + 1), "limit"),
        (admin_pb2.ListAuditRecordsRequest(limit=2**32 - 1), "limit"),
    ],
)
def test_audit_paging_numbers_beyond_the_database_are_refused(
    request_: admin_pb2.ListAuditRecordsRequest, field: str
) -> None:
    assert _field_of(lambda: validate.check_list_audit_records(request_)) == field


def test_audit_paging_numbers_at_the_bounds_pass() -> None:
    validate.check_list_audit_records(
        admin_pb2.ListAuditRecordsRequest(
            after_sequence=validate.MAX_AUDIT_SEQUENCE, limit=validate.MAX_AUDIT_PAGE
        )
    )
    assert validate.MAX_AUDIT_SEQUENCE == 2**63 - 1


def test_unknown_and_unspecified_enums_are_refused() -> None:
    party = admin_pb2.Party(name="a")
    party.recipient_key.public_key = b"\x01" * 32
    req = admin_pb2.AddPartyRequest(party=party)
    assert _field_of(lambda: validate.check_add_party(req)) == "party.recipient_key.kem"
    req.party.recipient_key.kem = 99  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError, match="unknown KemAlgorithm value 99"):
        validate.check_add_party(req)
    req.party.recipient_key.kem = common_pb2.KEM_ALGORITHM_X25519
    validate.check_add_party(req)


def test_pcr_values_are_checked_for_index_bank_and_size() -> None:
    req = admin_pb2.SetGoldenPcrSetRequest()
    req.golden_set.name = "boot"
    req.golden_set.accepted_values.add(index=24, bank=common_pb2.HASH_ALGORITHM_SHA256)
    assert _field_of(lambda: validate.check_set_golden_set(req)).endswith("[0].index")
    req.golden_set.accepted_values[0].index = 0
    req.golden_set.accepted_values[0].value = b"\x00" * 20
    assert _field_of(lambda: validate.check_set_golden_set(req)).endswith("[0].value")
    req.golden_set.accepted_values[0].value = b"\x00" * 32
    validate.check_set_golden_set(req)


def test_key_ids_and_names_refuse_control_characters_and_duplicates() -> None:
    with pytest.raises(InvalidRequestError, match="printable"):
        validate.check_key_ids(["a\nb"], "key_ids", required=True)
    with pytest.raises(InvalidRequestError, match="twice"):
        validate.check_key_ids(["a", "a"], "key_ids", required=True)
    with pytest.raises(InvalidRequestError, match="control"):
        validate.check_text("x\x1b[31m", "description", required=False)


# --- rate limiting --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate=2.0, burst=3.0, clock=clock)
    assert [limiter.try_acquire("ak") for _ in range(4)] == [True, True, True, False]
    assert limiter.try_acquire("other")  # buckets are per key
    clock.now += 0.5  # one token back at 2 per second
    assert limiter.try_acquire("ak")
    assert not limiter.try_acquire("ak")


def test_token_bucket_table_stays_bounded() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate=1.0, burst=2.0, clock=clock, max_keys=100)
    for n in range(1000):
        limiter.try_acquire(f"k{n}")
    assert len(limiter) <= 200
    clock.now += 10  # every bucket refilled: all of them can go
    limiter.try_acquire("last")
    limiter.try_acquire("last2")
    assert len(limiter) <= 200


# --- logs and addresses ---------------------------------------------------------------------


def test_json_logs_carry_the_request_id_and_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(json_output=True, stream=stream)
        token = request_id_var.set("req-1")
        try:
            logging.getLogger("cleanroom.test").info("hello", extra={"fields": {"code": "OK"}})
        finally:
            request_id_var.reset(token)
        line = json.loads(stream.getvalue().splitlines()[-1])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert line["request_id"] == "req-1"
    assert line["message"] == "hello" and line["code"] == "OK" and line["level"] == "info"


def test_offered_request_ids_must_be_short_tokens() -> None:
    assert new_request_id("abc-123") == "abc-123"
    for bad in ("a\nb", "x" * 65, "", None):
        rid = new_request_id(bad)
        assert rid != bad and len(rid) == 16


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert format_address("::1", 5) == "[::1]:5"
    for bad in ("9464", "host:", "host:x", "host:70000"):
        with pytest.raises(ServerSetupError):
            parse_listen(bad)
