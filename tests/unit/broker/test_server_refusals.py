"""Refusals through the servicers and the call guard (grpcio-testing's in-process server, a real
:class:`~broker.core.Broker` over SQLite): malformed ``Attest`` requests are audited like
every other attestation refusal, audit paging numbers beyond what the database holds are
``INVALID_ARGUMENT``, and a party's Key Vault KEK that fails is ``UNAVAILABLE`` (transient) or
``FAILED_PRECONDITION`` (for good) at ``RegisterDataKey``, with messages that name no vault.

Key Vault is the local HTTPS double (``cleanroom.app.emulators.keyvault``) reached with the real
``azure-keyvault-keys`` client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.kek_azure import KeyVaultConfig
from broker.server.status import KEK_UNAVAILABLE_MESSAGE, KEK_UNUSABLE_MESSAGE
from cleanroom.app.emulators.keyvault import FakeKeyVault
from cleanroom.v1 import admin_pb2, attestation_pb2
from pki.ca import init_pki
from pki.identity import SpiffeId
from tests.support.servicers import (
    ADVERTISER,
    OPERATOR,
    PUBLISHER,
    SIDECAR,
    Harness,
    _add_parties,
    _attest_request,
    _register,
)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    pki = init_pki(tmp_path / "pki", parties=("advertiser", "publisher"))
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}", state_dir=str(tmp_path / "state")
    )
    with open_broker(config) as broker:
        yield Harness(broker=broker, pki=pki)


# --- malformed Attest requests are audited ----------------------------------------------------

Mutation = Callable[[attestation_pb2.AttestRequest], object]


@pytest.mark.parametrize(
    ("mutate", "field", "names_the_ak"),
    [
        (lambda r: setattr(r, "ak_name", "ZZ"), "ak_name", False),
        (lambda r: setattr(r, "ak_name", "ab" * 5000), "ak_name", False),
        (lambda r: setattr(r, "nonce", b"\x00" * 31), "nonce", True),
        (lambda r: r.ClearField("quote"), "quote", True),
        (lambda r: setattr(r.quote, "attest", b"\x00\x01"), "quote.attest", True),
        (lambda r: r.quote.pcr_values.add(index=23, bank=99), "quote.pcr_values[2].bank", True),
        (lambda r: r.ClearField("ephemeral_key"), "ephemeral_key", True),
        (lambda r: r.key_ids.append("two words"), "key_ids[0]", True),
    ],
)
def test_a_malformed_attest_is_an_audited_denial_with_the_validation_message(
    h: Harness, mutate: Mutation, field: str, names_the_ak: bool
) -> None:
    request = _attest_request(b"\x07" * 32)
    mutate(request)
    before = h.broker.audit.head()[0]
    _, code, details = h.call(SIDECAR, "Attest", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field + ":"), details
    records = h.broker.audit.list_records(after_sequence=before, limit=10)
    assert len(records) == 1
    record = records[0]
    assert (record.actor, record.action, record.decision) == (str(SIDECAR), "attest", "deny")
    # Exactly what the sidecar was told: the field and its problem.
    assert record.reason == details
    # A malformed AK name (possibly megabytes of it) is not copied into the log.
    assert record.subject == (request.ak_name if names_the_ak else "")
    quoted = bytes(request.quote.attest) + bytes(request.quote.signature)
    assert record.evidence_digest == (hashlib.sha256(quoted).hexdigest() if quoted else "")
    assert record.parties == ()
    assert h.broker.audit.verify_chain().valid
    assert (
        h.metric("cleanroom_broker_attestations_total", result="deny", reason="invalid_request")
        == 1.0
    )


def test_a_well_formed_attest_is_audited_once_by_the_core(h: Harness) -> None:
    # An unknown AK: the core records the denial; validation adds nothing of its own.
    before = h.broker.audit.head()[0]
    _, code, _ = h.call(SIDECAR, "Attest", _attest_request(b"\x07" * 32))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    records = h.broker.audit.list_records(after_sequence=before, limit=10)
    assert [(r.action, r.decision) for r in records] == [("attest", "deny")]
    assert records[0].reason.endswith("is not enrolled")


# --- audit paging numbers --------------------------------------------------------------------


@pytest.mark.parametrize("who", [OPERATOR, ADVERTISER])
@pytest.mark.parametrize("after", [2**63, 2**64 - 1])
def test_an_audit_page_after_a_sequence_no_database_holds_is_invalid_argument(
    h: Harness, who: SpiffeId, after: int
) -> None:
    # The operator's query and a party's (joined on its records) both bind the number.
    _add_parties(h)
    request = admin_pb2.ListAuditRecordsRequest(after_sequence=after)
    _, code, details = h.call(who, "ListAuditRecords", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details == "after_sequence: must be at most 9223372036854775807"


def test_an_audit_page_after_the_largest_sequence_is_empty(h: Harness) -> None:
    _add_parties(h)
    request = admin_pb2.ListAuditRecordsRequest(after_sequence=2**63 - 1, limit=1000)
    assert list(h.ok(OPERATOR, "ListAuditRecords", request).records) == []
    assert list(h.ok(PUBLISHER, "ListAuditRecords", request).records) == []


# --- a party's Key Vault KEK at registration -------------------------------------------------


@pytest.fixture
def kv_harness(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> Iterator[Harness]:
    """The advertiser's keys are wrapped by its Key Vault key; one retry per request."""
    key_vault.create_key("advertiser-kek")
    pki = init_pki(tmp_path / "pki", parties=("advertiser", "publisher"))
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        party_keks={"advertiser": f"azurekv:{key_vault.key_url('advertiser-kek')}"},
    )
    settings = replace(key_vault_config, retry_total=1, retry_backoff_max_seconds=0.2)
    with open_broker(config, key_vault=settings, key_vault_credential=key_vault.credential()) as b:
        harness = Harness(broker=b, pki=pki)
        _add_parties(harness)
        yield harness


def _last_register_record(h: Harness) -> tuple[str, str, str]:
    last = h.broker.audit.list_records(after_sequence=0, limit=1000)[-1]
    assert last.action == "key.register"
    return last.subject, last.decision, last.reason


def test_a_kek_that_refuses_for_good_is_a_precondition_that_names_no_vault(
    kv_harness: Harness, key_vault: FakeKeyVault
) -> None:
    h = kv_harness
    key_vault.forbidden = True
    _, code, details = _register(h, ADVERTISER, "adv-1")
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, KEK_UNUSABLE_MESSAGE)
    assert key_vault.url not in details
    # The operator reads the whole reason in the audit log.
    subject, decision, reason = _last_register_record(h)
    assert (subject, decision) == ("adv-1", "deny")
    assert reason.startswith("forbidden: ") and key_vault.url in reason
    key_vault.forbidden = False
    key_vault.set_enabled("advertiser-kek", False)
    _, code, details = _register(h, ADVERTISER, "adv-1")
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, KEK_UNUSABLE_MESSAGE)
    assert _last_register_record(h)[2].startswith("key disabled: ")
    # Another party's local KEK is not concerned.
    _, code, _ = _register(h, PUBLISHER, "pub-1")
    assert code == grpc.StatusCode.OK


def test_a_transient_key_vault_fault_is_unavailable_and_a_retry_succeeds(
    kv_harness: Harness, key_vault: FakeKeyVault
) -> None:
    h = kv_harness
    # The request and its one retry both fail.
    key_vault.fail_next(503, "ServiceUnavailable", times=2)
    _, code, details = _register(h, ADVERTISER, "adv-1")
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    subject, decision, reason = _last_register_record(h)
    assert (subject, decision) == ("adv-1", "deny") and reason.startswith("unavailable: ")
    key_vault.throttle(2, retry_after=0)
    _, code, details = _register(h, ADVERTISER, "adv-1")
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    assert _last_register_record(h)[2].startswith("throttled: ")
    # Nothing was stored, so the same registration goes through once the vault recovers.
    _, code, details = _register(h, ADVERTISER, "adv-1")
    assert code == grpc.StatusCode.OK, details
    assert _last_register_record(h)[:2] == ("adv-1", "allow")
