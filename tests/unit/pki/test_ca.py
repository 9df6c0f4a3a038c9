"""The CA: certificate profiles, the files ``init_pki`` writes, their modes, and overwriting."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.ca import (
    PkiLayout,
    create_ca,
    init_pki,
    issue_certificate,
    issue_into,
    load_ca,
    trust_domain_of_ca,
    write_file_atomic,
)
from pki.errors import (
    IdentityError,
    IssuanceError,
    MalformedSpiffeIdError,
    PKIExistsError,
)
from pki.identity import SpiffeId, spiffe_id_from_certificate
from pki.tls import check_certificate, load_certificates


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0, so only the code's own choice of mode keeps keys private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_create_ca_profile() -> None:
    key, cert = create_ca(trust_domain="example.org", valid_days=10)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "cleanroom CA example.org"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert trust_domain_of_ca(cert) == "example.org"
    length = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=10) <= length <= dt.timedelta(days=10, minutes=10)


def test_create_ca_rejects_bad_domain() -> None:
    with pytest.raises(MalformedSpiffeIdError):
        create_ca(trust_domain="Example.org")


def test_issue_certificate_profile() -> None:
    ca_key, ca_cert = create_ca(trust_domain="example.org")
    ident = SpiffeId.broker("example.org")
    key, cert = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=ident,
        dns_names=["broker.example.org"],
        ip_addresses=["127.0.0.1", "::1"],
        server=True,
        client=True,
    )
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/broker"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert spiffe_id_from_certificate(cert) == ident


def test_client_only_by_default() -> None:
    ca_key, ca_cert = create_ca(trust_domain="d")
    _, cert = issue_certificate(ca_key=ca_key, ca_cert=ca_cert, spiffe_id=SpiffeId.operator("d"))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_validity_capped_by_ca() -> None:
    ca_key, ca_cert = create_ca(trust_domain="d", valid_days=30)
    _, cert = issue_certificate(
        ca_key=ca_key, ca_cert=ca_cert, spiffe_id=SpiffeId.operator("d"), valid_days=365
    )
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_issue_certificate_refusals() -> None:
    ca_key, ca_cert = create_ca(trust_domain="d")
    other_key, _ = create_ca(trust_domain="d")
    ident = SpiffeId.operator("d")
    with pytest.raises(IssuanceError, match="server or client"):
        issue_certificate(
            ca_key=ca_key, ca_cert=ca_cert, spiffe_id=ident, server=False, client=False
        )
    with pytest.raises(IssuanceError, match="does not match"):
        issue_certificate(ca_key=other_key, ca_cert=ca_cert, spiffe_id=ident)
    with pytest.raises(IdentityError, match="trust domain"):
        issue_certificate(ca_key=ca_key, ca_cert=ca_cert, spiffe_id=SpiffeId.operator("e"))
    with pytest.raises(IssuanceError, match="IP address"):
        issue_certificate(ca_key=ca_key, ca_cert=ca_cert, spiffe_id=ident, ip_addresses=["1.2"])
    with pytest.raises(IssuanceError, match="DNS name"):
        issue_certificate(ca_key=ca_key, ca_cert=ca_cert, spiffe_id=ident, dns_names=["a b"])
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(IssuanceError, match="end before it starts"):
        issue_certificate(
            ca_key=ca_key,
            ca_cert=ca_cert,
            spiffe_id=ident,
            not_before=now,
            not_after=now - dt.timedelta(seconds=1),
        )


# --- init_pki -------------------------------------------------------------------------------


EXPECTED_FILES = {
    "ca.crt",
    "ca.key",
    "broker.crt",
    "broker.key",
    "operator.crt",
    "operator.key",
    "party-advertiser.crt",
    "party-advertiser.key",
    "party-publisher.crt",
    "party-publisher.key",
    "sidecar-sidecar-1.crt",
    "sidecar-sidecar-1.key",
}


def test_init_pki_writes_the_layout(tmp_path: Path, permissive_umask: None) -> None:
    out = tmp_path / "pki"
    layout = init_pki(out)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert {p.name for p in layout.files()} == EXPECTED_FILES
    assert _mode(out) == 0o700
    for path in out.iterdir():
        expected_mode = 0o600 if path.suffix == ".key" else 0o644
        assert _mode(path) == expected_mode, path.name

    ca = load_certificates(layout.ca_cert)
    assert len(ca) == 1
    for ident in layout.identities:
        cert_path = layout.paths_for(ident).cert
        # Each certificate verifies against the CA and names its own identity.
        assert check_certificate(cert_path.read_bytes(), ca) == ident
    broker = load_certificates(layout.cert_and_key("broker").cert)[0]
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert layout.cert_and_key("party", "advertiser").key == out / "party-advertiser.key"
    assert {str(i) for i in layout.identities} == {
        "spiffe://cleanroom.local/broker",
        "spiffe://cleanroom.local/operator",
        "spiffe://cleanroom.local/party/advertiser",
        "spiffe://cleanroom.local/party/publisher",
        "spiffe://cleanroom.local/sidecar/sidecar-1",
    }


def test_init_pki_custom_names(tmp_path: Path) -> None:
    layout = init_pki(
        tmp_path,
        trust_domain="example.org",
        parties=["bank", "retailer", "insurer"],
        sidecars=["tee-a", "tee-b"],
        broker_dns=["broker.example.org"],
        broker_ips=[],
    )
    assert isinstance(layout, PkiLayout)
    assert (tmp_path / "party-insurer.key").exists()
    assert (tmp_path / "sidecar-tee-b.crt").exists()
    assert not (tmp_path / "party-advertiser.crt").exists()
    cert = load_certificates(tmp_path / "sidecar-tee-b.crt")[0]
    assert spiffe_id_from_certificate(cert) == SpiffeId.sidecar("example.org", "tee-b")


def test_init_pki_refuses_to_overwrite_ca(tmp_path: Path) -> None:
    init_pki(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(PKIExistsError, match=r"ca\.crt already exists"):
        init_pki(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # A CA key alone (certificate lost) is still a CA not to be clobbered.
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(PKIExistsError, match=r"ca\.key"):
        init_pki(tmp_path)


def test_init_pki_force_replaces_and_keeps_keys_private(
    tmp_path: Path, permissive_umask: None
) -> None:
    init_pki(tmp_path)
    old_ca = (tmp_path / "ca.crt").read_bytes()
    # Widen an old key's mode: an O_TRUNC rewrite would keep 0644; the atomic replace must not.
    (tmp_path / "party-advertiser.key").chmod(0o644)
    init_pki(tmp_path, force=True)
    assert (tmp_path / "ca.crt").read_bytes() != old_ca
    for path in tmp_path.iterdir():
        if path.suffix == ".key":
            assert _mode(path) == 0o600, path.name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"parties": ["a/b"]}, MalformedSpiffeIdError),
        ({"parties": [".."]}, MalformedSpiffeIdError),
        ({"parties": ["x", "x"]}, IdentityError),
        ({"sidecars": [""]}, MalformedSpiffeIdError),
        ({"trust_domain": "Bad"}, MalformedSpiffeIdError),
        ({"broker_ips": ["300.1.1.1"]}, IssuanceError),
        ({"broker_dns": [], "broker_ips": []}, IssuanceError),
    ],
)
def test_init_pki_validates_before_writing(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception]
) -> None:
    out = tmp_path / "pki"
    with pytest.raises(error):
        init_pki(out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()


def test_issue_into_adds_and_rotates(tmp_path: Path, permissive_umask: None) -> None:
    layout = init_pki(tmp_path, trust_domain="example.org", parties=["a"], sidecars=[])
    pair = issue_into(tmp_path, kind="party", name="late-joiner")
    assert _mode(pair.key) == 0o600
    ca = load_certificates(layout.ca_cert)
    assert check_certificate(pair.cert.read_bytes(), ca) == SpiffeId.party(
        "example.org", "late-joiner"
    )
    with pytest.raises(PKIExistsError, match="party-late-joiner"):
        issue_into(tmp_path, kind="party", name="late-joiner")
    old_cert = pair.cert.read_bytes()
    old_key = pair.key.read_bytes()
    rotated = issue_into(tmp_path, kind="party", name="late-joiner", force=True)
    assert rotated == pair
    assert pair.cert.read_bytes() != old_cert and pair.key.read_bytes() != old_key
    assert check_certificate(pair.cert.read_bytes(), ca) == SpiffeId.party(
        "example.org", "late-joiner"
    )


def test_issue_into_broker_and_kinds(tmp_path: Path) -> None:
    init_pki(tmp_path, parties=[], sidecars=[])
    with pytest.raises(IssuanceError, match="DNS name or IP"):
        issue_into(tmp_path, kind="broker", force=True)
    pair = issue_into(tmp_path, kind="broker", dns_names=["b.internal"], force=True)
    cert = load_certificates(pair.cert)[0]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    with pytest.raises(IdentityError, match="unknown identity kind"):
        issue_into(tmp_path, kind="admin")
    with pytest.raises(IdentityError, match="carries no name"):
        issue_into(tmp_path, kind="operator", name="x", force=True)


def test_issue_into_without_ca(tmp_path: Path) -> None:
    from pki.errors import CertificateFileError

    with pytest.raises(CertificateFileError, match="cannot read the CA"):
        issue_into(tmp_path, kind="operator")


def test_load_ca_detects_mismatch(tmp_path: Path) -> None:
    init_pki(tmp_path, parties=[], sidecars=[])
    # Put the operator's key where the CA key belongs.
    (tmp_path / "ca.key").write_bytes((tmp_path / "operator.key").read_bytes())
    with pytest.raises(IssuanceError, match="does not belong"):
        load_ca(tmp_path)


def test_write_file_atomic_never_wider(tmp_path: Path, permissive_umask: None) -> None:
    target = tmp_path / "k"
    target.write_bytes(b"old")
    target.chmod(0o666)
    write_file_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
