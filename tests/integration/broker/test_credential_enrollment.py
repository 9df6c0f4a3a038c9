"""Enrollment against a real TPM: the broker's MakeCredential is activated by
``tpm2_activatecredential`` on swtpm, AKs and keys made by tpm2-tools pass or fail the attribute
checks, and swtpm's EK certificates validate against swtpm-localca's CA."""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import tpmkeys
from broker.errors import EkCertificateError, KeyAttributeError
from tests.harness.swtpm import Swtpm
from tests.vectors import tpm2tools as tt
from tests.vectors.generate import LOCALCA_PEMS, build_key_vectors, read_ek_certificate

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]


def _credential_file(tmp_path: Path, ek: tt.KeyFiles, ak_name: bytes, secret: bytes) -> Path:
    blob, encrypted = tpmkeys.make_credential(
        ek_public=ek.public.read_bytes(), ak_name=ak_name, secret=secret
    )
    path = tmp_path / "credential.blob"
    path.write_bytes(tpmkeys.to_tools_credential_file(blob, encrypted))
    return path


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_broker_credential_activates_on_the_tpm(swtpm: Swtpm, tmp_path: Path, alg: str) -> None:
    ek = tt.create_ek(swtpm, tmp_path, alg=alg)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    assert ak.name is not None
    # The broker computes the same name that tpm2_createak reports.
    ak_public = tpmkeys.load_public(ak.public.read_bytes())
    assert ak_public.name == ak.name.read_bytes()
    secret = secrets.token_bytes(32)
    cred = _credential_file(tmp_path, ek, ak_public.name, secret)
    assert tt.activate_credential(swtpm, tmp_path, ak=ak, ek=ek, credential=cred) == secret
    assert swtpm.tools("tpm2_getcap", "handles-transient").stdout.strip() == ""


def test_credential_for_another_name_does_not_activate(swtpm: Swtpm, tmp_path: Path) -> None:
    ek = tt.create_ek(swtpm, tmp_path)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    other = tt.create_ak(swtpm, tmp_path, ek, prefix="other")
    other_name = tpmkeys.load_public(other.public.read_bytes()).name
    assert other_name is not None
    cred = _credential_file(tmp_path, ek, other_name, secrets.token_bytes(32))
    # Made for the other AK's name: the TPM refuses to release it to this AK...
    assert tt.activate_credential(swtpm, tmp_path, ak=ak, ek=ek, credential=cred) is None
    # ...and releases it to the AK it was made for.
    assert tt.activate_credential(swtpm, tmp_path, ak=other, ek=ek, credential=cred) is not None


def test_credential_under_another_ek_does_not_activate(swtpm: Swtpm, tmp_path: Path) -> None:
    ek = tt.create_ek(swtpm, tmp_path)
    ecc_ek = tt.create_ek(swtpm, tmp_path, alg="ecc", prefix="ek-ecc")
    ak = tt.create_ak(swtpm, tmp_path, ek)
    name = tpmkeys.load_public(ak.public.read_bytes()).name
    assert name is not None
    cred = _credential_file(tmp_path, ecc_ek, name, secrets.token_bytes(16))
    assert tt.activate_credential(swtpm, tmp_path, ak=ak, ek=ek, credential=cred) is None


def test_attribute_checks_on_tools_keys(swtpm: Swtpm, tmp_path: Path) -> None:
    verdicts = {}
    for v in build_key_vectors(swtpm, tmp_path):
        pub = tpmkeys.load_public(v.public)
        for kind, check in (
            ("ak", tpmkeys.check_ak_attributes),
            ("ek", tpmkeys.check_ek_attributes),
        ):
            try:
                check(pub)
                verdicts[(v.name, kind)] = "valid"
            except KeyAttributeError as e:
                verdicts[(v.name, kind)] = str(e)
    assert verdicts[("key-rsa-createak", "ak")] == "valid"
    assert verdicts[("key-ecc-createak", "ak")] == "valid"
    assert verdicts[("key-rsa-createek", "ek")] == "valid"
    assert verdicts[("key-ecc-createek", "ek")] == "valid"
    assert "lacks restricted" in verdicts[("key-rsa-not-restricted", "ak")]
    assert "RSA-1024" in verdicts[("key-rsa-1024-restricted", "ak")]
    assert "has decrypt" in verdicts[("key-rsa-createek", "ak")]


def _localca() -> list[bytes]:
    return [p.read_bytes() for p in LOCALCA_PEMS]


@pytest.mark.parametrize("alg", ["rsa", "ecc384"])
def test_swtpm_ek_certificate(swtpm: Swtpm, tmp_path: Path, alg: str) -> None:
    ek_public, cert = read_ek_certificate(swtpm, tmp_path, alg=alg)
    tpmkeys.check_ek_attributes(tpmkeys.load_public(ek_public))
    parsed = tpmkeys.verify_ek_certificate(cert, ek_public, _localca())
    # TCG EK certificates carry a critical SAN of directory names: tolerated, not ignored.
    assert parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_ek_certificate_against_another_ca(swtpm: Swtpm, tmp_path: Path) -> None:
    ek_public, cert = read_ek_certificate(swtpm, tmp_path, alg="rsa")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swtpm-localca-rootca")])
    now = dt.datetime.now(dt.UTC)
    other = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    bundle = [other.public_bytes(serialization.Encoding.PEM), LOCALCA_PEMS[1].read_bytes()]
    with pytest.raises(EkCertificateError, match="does not chain"):
        tpmkeys.verify_ek_certificate(cert, ek_public, bundle)


def test_ek_certificate_for_another_ek(swtpm: Swtpm, tmp_path: Path) -> None:
    _, cert = read_ek_certificate(swtpm, tmp_path, alg="rsa")
    ecc_ek, _ = read_ek_certificate(swtpm, tmp_path, alg="ecc384")
    with pytest.raises(EkCertificateError, match="another key"):
        tpmkeys.verify_ek_certificate(cert, ecc_ek, _localca())
