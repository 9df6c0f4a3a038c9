"""Attesting against a broker whose keys are wrapped by Azure Key Vault (the local HTTPS double): a
party's key and approval, and the evidence a software attester sends."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core import Broker, Evidence
from broker.kek_azure import KeyVaultConfig
from broker.keyseal import seal_for_registration
from broker.model import Party
from broker.quote import pcr_values_from_tools
from cleanroom.app.emulators.keyvault import FakeKeyVault
from evidence.manifest import ManifestEntry
from pki.identity import SpiffeId
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from tests.harness.launch import TEST_LAUNCH
from tests.harness.swtpm import Swtpm
from tests.vectors import tpm2tools as tt

TD = "cleanroom.local"


OPERATOR = SpiffeId.operator(TD)


ADVERTISER = SpiffeId.party(TD, "advertiser")


SIDECAR = SpiffeId.sidecar(TD, "sidecar-1")


WORKLOAD = [("model/train.py", b"print('join and train')\n"), ("bin/run.sh", b"#!/bin/sh\n")]


SIDECAR_CERT_DER = b"the sidecar's TLS certificate (bound into the quote)"


@contextmanager
def open_key_vault_broker(
    workdir: Path,
    key_vault: FakeKeyVault,
    key_vault_config: KeyVaultConfig,
    *,
    default_kek_in_vault: bool,
) -> Iterator[Broker]:
    """A broker on SQLite in ``workdir`` whose ``[keyvault]`` settings reach the double, with a
    fresh ``broker-kek`` there; its default KEK is that key or, without ``default_kek_in_vault``,
    the local one."""
    key_vault.create_key("broker-kek")
    default_kek = f"azurekv:{key_vault.key_url('broker-kek')}" if default_kek_in_vault else "local"
    config = BrokerConfig(
        database_url=f"sqlite:///{workdir / 'broker.db'}",
        state_dir=str(workdir / "state"),
        default_kek=default_kek,
    )
    with open_broker(
        config, key_vault=key_vault_config, key_vault_credential=key_vault.credential()
    ) as b:
        yield b


def _setup_party_key_and_approval(broker: Broker, data_key: bytes) -> None:
    public = generate_recipient_key().public_key()
    broker.add_party(OPERATOR, Party(name="advertiser", kem=public.kem, public_key=public.raw))
    sealed = seal_for_registration(
        broker.registration_key.public_key(), data_key, key_id="adv-data", owner="advertiser"
    )
    broker.register_data_key(
        ADVERTISER, key_id="adv-data", sealed_data_key=sealed, description="training data"
    )
    manifest = [
        ManifestEntry(
            path=path,
            size=len(data),
            digests={bank: hashlib.new(bank, data).digest() for bank in ("sha1", "sha256")},
        )
        for path, data in WORKLOAD
    ]
    broker.approve_workload(
        ADVERTISER,
        workload_name="join-and-train",
        manifest=manifest,
        key_ids=["adv-data"],
        output_recipients=["advertiser"],
        golden_set=None,
        launch=TEST_LAUNCH,
    )


def _evidence(
    broker: Broker, swtpm: Swtpm, workdir: Path, ak: tt.KeyFiles, ak_name: str, prefix: str
) -> tuple[Evidence, RecipientPrivateKey]:
    """A challenge, then PCR 23 measured and quoted as the sidecar would, bound to the nonce."""
    from evidence.binding import qualifying_data

    challenge = broker.challenge(SIDECAR, ak_name)
    ephemeral = generate_recipient_key()
    public = ephemeral.public_key()
    binding = qualifying_data(
        nonce=challenge.nonce,
        kem=public.kem,
        ephemeral_public_key=public.raw,
        tls_certificate_der=SIDECAR_CERT_DER,
    )
    tt.reset_pcr23(swtpm)
    events = (*tt.measure(swtpm, WORKLOAD), tt.measure_launch(swtpm, TEST_LAUNCH))
    quote = tt.quote(swtpm, workdir, ak, qualification=binding, prefix=prefix)
    attest = quote.message.read_bytes()
    evidence = Evidence(
        ak_name=ak_name,
        nonce=challenge.nonce,
        attest=attest,
        signature=quote.signature.read_bytes(),
        pcr_values=pcr_values_from_tools(quote.pcrs.read_bytes(), attest=attest),
        event_log=events,
        ephemeral_key=public,
        key_ids=("adv-data",),
        peer_certificate_der=SIDECAR_CERT_DER,
    )
    return evidence, ephemeral
