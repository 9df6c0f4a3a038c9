"""broker.tpmkeys on keys and EK certificates that tpm2-tools and swtpm made (stored vectors), and
on software-made TPM publics and certificates for the cases a TPM will not produce."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT
from tpm2_pytss.utils import tools_to_credential

from broker import tpmkeys
from broker.errors import CredentialError, EkCertificateError, KeyAttributeError
from pki.ca import certificate_builder, self_signed_ca_certificate
from tests.harness.reencode import reencode
from tests.vectors.evidence import EkCertVector, KeyVector, ekcert_vectors, key_vectors

KEYS = {v.name: v for v in key_vectors()}
CERTS = {v.name: v for v in ekcert_vectors()}
AK_BITS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)


def _pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tpm_public(pem: bytes, attrs: int, scheme: int | None, hash_alg: int | None) -> bytes:
    pub = TPM2B_PUBLIC.from_pem(pem, objectAttributes=attrs)
    if scheme is not None:
        params = pub.publicArea.parameters
        detail = params.rsaDetail if pub.publicArea.type == TPM2_ALG.RSA else params.eccDetail
        detail.scheme.scheme = scheme
        detail.scheme.details.anySig.hashAlg = hash_alg
    return bytes(pub.marshal())


# --- parsing -----------------------------------------------------------------------------------


def test_tpm2b_public_and_pem_of_one_key() -> None:
    raw = KEYS["key-rsa-createak"].public
    pub = tpmkeys.load_public(raw)
    assert pub.is_tpm_public and pub.tpm2b_public == raw
    assert pub.key_type == "rsa" and pub.key_bits == 2048
    assert (pub.scheme, pub.scheme_hash, pub.name_alg) == ("rsassa", "sha256", "sha256")
    assert pub.name is not None and pub.name[:2] == b"\x00\x0b"
    # The name is nameAlg || H(TPMT_PUBLIC); the key id is H(TPMT_PUBLIC) (the ek_id rule).
    tpmt = TPM2B_PUBLIC.unmarshal(raw)[0].publicArea.marshal()
    assert pub.name[2:] == hashlib.sha256(tpmt).digest()
    assert pub.key_id == pub.name[2:].hex()
    assert "restricted" in pub.attribute_names()
    pem = tpmkeys.load_public(_pem(pub.key))
    assert not pem.is_tpm_public and pem.name is None and pem.attributes is None
    assert pem.spki_sha256 == pub.spki_sha256
    assert pem.key_id == pem.spki_sha256 != pub.key_id


def test_ecc_public() -> None:
    pub = tpmkeys.load_public(KEYS["key-ecc-createak"].public)
    assert (pub.key_type, pub.curve, pub.key_bits, pub.scheme) == ("ecc", "P-256", 256, "ecdsa")
    ek = tpmkeys.load_public(KEYS["key-rsa-createek"].public)
    assert ek.symmetric == "aes128cfb" and ek.scheme is None


def test_parsing_is_cached() -> None:
    raw = KEYS["key-rsa-createak"].public
    assert tpmkeys.load_public(raw) is tpmkeys.load_public(bytearray(raw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", KEYS["key-rsa-createak"].public + b"\x00", b"-----BEGIN PUBLIC KEY-----\nxx"],
    ids=["empty", "short", "trailing-byte", "bad-pem"],
)
def test_malformed_publics(data: bytes) -> None:
    with pytest.raises(KeyAttributeError):
        tpmkeys.load_public(data)


def test_unsupported_pem_types() -> None:
    with pytest.raises(KeyAttributeError, match="Ed25519"):
        tpmkeys.load_public(_pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(KeyAttributeError, match="curve"):
        tpmkeys.load_public(_pem(ec.generate_private_key(ec.SECP256K1()).public_key()))


# --- attribute policy --------------------------------------------------------------------------


@pytest.mark.parametrize("vector", list(KEYS.values()), ids=list(KEYS))
def test_key_vector_verdicts(vector: KeyVector) -> None:
    pub = tpmkeys.load_public(vector.public)
    for check, verdict in (
        (tpmkeys.check_ak_attributes, vector.ak_verdict),
        (tpmkeys.check_ek_attributes, vector.ek_verdict),
    ):
        if verdict == "valid":
            check(pub)
        else:
            with pytest.raises(KeyAttributeError):
                check(pub)


def test_refusal_reasons() -> None:
    with pytest.raises(KeyAttributeError, match="lacks restricted"):
        tpmkeys.check_ak_attributes(tpmkeys.load_public(KEYS["key-rsa-not-restricted"].public))
    with pytest.raises(KeyAttributeError, match="RSA-1024"):
        tpmkeys.check_ak_attributes(tpmkeys.load_public(KEYS["key-rsa-1024-restricted"].public))
    with pytest.raises(KeyAttributeError, match="has decrypt"):
        tpmkeys.check_ak_attributes(tpmkeys.load_public(KEYS["key-rsa-createek"].public))
    # The accepted sizes are configurable.
    tpmkeys.check_ak_attributes(
        tpmkeys.load_public(KEYS["key-rsa-1024-restricted"].public), rsa_key_sizes={1024}
    )


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())


@pytest.mark.parametrize(
    ("scheme", "hash_alg", "match"),
    [
        (TPM2_ALG.RSASSA, TPM2_ALG.SHA1, "sha1"),
        (None, None, "scheme is null"),
        (TPM2_ALG.RSAES, TPM2_ALG.SHA256, "scheme is rsaes"),
    ],
)
def test_ak_scheme_must_be_a_strong_signature(
    rsa_pem: bytes, scheme: int | None, hash_alg: int | None, match: str
) -> None:
    pub = tpmkeys.load_public(_tpm_public(rsa_pem, AK_BITS, scheme, hash_alg))
    with pytest.raises(KeyAttributeError, match=match):
        tpmkeys.check_ak_attributes(pub)


def test_software_ak_with_good_attributes_passes(rsa_pem: bytes) -> None:
    pub = tpmkeys.load_public(_tpm_public(rsa_pem, AK_BITS, TPM2_ALG.RSAPSS, TPM2_ALG.SHA384))
    tpmkeys.check_ak_attributes(pub)


def test_pem_ak_needs_explicit_consent(rsa_pem: bytes) -> None:
    pub = tpmkeys.load_public(rsa_pem)
    with pytest.raises(KeyAttributeError, match="PEM"):
        tpmkeys.check_ak_attributes(pub)
    tpmkeys.check_ak_attributes(pub, allow_pem=True)
    big = tpmkeys.load_public(
        _pem(rsa.generate_private_key(public_exponent=65537, key_size=4096).public_key())
    )
    with pytest.raises(KeyAttributeError, match="RSA-4096"):
        tpmkeys.check_ak_attributes(big, allow_pem=True)
    p521 = tpmkeys.load_public(_pem(ec.generate_private_key(ec.SECP521R1()).public_key()))
    with pytest.raises(KeyAttributeError, match="P-521"):
        tpmkeys.check_ak_attributes(p521, allow_pem=True)
    with pytest.raises(KeyAttributeError, match="PEM"):
        tpmkeys.check_ek_attributes(pub)


# --- MakeCredential ----------------------------------------------------------------------------


def test_make_credential_output_is_tools_compatible() -> None:
    ek = KEYS["key-rsa-createek"].public
    ak = tpmkeys.load_public(KEYS["key-rsa-createak"].public)
    assert ak.name is not None
    blob, secret = tpmkeys.make_credential(ek_public=ek, ak_name=ak.name, secret=b"s" * 32)
    tools = tpmkeys.to_tools_credential_file(blob, secret)
    assert tools[:8] == bytes.fromhex("badcc0de00000001")
    id_object, enc = tools_to_credential(tools)
    assert bytes(id_object.marshal()) == blob and bytes(enc.marshal()) == secret
    # The EK is RSA-2048: the encrypted seed is one RSA block.
    assert len(secret) == 2 + 256
    # A fresh seed each time.
    assert tpmkeys.make_credential(ek_public=ek, ak_name=ak.name, secret=b"s" * 32) != (
        blob,
        secret,
    )


def test_make_credential_with_ecc_ek() -> None:
    ak = tpmkeys.load_public(KEYS["key-ecc-createak"].public)
    assert ak.name is not None
    blob, secret = tpmkeys.make_credential(
        ek_public=KEYS["key-ecc-createek"].public, ak_name=ak.name, secret=b"x" * 16
    )
    assert blob and secret


def test_make_credential_refusals() -> None:
    ek = KEYS["key-rsa-createek"].public
    name = tpmkeys.load_public(KEYS["key-rsa-createak"].public).name
    assert name is not None
    with pytest.raises(CredentialError, match=r"1\.\.32"):
        tpmkeys.make_credential(ek_public=ek, ak_name=name, secret=b"s" * 33)
    with pytest.raises(CredentialError, match=r"1\.\.32"):
        tpmkeys.make_credential(ek_public=ek, ak_name=name, secret=b"")
    for bad in (b"", name[:-1], b"\x00\x99" + name[2:]):
        with pytest.raises(CredentialError, match="AK name"):
            tpmkeys.make_credential(ek_public=ek, ak_name=bad, secret=b"s")
    with pytest.raises(KeyAttributeError):
        tpmkeys.make_credential(
            ek_public=KEYS["key-rsa-createak"].public, ak_name=name, secret=b"s"
        )
    blob, secret = tpmkeys.make_credential(ek_public=ek, ak_name=name, secret=b"s")
    with pytest.raises(CredentialError, match="trailing"):
        tpmkeys.to_tools_credential_file(blob + b"\x00", secret)
    with pytest.raises(CredentialError, match="malformed"):
        tpmkeys.to_tools_credential_file(blob[:10], secret)


# --- EK certificates ---------------------------------------------------------------------------


def _when(v: EkCertVector) -> dt.datetime:
    cert = x509.load_der_x509_certificate(v.certificate)
    return cert.not_valid_before_utc + dt.timedelta(days=1)


@pytest.mark.parametrize("vector", list(CERTS.values()), ids=list(CERTS))
def test_swtpm_ek_certificate_validates(vector: EkCertVector) -> None:
    cert = tpmkeys.verify_ek_certificate(
        vector.certificate, vector.ek_public, vector.ca_pems, now=_when(vector)
    )
    assert cert.issuer.rfc4514_string() == "CN=swtpm-localca"
    # One bundle holding both certificates works as well, and PEM input too.
    pem = cert.public_bytes(serialization.Encoding.PEM)
    tpmkeys.verify_ek_certificate(pem, vector.ek_public, [b"".join(vector.ca_pems)], _when(vector))
    # NV indices may be larger than the certificate: zero padding is tolerated.
    tpmkeys.verify_ek_certificate(
        vector.certificate + bytes(64), vector.ek_public, vector.ca_pems, now=_when(vector)
    )


def _self_signed_ca(name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = self_signed_ca_certificate(
        key, name, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
    )
    return key, cert


def test_other_ca_is_refused() -> None:
    v = CERTS["ekcert-rsa-swtpm-localca"]
    _, other = _self_signed_ca("swtpm-localca-rootca")  # same name, other key
    with pytest.raises(EkCertificateError, match="does not chain"):
        tpmkeys.verify_ek_certificate(
            v.certificate, v.ek_public, [other.public_bytes(serialization.Encoding.PEM)], _when(v)
        )


def test_intermediate_alone_is_not_a_trust_anchor() -> None:
    v = CERTS["ekcert-rsa-swtpm-localca"]
    with pytest.raises(EkCertificateError, match="no self-signed root"):
        tpmkeys.verify_ek_certificate(v.certificate, v.ek_public, [v.ca_pems[1]], _when(v))


def test_ek_mismatch_is_refused() -> None:
    v = CERTS["ekcert-rsa-swtpm-localca"]
    other_ek = CERTS["ekcert-ecc384-swtpm-localca"].ek_public
    with pytest.raises(EkCertificateError, match="another key"):
        tpmkeys.verify_ek_certificate(v.certificate, other_ek, v.ca_pems, _when(v))
    # The same TPM's RSA EK (same seed, so the same key) matches; its AK does not.
    tpmkeys.verify_ek_certificate(
        v.certificate, KEYS["key-rsa-createek"].public, v.ca_pems, _when(v)
    )
    with pytest.raises(EkCertificateError, match="another key"):
        tpmkeys.verify_ek_certificate(
            v.certificate, KEYS["key-rsa-createak"].public, v.ca_pems, _when(v)
        )


def test_validity_window() -> None:
    v = CERTS["ekcert-rsa-swtpm-localca"]
    before = _when(v) - dt.timedelta(days=2)
    with pytest.raises(EkCertificateError, match="not valid before"):
        tpmkeys.verify_ek_certificate(v.certificate, v.ek_public, v.ca_pems, before)
    after = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
    with pytest.raises(EkCertificateError, match="expired"):
        tpmkeys.verify_ek_certificate(v.certificate, v.ek_public, v.ca_pems, after)


def test_garbage_inputs() -> None:
    v = CERTS["ekcert-rsa-swtpm-localca"]
    with pytest.raises(EkCertificateError, match=r"not a valid X\.509"):
        tpmkeys.verify_ek_certificate(b"\x30\x82\x00", v.ek_public, v.ca_pems, _when(v))
    with pytest.raises(EkCertificateError, match="bundle 0"):
        tpmkeys.verify_ek_certificate(v.certificate, v.ek_public, [b"junk"], _when(v))


def test_intermediate_that_is_not_a_ca_is_refused() -> None:
    root_key, root = _self_signed_ca("root")
    mid_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)

    def issue(
        subject: str, public: rsa.RSAPublicKey, issuer: x509.Certificate, key: rsa.RSAPrivateKey
    ) -> x509.Certificate:
        return certificate_builder(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]),
            issuer=issuer.subject,
            public_key=public,
            not_before=now - dt.timedelta(hours=1),
            not_after=now + dt.timedelta(days=1),
            ca=False,
        ).sign(key, hashes.SHA256())

    mid = issue("not-a-ca", mid_key.public_key(), root, root_key)
    ek_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = issue("ek", ek_key.public_key(), mid, mid_key)
    bundle = [c.public_bytes(serialization.Encoding.PEM) for c in (root, mid)]
    with pytest.raises(EkCertificateError, match="does not chain"):
        tpmkeys.verify_ek_certificate(
            leaf.public_bytes(serialization.Encoding.DER), _pem(ek_key.public_key()), bundle
        )


def test_tcg_style_leaf_with_empty_subject_is_accepted() -> None:
    # TCG EK certificates may have an empty subject (the identity is in the SAN) and no
    # extensions the web PKI would require.
    root_key, root = _self_signed_ca("root")
    ek_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(ek_key.public_key())
        .serial_number(5)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(root_key, hashes.SHA256())
    )
    tpmkeys.verify_ek_certificate(
        leaf.public_bytes(serialization.Encoding.DER),
        _pem(ek_key.public_key()),
        [root.public_bytes(serialization.Encoding.PEM)],
    )


# --- EK templates and the canonical EK identity ----------------------------------------------


def test_the_ek_templates_are_the_tcg_profiles_as_tpm2_pytss_builds_them() -> None:
    # tpm2-pytss builds the TCG EK Credential Profile's templates for tpm2_createek-like use; the
    # broker's table must say the same (their ``unique`` is empty or zeros, which the table does
    # not hold, so only the key-size difference may remain).
    from tpm2_pytss.internal.templates import ek_template

    for template in tpmkeys.EK_TEMPLATES:
        built = ek_template.lookup(template.name).template.publicArea
        differences = tpmkeys._template_differences(built, template)
        assert all("bytes" in d for d in differences), (template.name, differences)


@pytest.mark.parametrize(
    ("vector", "template"),
    [("key-rsa-createek", "L-1"), ("key-ecc-createek", "L-2")],
)
def test_tpm2_createek_publics_match_the_low_templates(vector: str, template: str) -> None:
    pub = tpmkeys.load_public(KEYS[vector].public)
    assert tpmkeys.check_ek_template(pub).name == template
    assert tpmkeys.ek_identity(pub) == pub.spki_sha256


def test_swtpms_certified_p384_ek_matches_the_high_template() -> None:
    vector = CERTS["ekcert-ecc384-swtpm-localca"]
    pub = tpmkeys.load_public(vector.ek_public)
    assert tpmkeys.check_ek_template(pub).name == "H-3"
    cert = x509.load_der_x509_certificate(vector.certificate)
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The identity is the certificate's key.
    assert tpmkeys.ek_identity(pub) == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(
    ("vector", "how", "message"),
    [
        (
            "key-rsa-createek",
            "exponent-65537",
            "EK public does not match the TCG EK template L-1: exponent is written as 65537 "
            "(template: 0, meaning 65537)",
        ),
        (
            "key-rsa-createek",
            "auth-policy",
            "EK public does not match the TCG EK template L-1: authPolicy is not the template's",
        ),
        (
            "key-rsa-createek",
            "user-with-auth",
            "EK public does not match the TCG EK template L-1: objectAttributes set userWithAuth "
            "(0x000300f2, template: 0x000300b2)",
        ),
        (
            "key-ecc-createek",
            "user-with-auth",
            "EK public does not match the TCG EK template L-2: objectAttributes set userWithAuth "
            "(0x000300f2, template: 0x000300b2)",
        ),
    ],
)
def test_a_re_encoded_ek_is_refused_but_keeps_its_identity(
    vector: str, how: str, message: str
) -> None:
    real = tpmkeys.load_public(KEYS[vector].public)
    forged = tpmkeys.load_public(reencode(KEYS[vector].public, how))
    assert forged.key_id != real.key_id  # the old id told them apart
    assert tpmkeys.ek_identity(forged) == tpmkeys.ek_identity(real)
    with pytest.raises(KeyAttributeError) as e:
        tpmkeys.check_ek_attributes(forged)
    assert str(e.value) == message
    # MakeCredential refuses it too.
    with pytest.raises(KeyAttributeError, match="does not match the TCG EK template"):
        tpmkeys.make_credential(
            ek_public=forged.tpm2b_public or b"", ak_name=b"\x00\x0b" + b"\x01" * 32, secret=b"s"
        )


def test_an_ek_must_be_a_tpm_public_for_its_identity(rsa_pem: bytes) -> None:
    with pytest.raises(KeyAttributeError, match="not PEM"):
        tpmkeys.ek_identity(tpmkeys.load_public(rsa_pem))


def test_an_ek_with_a_padded_point_is_refused() -> None:
    parsed, _ = TPM2B_PUBLIC.unmarshal(KEYS["key-ecc-createek"].public)
    # The same point with a leading zero byte on x: the same key, another encoding.
    parsed.publicArea.unique.ecc.x = b"\x00" + bytes(parsed.publicArea.unique.ecc.x)
    short = tpmkeys.load_public(bytes(parsed.marshal()))
    assert short.spki_sha256 == tpmkeys.load_public(KEYS["key-ecc-createek"].public).spki_sha256
    with pytest.raises(KeyAttributeError, match="coordinates are not 32 bytes each"):
        tpmkeys.check_ek_template(short)
