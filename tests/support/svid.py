"""Certificates shaped like SPIRE's, and deliberately broken ones, built with cryptography.

SPIRE issues X.509-SVIDs from an intermediate signing CA: an EC P-256 leaf whose subject is
``C=US, O=SPIRE`` plus a unique identifier (no CN), whose only SAN is the SPIFFE ID URI, with
keyUsage digitalSignature/keyEncipherment/keyAgreement, EKU serverAuth+clientAuth and
CA:false. These builders reproduce that profile so the tests exercise what SPIRE hands out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.ca import PrivateKey, certificate_builder, key_usage


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _spire_ca(
    *,
    subject: x509.Name,
    trust_domain: str,
    path_length: int | None,
    issuer: tuple[PrivateKey, x509.Certificate] | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SPIRE-style CA certificate: self-signed without ``issuer``, else signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key: PrivateKey = key if issuer is None else issuer[0]
    now = _now()
    builder = (
        certificate_builder(
            subject=subject,
            issuer=subject if issuer is None else issuer[1].subject,
            public_key=key.public_key(),
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(days=1),
            ca=True,
            path_length=path_length,
        )
        .add_extension(
            key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key()), False
        )
    return key, builder.sign(signer_key, hashes.SHA256())


def spire_root(trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed root as SPIRE makes one (``C=US, O=SPIFFE`` and a serial number, the trust
    domain's SPIFFE ID as URI SAN, no path length limit)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            # Sets the root's subject apart from the intermediate's (C=US, O=SPIFFE).
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(x509.random_serial_number())),
        ]
    )
    return _spire_ca(subject=subject, trust_domain=trust_domain, path_length=None, issuer=None)


def spire_intermediate(
    *, root_key: PrivateKey, root_cert: x509.Certificate, trust_domain: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SPIRE-style intermediate signing CA under ``root_cert`` (pathlen 0)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
        ]
    )
    return _spire_ca(
        subject=subject,
        trust_domain=trust_domain,
        path_length=0,
        issuer=(root_key, root_cert),
    )


def leaf(
    *,
    issuer_key: PrivateKey,
    issuer_cert: x509.Certificate,
    uris: Sequence[str],
    dns_names: Sequence[str] = (),
    subject: x509.Name | None = None,
    ca: bool = False,
    include_san: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SPIRE-style leaf (EC P-256, no CN) with the given URI SANs (zero, one or several)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    if subject is None:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
                x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, "4f1e5c4d0a0b"),
            ]
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    builder = (
        certificate_builder(
            subject=subject,
            issuer=issuer_cert.subject,
            public_key=key.public_key(),
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(hours=1),
            ca=ca,
        )
        .add_extension(
            key_usage(
                digital_signature=True, key_encipherment=True, key_agreement=True, key_cert_sign=ca
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if include_san and sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())
