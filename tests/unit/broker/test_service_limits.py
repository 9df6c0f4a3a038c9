"""The broker applies the AK sizes and curves its configuration accepts, to every form of AK,
and its configuration refuses PCR bank lists that are too weak."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMT_ASYM_SCHEME

from broker.app import open_broker
from broker.config import BrokerConfig, load_broker_config
from broker.errors import KeyAttributeError
from cleanroom.config import ConfigError
from pki.identity import SpiffeId
from tests.support.softtpm import AK_ATTRIBUTES, SoftAk

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


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tpm2b(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """The key as tpm2_createak would describe it (restricted signing key, SHA-256 scheme)."""
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    scheme = TPMT_ASYM_SCHEME(scheme=TPM2_ALG.RSASSA if rsa_key else TPM2_ALG.ECDSA)
    scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    public = TPM2B_PUBLIC.from_pem(
        _public_pem(key), nameAlg=TPM2_ALG.SHA256, objectAttributes=AK_ATTRIBUTES, scheme=scheme
    )
    return bytes(public.marshal())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            # The weak key is the point: the broker must refuse it.
            rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
            "AK is RSA-1024; accepted RSA sizes: 2048, 3072",
        ),
        (
            ec.generate_private_key(ec.SECP521R1()),
            "AK is on curve P-521; accepted curves: P-256, P-384",
        ),
    ],
    ids=["rsa-1024", "p-521"],
)
def test_a_weak_pem_ak_is_refused_like_its_tpm2b_public(
    tmp_path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, message: str
) -> None:
    with open_broker(_config(tmp_path)) as broker:
        errors = []
        for form in (_tpm2b(key), _public_pem(key)):
            with pytest.raises(KeyAttributeError) as refused:
                broker.enroll_ak(OPERATOR, ak_public=form, ek_id=None)
            errors.append(str(refused.value))
        assert errors == [message, message]
        assert broker.list_aks() == []
        denials = [r for r in broker.audit.list_records(limit=100) if r.action == "ak.enroll"]
        assert [(r.decision, r.reason) for r in denials] == [("deny", message)] * 2


def test_a_pem_ak_of_an_accepted_size_is_enrolled(tmp_path: Path) -> None:
    ak = SoftAk.generate("rsa")
    with open_broker(_config(tmp_path)) as broker:
        pem = _public_pem(ak.key)
        record = broker.enroll_ak(OPERATOR, ak_public=pem, ek_id=None)
        assert record.enrolled_by == "operator" and record.public == pem


@pytest.mark.parametrize(
    ("banks", "message"),
    [
        (("sha1",), "must include a bank stronger than sha1"),
        (("sha1", "sha1"), "must include a bank stronger than sha1"),
        ((), "must include a bank stronger than sha1"),
        (("sha256", "sha256"), "lists sha256 more than once"),
        (("sha1", "sha256", "sha1"), "lists sha1 more than once"),
        (("sha512",), "unknown bank 'sha512'"),
    ],
)
def test_required_banks_without_a_strong_bank_or_with_duplicates_are_refused(
    tmp_path: Path, banks: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^required_banks.*{message}"):
        _config(tmp_path, required_banks=banks)


def test_required_banks_from_the_environment_are_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANROOM_BROKER_REQUIRED_BANKS", "sha1,sha1")
    with pytest.raises(ConfigError, match="stronger than sha1"):
        load_broker_config(None)
    monkeypatch.setenv("CLEANROOM_BROKER_REQUIRED_BANKS", "sha1,sha256")
    assert load_broker_config(None).required_banks == ("sha1", "sha256")
