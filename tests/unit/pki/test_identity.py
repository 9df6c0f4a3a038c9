"""SPIFFE ID parsing and reading identities from certificates (ours, SPIRE's, broken ones)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from pki.ca import PrivateKey, create_ca, issue_certificate
from pki.errors import (
    CertificateIdentityError,
    IdentityError,
    MalformedSpiffeIdError,
    PKIError,
    UnsupportedIdentityError,
)
from pki.identity import MAX_NAME_LENGTH, SpiffeId, parse_spiffe_id, spiffe_id_from_certificate
from tests.support import svid as svid_factory


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://cleanroom.local/operator", SpiffeId("cleanroom.local", "operator")),
        ("spiffe://cleanroom.local/broker", SpiffeId("cleanroom.local", "broker")),
        (
            "spiffe://cleanroom.local/party/advertiser",
            SpiffeId("cleanroom.local", "party", "advertiser"),
        ),
        ("spiffe://example.org/sidecar/sc-1", SpiffeId("example.org", "sidecar", "sc-1")),
        ("spiffe://a_b-c.9/party/A.b_C-9", SpiffeId("a_b-c.9", "party", "A.b_C-9")),
        ("spiffe://td/party/...", SpiffeId("td", "party", "...")),
    ],
)
def test_parse_valid(uri: str, expected: SpiffeId) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed == expected
    # Round trip: str() gives back exactly the URI.
    assert str(parsed) == uri


def test_str_forms() -> None:
    assert str(SpiffeId.operator("d")) == "spiffe://d/operator"
    assert str(SpiffeId.party("d", "p")) == "spiffe://d/party/p"
    assert str(SpiffeId.sidecar("d", "s")) == "spiffe://d/sidecar/s"
    assert str(SpiffeId.broker("d")) == "spiffe://d/broker"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "scheme"),
        ("https://cleanroom.local/operator", "scheme"),
        ("SPIFFE://cleanroom.local/operator", "scheme"),
        ("spiffe:/cleanroom.local/operator", "scheme"),
        ("spiffe:///operator", "trust domain is empty"),
        ("spiffe://Cleanroom.local/operator", "lowercase"),
        ("spiffe://clean room/operator", "lowercase"),
        ("spiffe://cleanroom.local:8443/operator", "port"),
        ("spiffe://user@cleanroom.local/operator", "user info"),
        ("spiffe://cleanroom.local/operator?x=1", "query"),
        ("spiffe://cleanroom.local/operator#frag", "fragment"),
        ("spiffe://cleanroom.local/party/adv%20x", "percent"),
        ("spiffe://cleanroom.local/party//adv", "empty path segment"),
        ("spiffe://cleanroom.local/operator/", "empty path segment"),
        ("spiffe://cleanroom.local//operator", "empty path segment"),
        ("spiffe://cleanroom.local/party/..", "dot path segment"),
        ("spiffe://cleanroom.local/party/.", "dot path segment"),
        ("spiffe://cleanroom.local/./operator", "dot path segment"),
        ("spiffe://cleanroom.local/party/adv*", "path segments may contain only"),
        ("spiffe://cleanroom.local/party/adv\u00e9", "path segments may contain only"),
        ("spiffe://" + "a" * 256 + "/operator", "longer than 255"),
        ("spiffe://d/party/" + "a" * 2100, "longer than 2048"),
        ("spiffe://d/party/" + "a" * (MAX_NAME_LENGTH + 1), "longer than 64"),
    ],
)
def test_parse_malformed(uri: str, fragment: str) -> None:
    with pytest.raises(MalformedSpiffeIdError) as e:
        parse_spiffe_id(uri)
    assert fragment in str(e.value)
    # One root error for the whole package.
    assert isinstance(e.value, IdentityError)
    assert isinstance(e.value, PKIError)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cleanroom.local",
        "spiffe://cleanroom.local/",
        "spiffe://cleanroom.local/admin",
        "spiffe://cleanroom.local/party",
        "spiffe://cleanroom.local/sidecar",
        "spiffe://cleanroom.local/party/a/b",
        "spiffe://cleanroom.local/operator/x",
        "spiffe://cleanroom.local/broker/b1",
        "spiffe://cleanroom.local/ns/default/sa/web",
    ],
)
def test_parse_valid_spiffe_but_not_ours(uri: str) -> None:
    # "spiffe://d/" has an empty path segment, which is malformed, not merely unsupported.
    with pytest.raises(IdentityError):
        parse_spiffe_id(uri)
    if not uri.endswith("/"):
        with pytest.raises(UnsupportedIdentityError):
            parse_spiffe_id(uri)


def test_constructor_validates() -> None:
    with pytest.raises(UnsupportedIdentityError):
        SpiffeId("d", "admin")
    with pytest.raises(UnsupportedIdentityError, match="carries no name"):
        SpiffeId("d", "operator", "x")
    with pytest.raises(MalformedSpiffeIdError, match="party name is empty"):
        SpiffeId("d", "party")
    with pytest.raises(MalformedSpiffeIdError):
        SpiffeId("d", "party", "a/b")
    with pytest.raises(MalformedSpiffeIdError):
        SpiffeId("UPPER", "operator")


# --- certificates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> tuple[PrivateKey, x509.Certificate]:
    return create_ca(trust_domain="example.org")


def test_spire_style_svid_is_accepted(root: tuple[PrivateKey, x509.Certificate]) -> None:
    root_key, root_cert = root
    int_key, int_cert = svid_factory.spire_intermediate(
        root_key=root_key, root_cert=root_cert, trust_domain="example.org"
    )
    _, svid = svid_factory.leaf(
        issuer_key=int_key,
        issuer_cert=int_cert,
        uris=["spiffe://example.org/sidecar/sc-7"],
    )
    # The shape is SPIRE's: no CN, EC key, CA:false, digitalSignature, both EKUs.
    assert not svid.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    expected = SpiffeId("example.org", "sidecar", "sc-7")
    assert spiffe_id_from_certificate(svid) == expected
    assert spiffe_id_from_certificate(svid.public_bytes(serialization.Encoding.DER)) == expected
    pem = svid.public_bytes(serialization.Encoding.PEM)
    assert spiffe_id_from_certificate(pem) == expected
    # SPIRE's svid.pem is leaf then chain: the first certificate is the identity.
    chain = pem + int_cert.public_bytes(serialization.Encoding.PEM)
    assert spiffe_id_from_certificate(chain) == expected


def test_our_leaf_carries_exactly_its_id(root: tuple[PrivateKey, x509.Certificate]) -> None:
    key, cert = root
    ident = SpiffeId.party("example.org", "publisher")
    _, leaf = issue_certificate(
        ca_key=key,
        ca_cert=cert,
        spiffe_id=ident,
        dns_names=["pub.example.org"],
        ip_addresses=["10.0.0.1"],
    )
    assert spiffe_id_from_certificate(leaf) == ident


@pytest.mark.parametrize(
    ("uris", "include_san", "message"),
    [
        ([], False, "no subjectAltName"),
        ([], True, "no URI SAN"),
        (["spiffe://example.org/party/a", "spiffe://example.org/party/b"], True, "2 URI SANs"),
        (["spiffe://example.org/party/a", "https://example.org/x"], True, "2 URI SANs"),
        (["https://example.org/party/a"], True, "not a spiffe:// URI"),
        (["urn:uuid:1234"], True, "not a spiffe:// URI"),
    ],
)
def test_certificate_without_single_spiffe_uri(
    root: tuple[PrivateKey, x509.Certificate], uris: list[str], include_san: bool, message: str
) -> None:
    key, cert = root
    # A DNS SAN keeps the "URI SAN missing" case distinct from "no SAN extension at all".
    _, bad = svid_factory.leaf(
        issuer_key=key,
        issuer_cert=cert,
        uris=uris,
        dns_names=["host.example.org"] if include_san and not uris else (),
        include_san=include_san,
    )
    with pytest.raises(CertificateIdentityError, match=message):
        spiffe_id_from_certificate(bad)


def test_malformed_spiffe_uri_in_certificate(root: tuple[PrivateKey, x509.Certificate]) -> None:
    key, cert = root
    _, bad = svid_factory.leaf(
        issuer_key=key,
        issuer_cert=cert,
        uris=["spiffe://example.org/party/../operator"],
    )
    with pytest.raises(MalformedSpiffeIdError):
        spiffe_id_from_certificate(bad)


def test_ca_certificate_is_not_an_identity(root: tuple[PrivateKey, x509.Certificate]) -> None:
    key, cert = root
    # Our CA carries spiffe://example.org; a CA with a principal's URI is refused too.
    with pytest.raises(CertificateIdentityError, match="CA certificate"):
        spiffe_id_from_certificate(cert)
    _, ca_like = svid_factory.leaf(
        issuer_key=key,
        issuer_cert=cert,
        uris=["spiffe://example.org/operator"],
        ca=True,
    )
    with pytest.raises(CertificateIdentityError, match="CA certificate"):
        spiffe_id_from_certificate(ca_like)


def test_garbage_bytes_are_refused() -> None:
    with pytest.raises(CertificateIdentityError, match=r"not a valid X\.509"):
        spiffe_id_from_certificate(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CertificateIdentityError, match=r"not a valid X\.509"):
        spiffe_id_from_certificate(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
