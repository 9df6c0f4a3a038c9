"""A full attestation in the broker's core with data keys wrapped by Key Vault: released while
Key Vault unwraps, denied (not crashed) and audited when it refuses.

The evidence is made with tpm2-tools on swtpm; Key Vault is the local HTTPS server speaking its
REST calls (cleanroom/app/emulators/keyvault.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core import Broker
from broker.errors import AttestationRefusedError
from broker.kek_azure import KeyVaultConfig
from broker.keyseal import open_release
from cleanroom.app.emulators.keyvault import FakeKeyVault
from tests.harness.swtpm import Swtpm
from tests.support.kek_azure import (
    OPERATOR,
    SIDECAR,
    _evidence,
    _setup_party_key_and_approval,
    open_key_vault_broker,
)
from tests.vectors import tpm2tools as tt

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]


@pytest.fixture
def broker(
    tmp_path: Path, key_vault: FakeKeyVault, key_vault_config: KeyVaultConfig
) -> Iterator[Broker]:
    with open_key_vault_broker(
        tmp_path, key_vault, key_vault_config, default_kek_in_vault=True
    ) as b:
        yield b


def test_key_vault_refusing_to_unwrap_is_an_audited_denial(
    broker: Broker, key_vault: FakeKeyVault, swtpm: Swtpm, tmp_path: Path
) -> None:
    data_key = secrets.token_bytes(32)
    _setup_party_key_and_approval(broker, data_key)
    assert broker.store.get_data_key("adv-data").kek_ref.startswith("azurekv:https://127.0.0.1:")
    ek = tt.create_ek(swtpm, tmp_path)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    ak_name = broker.enroll_ak(OPERATOR, ak_public=ak.public.read_bytes(), ek_id=None).ak_name

    # Key Vault unwraps: the key is released, sealed to the quote's ephemeral key.
    evidence, ephemeral = _evidence(broker, swtpm, tmp_path, ak, ak_name, "q1")
    outcome = broker.attest(SIDECAR, evidence)
    assert [r.key_id for r in outcome.released] == ["adv-data"]
    released = open_release(
        ephemeral,
        outcome.released[0].sealed,
        session_id=outcome.session_id,
        key_id="adv-data",
        owner="advertiser",
    )
    assert released == data_key

    # Key Vault refuses (the broker's role was removed): a denial, with the reason audited.
    for refusal, reason in (("forbidden", "forbidden"), ("disabled", "key disabled")):
        if refusal == "forbidden":
            key_vault.forbidden = True
        else:
            key_vault.forbidden = False
            key_vault.set_enabled("broker-kek", False)
        evidence, _ = _evidence(broker, swtpm, tmp_path, ak, ak_name, f"q-{refusal}")
        with pytest.raises(AttestationRefusedError) as info:
            broker.attest(SIDECAR, evidence)
        assert str(info.value).startswith(f"key custody failed: {reason}")
        last = broker.audit.list_records(after_sequence=0, limit=1000)[-1]
        assert (last.action, last.decision, last.subject) == ("attest", "deny", ak_name)
        assert last.reason.startswith(f"key custody failed: {reason}")
        assert last.parties == ("advertiser",)
    releases = [
        r
        for r in broker.audit.list_records(after_sequence=0, limit=1000)
        if r.action == "key.release"
    ]
    assert [(r.subject, r.decision) for r in releases] == [("adv-data", "allow")]
    assert broker.audit.verify_chain().valid
