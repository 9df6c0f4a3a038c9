"""The broker applies the AK sizes and curves its configuration accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._loadgen import SoftAk
from broker.app import open_broker
from broker.config import BrokerConfig
from broker.errors import KeyAttributeError
from pki.identity import SpiffeId

OPERATOR = SpiffeId("cleanroom.local", "operator")


def _config(tmp_path: Path, **limits: object) -> BrokerConfig:
    return BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        **limits,  # type: ignore[arg-type]
    )


def test_rsa_2048_ak_is_refused_when_only_3072_is_accepted(tmp_path: Path) -> None:
    ak = SoftAk.generate("rsa")
    with open_broker(_config(tmp_path, accepted_rsa_bits=(3072,))) as broker:
        with pytest.raises(KeyAttributeError, match="2048"):
            broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=None)


def test_ecc_p256_ak_is_refused_when_only_p384_is_accepted(tmp_path: Path) -> None:
    ak = SoftAk.generate("ecc")
    with open_broker(_config(tmp_path, accepted_ecc_curves=("P-384",))) as broker:
        with pytest.raises(KeyAttributeError):
            broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=None)


def test_default_limits_accept_rsa_2048_and_p256(tmp_path: Path) -> None:
    with open_broker(_config(tmp_path)) as broker:
        for alg in ("rsa", "ecc"):
            ak = SoftAk.generate(alg)
            record = broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=None)
            assert record.ak_name == ak.name_hex
