"""Rewrapping a data key between the local KEK and Key Vault through the operator's admin RPC
keeps it releasable: a full attestation (tpm2-tools quotes on swtpm) still releases the same key
after each rewrap. A party may not call the key-custody RPCs.

The broker is opened with ``[keyvault]`` settings (``open_broker(key_vault=...)``) against the
local Key Vault double; the RPCs run through the real servicers behind the call guard, on
grpcio-testing's in-process server (see tests/unit/broker/test_server_servicers.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.core import Broker
from broker.errors import AttestationRefusedError
from broker.kek_azure import KeyVaultConfig
from broker.keyseal import open_release
from cleanroom.app.emulators.keyvault import FakeKeyVault
from cleanroom.v1 import admin_pb2
from pki.ca import init_pki
from tests.harness.swtpm import Swtpm
from tests.support.kek_azure import (
    ADVERTISER,
    OPERATOR,
    SIDECAR,
    _evidence,
    _setup_party_key_and_approval,
    open_key_vault_broker,
)
from tests.support.servicers import Harness
from tests.vectors import tpm2tools as tt

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]


@pytest.fixture
def broker(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> Iterator[Broker]:
    with open_key_vault_broker(
        tmp_path, key_vault, key_vault_config, default_kek_in_vault=False
    ) as b:
        yield b


def _released(broker: Broker, swtpm: Swtpm, tmp_path: Path, ak: tt.KeyFiles, prefix: str) -> bytes:
    ak_name = broker.store.list_aks()[0].ak_name
    evidence, ephemeral = _evidence(broker, swtpm, tmp_path, ak, ak_name, prefix)
    outcome = broker.attest(SIDECAR, evidence)
    assert [r.key_id for r in outcome.released] == ["adv-data"]
    return open_release(
        ephemeral,
        outcome.released[0].sealed,
        session_id=outcome.session_id,
        key_id="adv-data",
        owner="advertiser",
    )


def test_rewrap_from_local_to_key_vault_and_back_keeps_the_key_releasable(
    broker: Broker, key_vault: FakeKeyVault, swtpm: Swtpm, tmp_path: Path
) -> None:
    h = Harness(broker=broker, pki=init_pki(tmp_path / "pki", parties=("advertiser",)))
    data_key = secrets.token_bytes(32)
    _setup_party_key_and_approval(broker, data_key)
    assert broker.store.get_data_key("adv-data").kek_ref == "local"
    ek = tt.create_ek(swtpm, tmp_path)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    broker.enroll_ak(OPERATOR, ak_public=ak.public.read_bytes(), ek_id=None)
    assert _released(broker, swtpm, tmp_path, ak, "q-local") == data_key

    # Local -> Key Vault, by the operator's RPC. The record now names the vault's key.
    kv_ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    response = h.ok(
        OPERATOR,
        "RewrapDataKey",
        admin_pb2.RewrapDataKeyRequest(key_id="adv-data", new_kek_ref=kv_ref),
    )
    assert (response.previous_kek_ref, response.key.kek_ref) == ("local", kv_ref)
    stored = broker.store.get_data_key("adv-data")
    assert stored.kek_ref == kv_ref and data_key not in stored.wrapped_key
    unwraps = len(key_vault.recorded(method="POST", suffix="/unwrapkey"))
    assert _released(broker, swtpm, tmp_path, ak, "q-kv") == data_key
    # The release asked Key Vault to unwrap (no unwrap cache in these settings).
    assert len(key_vault.recorded(method="POST", suffix="/unwrapkey")) == unwraps + 1

    # While Key Vault refuses, the key is withheld and an attempt to move it back changes
    # nothing.
    key_vault.forbidden = True
    ak_name = broker.store.list_aks()[0].ak_name
    evidence, _ = _evidence(broker, swtpm, tmp_path, ak, ak_name, "q-forbidden")
    with pytest.raises(AttestationRefusedError, match="key custody failed: forbidden"):
        broker.attest(SIDECAR, evidence)
    _, code, details = h.call(
        OPERATOR,
        "RewrapDataKey",
        admin_pb2.RewrapDataKeyRequest(key_id="adv-data", new_kek_ref="local"),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("forbidden:")
    assert broker.store.get_data_key("adv-data") == stored
    key_vault.forbidden = False

    # Key Vault -> local: released again, now without asking Key Vault.
    h.ok(
        OPERATOR,
        "RewrapDataKey",
        admin_pb2.RewrapDataKeyRequest(key_id="adv-data", new_kek_ref="local"),
    )
    assert broker.store.get_data_key("adv-data").kek_ref == "local"
    key_vault.forbidden = True
    assert _released(broker, swtpm, tmp_path, ak, "q-back") == data_key

    rewraps = [
        (r.decision, r.reason.split(":")[0])
        for r in broker.audit.list_records(after_sequence=0, limit=1000)
        if r.action == "key.rewrap"
    ]
    assert [d for d, _ in rewraps] == ["allow", "deny", "allow"]
    assert broker.audit.verify_chain().valid


def test_a_party_certificate_cannot_call_the_key_custody_rpcs(
    broker: Broker, key_vault: FakeKeyVault, tmp_path: Path
) -> None:
    h = Harness(broker=broker, pki=init_pki(tmp_path / "pki", parties=("advertiser",)))
    _setup_party_key_and_approval(broker, secrets.token_bytes(32))
    kv_ref = f"azurekv:{key_vault.key_url('broker-kek')}"
    requests = {
        "SetPartyKek": admin_pb2.SetPartyKekRequest(party="advertiser", kek_ref=kv_ref),
        "ListPartyKeks": admin_pb2.ListPartyKeksRequest(),
        "RewrapDataKey": admin_pb2.RewrapDataKeyRequest(key_id="adv-data", new_kek_ref=kv_ref),
        "CheckKek": admin_pb2.CheckKekRequest(kek_ref=kv_ref),
    }
    calls = len(key_vault.requests)
    for method, request in requests.items():
        _, code, details = h.call(ADVERTISER, method, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
        assert details.endswith("needs the operator role")
    # Refused before the core: nothing changed and Key Vault was never asked.
    assert broker.store.get_data_key("adv-data").kek_ref == "local"
    assert broker.store.list_party_keks() == []
    assert len(key_vault.requests) == calls
    # The operator may.
    response = h.ok(OPERATOR, "SetPartyKek", requests["SetPartyKek"])
    assert response.party_kek.source == "imported"
    assert broker.kek_ref_for_party("advertiser") == kv_ref
