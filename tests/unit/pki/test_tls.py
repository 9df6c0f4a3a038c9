"""Reading PEM files, building gRPC credentials, and offline certificate checks."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from pki.ca import (
    PrivateKey,
    cert_to_pem,
    create_ca,
    init_pki,
    issue_certificate,
)
from pki.errors import (
    CertificateCheckError,
    CertificateExpiredError,
    CertificateFileError,
    CertificateNotYetValidError,
    KeyMismatchError,
    UntrustedCertificateError,
)
from pki.identity import SpiffeId
from pki.tls import (
    TlsFiles,
    channel_credentials,
    check_certificate,
    check_files,
    load_certificates,
    load_pem,
    load_private_key,
    server_credentials,
)
from tests.support import svid as svid_factory

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> tuple[PrivateKey, x509.Certificate]:
    return create_ca(trust_domain="cleanroom.local")


def _issue(
    ca: tuple[PrivateKey, x509.Certificate],
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ident: SpiffeId | None = None,
    server: bool = False,
) -> x509.Certificate:
    return issue_certificate(
        ca_key=ca[0],
        ca_cert=ca[1],
        spiffe_id=ident or SpiffeId.party("cleanroom.local", "advertiser"),
        not_before=not_before,
        not_after=not_after,
        server=server,
        client=True,
        dns_names=["localhost"] if server else (),
    )[1]


# --- files ----------------------------------------------------------------------------------


def test_load_pem_errors(tmp_path: Path) -> None:
    with pytest.raises(CertificateFileError, match="does not exist"):
        load_pem(tmp_path / "missing.crt")
    with pytest.raises(CertificateFileError, match="not a regular file"):
        load_pem(tmp_path)
    (tmp_path / "der.crt").write_bytes(b"\x30\x82\x01\x00garbage")
    with pytest.raises(CertificateFileError, match="not a PEM file"):
        load_pem(tmp_path / "der.crt")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CertificateFileError, match="not a PEM file"):
        load_pem(tmp_path / "empty")


def test_load_certificates_and_keys(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, parties=["p"], sidecars=[])
    pair = layout.cert_and_key("party", "p")
    assert load_pem(pair.cert).startswith(b"-----BEGIN CERTIFICATE-----")
    assert len(load_certificates(layout.ca_cert)) == 1
    key = load_private_key(pair.key)
    assert key.public_key() == load_certificates(pair.cert)[0].public_key()
    with pytest.raises(CertificateFileError, match="holds a private key, not a certificate"):
        load_certificates(pair.key)
    with pytest.raises(CertificateFileError, match="not an unencrypted PEM private key"):
        load_private_key(pair.cert)
    bad = tmp_path / "bad.crt"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateFileError, match="does not hold valid PEM certificates"):
        load_certificates(bad)


def test_private_key_errors_do_not_leak_key_bytes(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, parties=[], sidecars=[])
    pem = layout.ca_key.read_bytes()
    # A truncated key: the message must name the file, not quote any of its content.
    broken = tmp_path / "broken.key"
    broken.write_bytes(pem[: len(pem) // 2] + b"\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateFileError) as e:
        load_private_key(broken)
    body = b"".join(pem.splitlines()[1:-1]).decode()
    for i in range(0, len(body) - 16, 16):
        assert body[i : i + 16] not in str(e.value)


def test_credentials_build_and_detect_mismatch(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, parties=["p"], sidecars=[])
    broker = layout.cert_and_key("broker")
    party = layout.cert_and_key("party", "p")
    creds = server_credentials(cert_file=broker.cert, key_file=broker.key, ca_file=layout.ca_cert)
    assert isinstance(creds, grpc.ServerCredentials)
    ch = channel_credentials(cert_file=party.cert, key_file=party.key, ca_file=layout.ca_cert)
    assert isinstance(ch, grpc.ChannelCredentials)
    with pytest.raises(KeyMismatchError, match="is not the private key"):
        server_credentials(cert_file=broker.cert, key_file=party.key, ca_file=layout.ca_cert)
    with pytest.raises(CertificateFileError, match="does not exist"):
        channel_credentials(cert_file=party.cert, key_file=party.key, ca_file=tmp_path / "nope.crt")
    with pytest.raises(CertificateFileError, match="holds a private key"):
        channel_credentials(cert_file=party.cert, key_file=party.key, ca_file=party.key)


# --- check_certificate ----------------------------------------------------------------------


def test_check_valid(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    cert = _issue(ca)
    ident = check_certificate(cert_to_pem(cert), cert_to_pem(ca[1]))
    assert ident == SpiffeId.party("cleanroom.local", "advertiser")
    assert check_certificate(cert, [ca[1]], usage="client") == ident
    with pytest.raises(UntrustedCertificateError, match="TLS server use"):
        check_certificate(cert, [ca[1]], usage="server")


def test_check_expired(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    expired = _issue(ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    with pytest.raises(CertificateExpiredError) as e:
        check_certificate(expired, ca[1])
    date = (NOW - DAY).strftime("%Y-%m-%d")
    assert f"expired on {date}" in str(e.value)
    assert "spiffe://cleanroom.local/party/advertiser" in str(e.value)
    # Five days ago the leaf was within its window but the CA (made today) was not yet.
    with pytest.raises(CertificateNotYetValidError, match=r"CA certificate .* not valid before"):
        check_certificate(expired, ca[1], now=NOW - 5 * DAY)


def test_check_not_yet_valid(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    future = _issue(ca, not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    with pytest.raises(CertificateNotYetValidError, match="not valid before"):
        check_certificate(future, ca[1])
    check_certificate(future, ca[1], now=NOW + 2 * DAY)


def test_check_ca_expired() -> None:
    ca_key, ca_cert = create_ca(trust_domain="cleanroom.local", valid_days=2)
    # A leaf that outlives its CA: at a time between the two, the CA is the one to blame.
    leaf = _issue((ca_key, ca_cert), not_after=NOW + 30 * DAY)
    with pytest.raises(CertificateExpiredError, match=r"CA certificate .* expired on"):
        check_certificate(leaf, ca_cert, now=NOW + 10 * DAY)


def test_check_wrong_ca(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    other = create_ca(trust_domain="cleanroom.local")
    cert = _issue(other)
    with pytest.raises(UntrustedCertificateError, match="not issued by a CA in the bundle"):
        check_certificate(cert, ca[1])


def test_expired_same_name_ca_is_not_blamed(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    # An old, expired CA of the same name that did not sign the leaf must not be reported as
    # "expired": the leaf is simply untrusted.
    _, old_ca = create_ca(trust_domain="cleanroom.local", valid_days=1)
    stranger = _issue(create_ca(trust_domain="cleanroom.local"))
    with pytest.raises(UntrustedCertificateError):
        check_certificate(stranger, [old_ca, ca[1]], now=NOW + 5 * DAY)


def test_check_rotation_bundle(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    new_ca = create_ca(trust_domain="cleanroom.local")
    bundle = cert_to_pem(ca[1]) + cert_to_pem(new_ca[1])
    check_certificate(_issue(ca), bundle)
    check_certificate(_issue(new_ca), bundle)
    with pytest.raises(UntrustedCertificateError):
        check_certificate(_issue(new_ca), cert_to_pem(ca[1]))


def test_check_spire_chain(ca: tuple[PrivateKey, x509.Certificate]) -> None:
    int_key, int_cert = svid_factory.spire_intermediate(
        root_key=ca[0], root_cert=ca[1], trust_domain="cleanroom.local"
    )
    _, svid = svid_factory.leaf(
        issuer_key=int_key, issuer_cert=int_cert, uris=["spiffe://cleanroom.local/party/x"]
    )
    chain = cert_to_pem(svid) + cert_to_pem(int_cert)
    assert check_certificate(chain, ca[1], usage="client") == SpiffeId.party("cleanroom.local", "x")
    # Without the intermediate there is no path to the root.
    with pytest.raises(UntrustedCertificateError):
        check_certificate(svid, ca[1])


def test_check_files(tmp_path: Path) -> None:
    layout = init_pki(tmp_path, parties=["p"], sidecars=[])
    broker = layout.cert_and_key("broker")
    files = TlsFiles(cert_file=broker.cert, key_file=broker.key, ca_file=layout.ca_cert)
    assert check_files(files, usage="server") == SpiffeId.broker("cleanroom.local")
    party = layout.cert_and_key("party", "p")
    with pytest.raises(KeyMismatchError):
        check_files(TlsFiles(cert_file=broker.cert, key_file=party.key, ca_file=layout.ca_cert))
    with pytest.raises(CertificateCheckError):
        check_files(
            TlsFiles(cert_file=party.cert, key_file=party.key, ca_file=layout.ca_cert),
            usage="server",
        )
