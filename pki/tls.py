"""gRPC mutual-TLS helpers: credentials from PEM files, and the peer's SPIFFE identity.

Servers built with :func:`server_credentials` demand and verify a client certificate during
the handshake, so by the time a handler runs the peer holds a certificate from the trusted CA
bundle; :func:`peer_identity` then names the peer by the SPIFFE ID in that certificate.
:func:`check_certificate` repeats the handshake's CA and clock checks offline so that tools can
say "certificate expired on ..." instead of a bare handshake failure.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.errors import (
    CertificateExpiredError,
    CertificateFileError,
    CertificateNotYetValidError,
    KeyMismatchError,
    PeerIdentityError,
    PKIError,
    UntrustedCertificateError,
)
from pki.identity import SpiffeId, spiffe_id_from_certificate

if TYPE_CHECKING:
    import grpc

    from pki.ca import PrivateKey

log = logging.getLogger(__name__)

_PEM_MARKER = b"-----BEGIN "
#: A PEM file larger than this is not a certificate chain or key; refuse rather than parse it.
MAX_PEM_FILE_SIZE = 1 << 20


class AuthContextHolder(Protocol):
    """Anything with gRPC's ``auth_context()``: sync and asyncio servicer contexts alike."""

    def auth_context(self) -> Mapping[str, object]: ...


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The three files one mTLS endpoint needs: its certificate (chain), key and CA bundle."""

    cert_file: Path
    key_file: Path
    ca_file: Path


# --- reading files --------------------------------------------------------------------------


def read_bounded_file(path: Path, *, max_size: int, kind: str, error: type[PKIError]) -> bytes:
    """The bytes of a regular file of at most ``max_size`` bytes (``kind`` names what it should
    be, for the message).

    Raises:
        error: the file is missing, unreadable, not a regular file or too large.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is not a regular file")
        if st.st_size > max_size:
            raise error(f"{path} is too large to be {kind}")
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except PermissionError:
        raise error(f"{path} is not readable (permission denied)") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e


def load_pem(path: Path | str) -> bytes:
    """Reads a PEM file (certificate, chain, bundle or key) and returns its bytes.

    Only the framing is checked here; :func:`load_certificates` and :func:`load_private_key`
    parse the content.

    Raises:
        CertificateFileError: the file is missing, unreadable, not a regular file, too large,
            or holds no PEM block.
    """
    p = Path(path)
    data = read_bounded_file(
        p, max_size=MAX_PEM_FILE_SIZE, kind="a PEM file", error=CertificateFileError
    )
    if _PEM_MARKER not in data:
        raise CertificateFileError(f"{p} is not a PEM file (no '-----BEGIN' line)")
    return data


def load_certificates(path: Path | str) -> list[x509.Certificate]:
    """Reads every certificate of a PEM file (a leaf with its chain, or a CA bundle).

    Raises:
        CertificateFileError: unreadable, or not one or more valid PEM certificates.
    """
    data = load_pem(path)
    if b"PRIVATE KEY-----" in data and b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateFileError(f"{path} holds a private key, not a certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateFileError(f"{path} does not hold valid PEM certificates: {e}") from e
    return certs


def load_private_key(path: Path | str) -> PrivateKey:
    """Reads an unencrypted PEM private key (EC or RSA).

    A key file that group or others may read is accepted (container secrets are often mounted
    that way) but logged as a warning.

    Raises:
        CertificateFileError: unreadable, not an unencrypted PEM private key, or another type.
    """
    p = Path(path)
    data = load_pem(p)
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key file %s is accessible by group or others (mode %o)", p, mode)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # The library's message is not echoed: it is about key bytes.
        raise CertificateFileError(f"{p} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateFileError(f"{p} holds neither an EC nor an RSA private key")
    return key


def _load_pair(cert_file: Path | str, key_file: Path | str) -> tuple[bytes, bytes]:
    cert_pem = load_pem(cert_file)
    certs = load_certificates(cert_file)
    key = load_private_key(key_file)
    if key.public_key() != certs[0].public_key():
        raise KeyMismatchError(f"{key_file} is not the private key of {cert_file}")
    return cert_pem, load_pem(key_file)


def _load_bundle(ca_file: Path | str) -> bytes:
    load_certificates(ca_file)  # parse to fail here, with the file's name, not in the handshake
    return load_pem(ca_file)


# --- gRPC credentials -----------------------------------------------------------------------


def server_credentials(
    *, cert_file: Path | str, key_file: Path | str, ca_file: Path | str
) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate issued by a CA in ``ca_file``.

    ``cert_file`` may hold the leaf followed by intermediates. ``ca_file`` may hold several CAs
    (old and new during CA rotation).

    Raises:
        CertificateFileError: a file is missing, unreadable or malformed.
        KeyMismatchError: the key does not belong to the certificate.
    """
    import grpc

    cert_pem, key_pem = _load_pair(cert_file, key_file)
    ca_pem = _load_bundle(ca_file)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(
    *, cert_file: Path | str, key_file: Path | str, ca_file: Path | str
) -> grpc.ChannelCredentials:
    """Client credentials that present ``cert_file`` and trust servers signed by ``ca_file``.

    The server's certificate must also name the dialled host (DNS or IP SAN).

    Raises:
        CertificateFileError: a file is missing, unreadable or malformed.
        KeyMismatchError: the key does not belong to the certificate.
    """
    import grpc

    cert_pem, key_pem = _load_pair(cert_file, key_file)
    ca_pem = _load_bundle(ca_file)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def server_credentials_from(files: TlsFiles) -> grpc.ServerCredentials:
    """:func:`server_credentials` from a :class:`TlsFiles`."""
    return server_credentials(
        cert_file=files.cert_file, key_file=files.key_file, ca_file=files.ca_file
    )


def channel_credentials_from(files: TlsFiles) -> grpc.ChannelCredentials:
    """:func:`channel_credentials` from a :class:`TlsFiles`."""
    return channel_credentials(
        cert_file=files.cert_file, key_file=files.key_file, ca_file=files.ca_file
    )


# --- the peer -------------------------------------------------------------------------------


def _peer_pem(context: AuthContextHolder) -> bytes:
    auth = context.auth_context()
    value = auth.get("x509_pem_cert")
    # gRPC gives a list of bytes per property; accept a bare bytes value too.
    if isinstance(value, bytes):
        pems = [value]
    elif isinstance(value, Iterable) and not isinstance(value, str):
        pems = [v for v in value if isinstance(v, bytes)]
    else:
        pems = []
    if not pems or not pems[0]:
        raise PeerIdentityError("the peer presented no client certificate")
    return pems[0]


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: bytes) -> SpiffeId:
    # Peers reconnect with the same certificate for many calls; parsing once per certificate
    # keeps identity checks off the broker's per-request profile. Errors are not cached.
    return spiffe_id_from_certificate(pem)


@functools.lru_cache(maxsize=4096)
def _der_of_pem(pem: bytes) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PeerIdentityError(f"the peer's certificate cannot be parsed: {e}") from e
    return cert.public_bytes(serialization.Encoding.DER)


def peer_identity(context: AuthContextHolder) -> SpiffeId:
    """The SPIFFE ID in the client certificate of the call's peer.

    Raises:
        PeerIdentityError: the peer presented no certificate (or the channel is not TLS).
        IdentityError: the certificate carries no valid cleanroom SPIFFE ID (the subclass says
            why).
    """
    return _identity_of_pem(_peer_pem(context))


def peer_certificate_der(context: AuthContextHolder) -> bytes:
    """The DER bytes of the peer's client certificate (quotes bind to its SHA-256).

    Raises:
        PeerIdentityError: the peer presented no certificate, or it cannot be parsed.
    """
    return _der_of_pem(_peer_pem(context))


# --- offline checks -------------------------------------------------------------------------


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_window(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(f"{what} expired on {_fmt(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"{what} is not valid before {_fmt(cert.not_valid_before_utc)}"
        )


def _as_certs(
    data: bytes | x509.Certificate | list[x509.Certificate], what: str
) -> list[x509.Certificate]:
    if isinstance(data, x509.Certificate):
        return [data]
    if isinstance(data, list):
        return data
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateFileError(f"{what} is not valid PEM: {e}") from e


def _explain_issuer_windows(
    chain: list[x509.Certificate], cas: list[x509.Certificate], when: dt.datetime
) -> None:
    # When path validation fails, name the common case precisely: a CA (or intermediate) that
    # really signed a certificate of the chain but whose own window is over. Only issuers
    # whose signature verifies count, so an expired, rotated-out CA of the same name that
    # signed nothing here is not blamed.
    for cert in chain:
        for issuer in [*chain, *cas]:
            if issuer is cert or issuer.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            _check_window(issuer, when, f"CA certificate {issuer.subject.rfc4514_string()!r}")


def check_certificate(
    cert_pem: bytes | x509.Certificate | list[x509.Certificate],
    ca_pem: bytes | x509.Certificate | list[x509.Certificate],
    now: dt.datetime | None = None,
    *,
    usage: Literal["client", "server"] | None = None,
) -> SpiffeId:
    """Checks a certificate against a CA bundle and the clock, as the TLS handshake would.

    ``cert_pem`` may be a leaf followed by its intermediates (SPIRE's ``svid.pem``); ``ca_pem``
    may hold several CAs. The leaf's validity window is checked first so that an expired
    certificate gets a message with its date; then the chain to a CA in the bundle is verified
    by :mod:`cryptography.x509.verification` (signatures, CA constraints, each certificate's
    window). ``usage`` additionally requires the clientAuth or serverAuth EKU.

    Returns:
        The certificate's SPIFFE ID.

    Raises:
        CertificateExpiredError: the certificate, or the CA that issued it, has expired.
        CertificateNotYetValidError: the certificate, or its CA, is not valid yet.
        UntrustedCertificateError: no chain to a CA in the bundle verifies, or the EKU asked
            for by ``usage`` is missing.
        CertificateFileError: the PEM input cannot be parsed.
        IdentityError: the certificate carries no valid cleanroom SPIFFE ID.
    """
    when = now if now is not None else dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    chain = _as_certs(cert_pem, "certificate")
    cas = _as_certs(ca_pem, "CA bundle")
    if not chain:
        raise CertificateFileError("no certificate given")
    if not cas:
        raise CertificateFileError("the CA bundle holds no certificate")
    leaf, intermediates = chain[0], chain[1:]
    identity = spiffe_id_from_certificate(leaf)
    _check_window(leaf, when, f"certificate for {identity}")

    builder = (
        verification.PolicyBuilder()
        .store(verification.Store(cas))
        .time(when)
        # SVIDs carry URI SANs and no particular subject, so the end-entity profile is left
        # open here; the EKU that matters is checked below when asked for.
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
    )
    try:
        builder.build_client_verifier().verify(leaf, intermediates)
    except verification.VerificationError as e:
        _explain_issuer_windows(chain, cas, when)
        raise UntrustedCertificateError(
            f"certificate for {identity} is not issued by a CA in the bundle ({e})"
        ) from e

    if usage is not None:
        oid = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if usage == "client"
            else (ExtendedKeyUsageOID.SERVER_AUTH)
        )
        try:
            ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            ekus = None
        if ekus is not None and oid not in ekus:
            raise UntrustedCertificateError(
                f"certificate for {identity} is not valid for TLS {usage} use (EKU)"
            )
    return identity


def check_files(files: TlsFiles, *, usage: Literal["client", "server"] | None = None) -> SpiffeId:
    """Checks an endpoint's files before use: readable, key matches, chain and clock verify.

    Raises:
        CertificateFileError: a file is missing, unreadable or malformed.
        KeyMismatchError: the key does not belong to the certificate.
        CertificateCheckError: the certificate is expired, not yet valid or untrusted.
        IdentityError: the certificate carries no valid cleanroom SPIFFE ID.
    """
    _load_pair(files.cert_file, files.key_file)
    return check_certificate(
        load_certificates(files.cert_file), load_certificates(files.ca_file), usage=usage
    )


__all__ = [
    "AuthContextHolder",
    "TlsFiles",
    "channel_credentials",
    "channel_credentials_from",
    "check_certificate",
    "check_files",
    "load_certificates",
    "load_pem",
    "load_private_key",
    "peer_certificate_der",
    "peer_identity",
    "server_credentials",
    "server_credentials_from",
]
