"""A small certificate authority for the clean room's mTLS identities.

``init_pki`` writes a CA and one certificate per principal into a directory; ``issue_into``
adds (or rotates) one identity later with the CA found there. Leaf certificates follow the
X.509-SVID profile (the SPIFFE ID as the only URI SAN, CA:false), so they are interchangeable
with SPIRE's. Private keys are PKCS#8 PEM files created with mode 0600 from the first byte.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.errors import (
    CertificateFileError,
    IdentityError,
    IssuanceError,
    PKIExistsError,
    PKIFileError,
)
from pki.identity import KINDS, NAMED_KINDS, SpiffeId, validate_name, validate_trust_domain

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyAlgorithm = Literal["ec-p256", "ec-p384", "rsa-3072"]

DEFAULT_TRUST_DOMAIN: Final = "cleanroom.local"
CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"
KEY_FILE_MODE: Final = 0o600
CERT_FILE_MODE: Final = 0o644
#: Certificates are backdated slightly so that a peer whose clock runs a little behind does
#: not reject a certificate issued a moment ago.
CLOCK_SKEW: Final = dt.timedelta(minutes=5)


class CertKeyPair(NamedTuple):
    """Paths of one identity's certificate and private key files."""

    cert: Path
    key: Path


def file_stem(kind: str, name: str = "") -> str:
    """The file name without extension for an identity: ``party-<name>``, ``broker``, ...

    Raises:
        IdentityError: unknown kind, or a name that is missing, superfluous or invalid.
    """
    # Constructing a SpiffeId validates kind and name with the same rules as the URI.
    SpiffeId(DEFAULT_TRUST_DOMAIN, kind, name)
    return f"{kind}-{name}" if kind in NAMED_KINDS else kind


@dataclass(frozen=True)
class PkiLayout:
    """Where ``init_pki`` (or ``issue_into``) put the CA and each identity's files."""

    directory: Path
    trust_domain: str
    identities: tuple[SpiffeId, ...] = field(default=())

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (the trust bundle to hand to every peer)."""
        return self.directory / CA_CERT_FILE

    @property
    def ca_key(self) -> Path:
        """The CA private key (keep it offline once the certificates are issued)."""
        return self.directory / CA_KEY_FILE

    def cert_and_key(self, kind: str, name: str = "") -> CertKeyPair:
        """Paths of the certificate and key of the identity ``kind``/``name``.

        Raises:
            IdentityError: unknown kind, or a name that is missing, superfluous or invalid.
        """
        stem = file_stem(kind, name)
        return CertKeyPair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")

    def paths_for(self, identity: SpiffeId) -> CertKeyPair:
        """Paths of the certificate and key of ``identity``."""
        return self.cert_and_key(identity.kind, identity.name)

    def files(self) -> tuple[Path, ...]:
        """Every file of this layout: CA certificate and key, then each identity's pair."""
        out = [self.ca_cert, self.ca_key]
        for ident in self.identities:
            out.extend(self.paths_for(ident))
        return tuple(out)


# --- keys and certificates ------------------------------------------------------------------


def generate_key(algorithm: KeyAlgorithm = "ec-p256") -> PrivateKey:
    """A fresh private key: EC P-256 (default, like SPIRE), EC P-384 or RSA-3072.

    Raises:
        IssuanceError: unknown algorithm.
    """
    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise IssuanceError(f"unknown key algorithm {algorithm!r}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def certificate_builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ca: bool,
    path_length: int | None = None,
    serial_number: int | None = None,
) -> x509.CertificateBuilder:
    """The fields every certificate starts with: names, key, serial, validity, basicConstraints.

    The CA, leaf and test certificates of the project differ only in the extensions added
    after these, so they all start here (a random serial unless ``serial_number`` is given).
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number() if serial_number is None else serial_number)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A keyUsage extension with the given bits set and every other one clear."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def self_signed_ca_certificate(
    key: PrivateKey,
    common_name: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None = None,
) -> x509.Certificate:
    """A plain self-signed CA certificate (subject ``CN=<common_name>``, keyCertSign and cRLSign,
    a subject key identifier), for throwaway CAs such as a test double's TLS CA.

    The clean room's own CA is :func:`create_ca`, which adds the trust domain.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        certificate_builder(
            subject=name,
            issuer=name,
            public_key=key.public_key(),
            not_before=not_before,
            not_after=not_after,
            ca=True,
            path_length=path_length,
        )
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def create_ca(
    *,
    trust_domain: str,
    valid_days: int = 3650,
    key_algorithm: KeyAlgorithm = "ec-p256",
) -> tuple[PrivateKey, x509.Certificate]:
    """Creates a self-signed CA for ``trust_domain``.

    The CA has basicConstraints CA:true with pathlen 1 (so an intermediate, as SPIRE uses, may
    sit below it), keyUsage keyCertSign and cRLSign, subject CN ``cleanroom CA <trust domain>``
    and, as SPIFFE signing certificates do, the trust domain's SPIFFE ID ``spiffe://<domain>``
    as URI SAN (``issue_into`` reads the trust domain from it).

    Raises:
        MalformedSpiffeIdError: the trust domain is not valid.
        IssuanceError: ``valid_days`` is not positive, or an unknown key algorithm.
    """
    validate_trust_domain(trust_domain)
    if valid_days <= 0:
        raise IssuanceError("valid_days must be positive")
    key = generate_key(key_algorithm)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cleanroom"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cleanroom CA {trust_domain}"[:64]),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        certificate_builder(
            subject=name,
            issuer=name,
            public_key=key.public_key(),
            not_before=now - CLOCK_SKEW,
            not_after=now + dt.timedelta(days=valid_days),
            ca=True,
            path_length=1,
        )
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def trust_domain_of_ca(ca_cert: x509.Certificate) -> str:
    """The trust domain of a CA made by :func:`create_ca` (from its ``spiffe://<domain>`` SAN).

    Raises:
        IdentityError: the certificate carries no trust-domain SPIFFE ID.
    """
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("CA certificate carries no trust-domain SPIFFE ID") from None
    domains = [
        u[len("spiffe://") :]
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    if len(domains) != 1 or "/" in domains[0]:
        raise IdentityError("CA certificate carries no single trust-domain SPIFFE ID")
    return validate_trust_domain(domains[0])


def issue_certificate(
    *,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    spiffe_id: SpiffeId,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    valid_days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    server: bool = False,
    client: bool = True,
    key_algorithm: KeyAlgorithm = "ec-p256",
) -> tuple[PrivateKey, x509.Certificate]:
    """Issues a leaf certificate (X.509-SVID profile) for ``spiffe_id`` signed by the CA.

    The leaf has the SPIFFE ID as its only URI SAN, plus ``dns_names`` and ``ip_addresses`` as
    DNS and IP SANs (a TLS server needs one matching the name its clients dial), CA:false,
    keyUsage digitalSignature (and keyEncipherment for RSA), and EKU clientAuth and/or
    serverAuth. Without ``not_after`` the validity ends ``valid_days`` from now but never after
    the CA's own; explicit ``not_before``/``not_after`` are taken as given (tests use them to
    make expired certificates).

    Raises:
        IssuanceError: neither server nor client, a bad IP address or DNS name, a validity
            window that ends before it starts, or a CA key that does not match the CA.
        IdentityError: ``spiffe_id`` belongs to another trust domain than the CA's.
    """
    if not (server or client):
        raise IssuanceError("a certificate must be issued for server or client use (or both)")
    if ca_cert.public_key() != ca_key.public_key():
        raise IssuanceError("the CA private key does not match the CA certificate")
    try:
        ca_domain: str | None = trust_domain_of_ca(ca_cert)
    except IdentityError:
        ca_domain = None  # A foreign CA (e.g. a SPIRE upstream) need not carry one.
    if ca_domain is not None and ca_domain != spiffe_id.trust_domain:
        raise IdentityError(
            f"the CA belongs to trust domain {ca_domain!r}, not {spiffe_id.trust_domain!r}"
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id.uri)]
    for dns in dns_names:
        if not dns or any(c.isspace() or c in "/:@" for c in dns):
            raise IssuanceError(f"invalid DNS name {dns!r}")
        try:
            sans.append(x509.DNSName(dns))
        except ValueError as e:  # non-ASCII names must be given in their A-label form
            raise IssuanceError(f"invalid DNS name {dns!r}: {e}") from e
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise IssuanceError(f"invalid IP address {ip!r}") from e

    now = _now()
    start = not_before if not_before is not None else now - CLOCK_SKEW
    if not_after is not None:
        end = not_after
    else:
        if valid_days <= 0:
            raise IssuanceError("valid_days must be positive")
        end = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise IssuanceError("the certificate's validity would end before it starts")

    key = generate_key(key_algorithm)
    usages = []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    common_name = f"{spiffe_id.kind} {spiffe_id.name}".strip()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cleanroom"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    try:
        cert = (
            certificate_builder(
                subject=subject,
                issuer=ca_cert.subject,
                public_key=key.public_key(),
                not_before=start,
                not_after=end,
                ca=False,
            )
            .add_extension(
                key_usage(digital_signature=True, key_encipherment=is_rsa), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
    except ValueError as e:
        raise IssuanceError(f"cannot issue certificate for {spiffe_id}: {e}") from e
    return key, cert


# --- files ----------------------------------------------------------------------------------


def key_to_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what gRPC and SPIRE's tooling read)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Writes ``data`` to ``path`` through a temporary file that is created with ``mode``.

    The temporary file is opened with ``os.open(..., mode)`` and ``O_EXCL`` so it is never more
    permissive than ``mode``, even for an instant, and even when it replaces an older file whose
    mode was wider (an ``O_TRUNC`` rewrite would keep the old mode). The rename is atomic, so a
    reader sees the old file or the new one, never half of one.

    Raises:
        PKIFileError: the file cannot be written.
    """
    directory = path.parent
    try:
        for _ in range(100):
            tmp = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 100 collisions of 48 random bits
            raise PKIFileError(f"cannot create a temporary file in {directory}")
        try:
            # The umask may have cleared bits of ``mode``; set it exactly.
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise PKIFileError(f"cannot write {path}: {e.strerror or e}") from e


def _write_pair(pair: CertKeyPair, key: PrivateKey, cert: x509.Certificate) -> None:
    # The key first: a certificate file without its key is a clearer failure than the reverse.
    write_file_atomic(pair.key, key_to_pem(key), mode=KEY_FILE_MODE)
    write_file_atomic(pair.cert, cert_to_pem(cert), mode=CERT_FILE_MODE)


def _ensure_directory(path: Path) -> None:
    try:
        # A new PKI directory is private to its owner: it holds the CA key.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PKIFileError(f"cannot create directory {path}: {e.strerror or e}") from e
    if not path.is_dir():
        raise PKIFileError(f"{path} is not a directory")


def _require_broker_address(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> None:
    # Clients check the broker's certificate against the name they dial, so a broker
    # certificate without any DNS or IP SAN could never be used.
    if not dns_names and not ip_addresses:
        raise IssuanceError("a broker certificate needs at least one DNS name or IP address")


def _default_server_client(kind: str) -> tuple[bool, bool]:
    # The broker serves the attestation and admin APIs and may also call out; every other
    # principal is a client of the broker.
    return (True, True) if kind == "broker" else (False, True)


def init_pki(
    out_dir: Path,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    parties: Sequence[str] = ("advertiser", "publisher"),
    sidecars: Sequence[str] = ("sidecar-1",),
    broker_dns: Sequence[str] = ("localhost",),
    broker_ips: Sequence[str] = ("127.0.0.1",),
    force: bool = False,
    ca_valid_days: int = 3650,
    valid_days: int = 365,
) -> PkiLayout:
    """Creates a CA and the clean room's certificates in ``out_dir``.

    Writes ``ca.crt``/``ca.key``, ``broker.crt``/``.key`` (server and client, with the broker
    DNS and IP SANs), ``operator.crt``/``.key``, ``party-<name>.crt``/``.key`` per party and
    ``sidecar-<id>.crt``/``.key`` per sidecar. Key files have mode 0600; a newly created
    directory has mode 0700. All names are validated before anything is written.

    Raises:
        PKIExistsError: ``out_dir`` already holds a CA certificate or key and ``force`` is
            false.
        IdentityError: an invalid trust domain, party name or sidecar id, or a duplicate.
        IssuanceError: an invalid broker DNS name or IP address, or bad validity.
        PKIFileError: a file or the directory cannot be written.
    """
    validate_trust_domain(trust_domain)
    _require_broker_address(broker_dns, broker_ips)
    identities: list[SpiffeId] = [SpiffeId.broker(trust_domain), SpiffeId.operator(trust_domain)]
    for kind, names in (("party", parties), ("sidecar", sidecars)):
        seen: set[str] = set()
        for name in names:
            validate_name(kind, name)
            if name in seen:
                raise IdentityError(f"{kind} {name!r} is listed twice")
            seen.add(name)
            identities.append(SpiffeId(trust_domain, kind, name))
    layout = PkiLayout(directory=out_dir, trust_domain=trust_domain, identities=tuple(identities))
    existing = [p for p in (layout.ca_cert, layout.ca_key) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise PKIExistsError(
            f"{existing[0]} already exists; refusing to replace the CA (use --force to replace "
            "it and re-issue every certificate)"
        )

    ca_key, ca_cert = create_ca(trust_domain=trust_domain, valid_days=ca_valid_days)
    # Issue everything in memory first so that a bad SAN fails before any file changes.
    issued: list[tuple[CertKeyPair, PrivateKey, x509.Certificate]] = []
    for ident in identities:
        server, client = _default_server_client(ident.kind)
        is_broker = ident.kind == "broker"
        key, cert = issue_certificate(
            ca_key=ca_key,
            ca_cert=ca_cert,
            spiffe_id=ident,
            dns_names=broker_dns if is_broker else (),
            ip_addresses=broker_ips if is_broker else (),
            valid_days=valid_days,
            server=server,
            client=client,
        )
        issued.append((layout.paths_for(ident), key, cert))

    _ensure_directory(out_dir)
    _write_pair(CertKeyPair(layout.ca_cert, layout.ca_key), ca_key, ca_cert)
    for pair, key, cert in issued:
        _write_pair(pair, key, cert)
    return layout


def load_ca(directory: Path) -> tuple[PrivateKey, x509.Certificate]:
    """Loads ``ca.key`` and ``ca.crt`` from ``directory``.

    Raises:
        CertificateFileError: a file is missing, unreadable or malformed, or the key is not an
            EC or RSA key.
        IssuanceError: the key does not match the certificate.
    """
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    try:
        cert_bytes = cert_path.read_bytes()
        key_bytes = key_path.read_bytes()
    except OSError as e:
        raise CertificateFileError(
            f"cannot read the CA in {directory}: {e.strerror or e} ({e.filename})"
        ) from e
    try:
        cert = x509.load_pem_x509_certificate(cert_bytes)
    except ValueError as e:
        raise CertificateFileError(f"{cert_path} is not a PEM certificate") from e
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as e:
        # Never echo the library's message: it could quote bytes of the key file.
        raise CertificateFileError(f"{key_path} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateFileError(f"{key_path} holds neither an EC nor an RSA key")
    if key.public_key() != cert.public_key():
        raise IssuanceError(f"{key_path} does not belong to {cert_path}")
    return key, cert


def issue_into(
    out_dir: Path,
    *,
    kind: str,
    name: str = "",
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    valid_days: int = 365,
    server: bool | None = None,
    client: bool | None = None,
    force: bool = False,
) -> CertKeyPair:
    """Issues one more identity with the CA in ``out_dir`` (``cleanroom pki issue``).

    The trust domain is the CA's. ``server``/``client`` default to the kind's usual roles (the
    broker both, everyone else client). Re-issuing an existing identity is certificate
    rotation: it needs ``force`` and replaces the pair with a new key under the same SPIFFE ID.

    Raises:
        PKIExistsError: the identity's files exist and ``force`` is false.
        CertificateFileError: the CA files are missing or malformed.
        IdentityError: an unknown kind, or a name that is missing, superfluous or invalid.
        IssuanceError: bad SANs or validity.
        PKIFileError: a file cannot be written.
    """
    if kind == "broker":
        _require_broker_address(dns_names, ip_addresses)
    if kind not in KINDS:
        raise IdentityError(
            f"unknown identity kind {kind!r} (expected one of {', '.join(sorted(KINDS))})"
        )
    ca_key, ca_cert = load_ca(out_dir)
    trust_domain = trust_domain_of_ca(ca_cert)
    ident = SpiffeId(trust_domain, kind, name)
    layout = PkiLayout(directory=out_dir, trust_domain=trust_domain, identities=(ident,))
    pair = layout.paths_for(ident)
    existing = [p for p in pair if p.exists() or p.is_symlink()]
    if existing and not force:
        raise PKIExistsError(f"{existing[0]} already exists (use --force to re-issue {ident})")
    default_server, default_client = _default_server_client(kind)
    key, cert = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=ident,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        valid_days=valid_days,
        server=default_server if server is None else server,
        client=default_client if client is None else client,
    )
    _write_pair(pair, key, cert)
    return pair


__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_TRUST_DOMAIN",
    "CertKeyPair",
    "KeyAlgorithm",
    "PkiLayout",
    "PrivateKey",
    "cert_to_pem",
    "create_ca",
    "file_stem",
    "generate_key",
    "init_pki",
    "issue_certificate",
    "issue_into",
    "key_to_pem",
    "load_ca",
    "trust_domain_of_ca",
    "write_file_atomic",
]
