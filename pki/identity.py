"""SPIFFE identities of the clean room's principals, and reading them from X.509 certificates.

Every principal is named by a SPIFFE ID carried as the single URI SAN of its certificate (the
X.509-SVID rule), so certificates issued by ``cleanroom pki`` and by SPIRE are interchangeable:

* ``spiffe://<trust domain>/operator``
* ``spiffe://<trust domain>/party/<party name>``
* ``spiffe://<trust domain>/sidecar/<sidecar id>``
* ``spiffe://<trust domain>/broker``

Parsing is strict (the SPIFFE ID spec's character sets, no dot segments, no query, fragment,
port or user info, no percent-encoding) because an identity that two components would read
differently is an authorization bug waiting to happen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509

from pki.errors import (
    CertificateIdentityError,
    IdentityError,
    MalformedSpiffeIdError,
    UnsupportedIdentityError,
)

IdentityKind = Literal["operator", "party", "sidecar", "broker"]

#: Identity kinds that name one principal among many and so carry a name.
NAMED_KINDS: Final[frozenset[str]] = frozenset({"party", "sidecar"})
#: Identity kinds of which a trust domain has exactly one, so they carry no name.
SINGLETON_KINDS: Final[frozenset[str]] = frozenset({"operator", "broker"})
KINDS: Final[frozenset[str]] = NAMED_KINDS | SINGLETON_KINDS

SCHEME: Final = "spiffe"
#: The SPIFFE ID spec caps a whole ID at 2048 bytes and a trust domain at 255.
MAX_SPIFFE_ID_LENGTH: Final = 2048
MAX_TRUST_DOMAIN_LENGTH: Final = 255
#: Party names and sidecar ids also become file names and certificate common names (CN is at
#: most 64 characters), so they are kept short.
MAX_NAME_LENGTH: Final = 64

_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")


def validate_trust_domain(trust_domain: str) -> str:
    """Checks a trust domain name against the SPIFFE ID spec and returns it.

    Raises:
        MalformedSpiffeIdError: empty, too long, or a character outside ``[a-z0-9._-]``
            (upper case is rejected rather than folded, so one domain has one spelling).
    """
    if not trust_domain:
        raise MalformedSpiffeIdError("trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise MalformedSpiffeIdError(
            f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
        )
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise MalformedSpiffeIdError(
            f"trust domain {trust_domain!r} may contain only lowercase letters, digits, "
            "'.', '-' and '_'"
        )
    return trust_domain


def validate_name(kind: str, name: str) -> str:
    """Checks a party name or sidecar id and returns it.

    Raises:
        MalformedSpiffeIdError: empty, longer than :data:`MAX_NAME_LENGTH`, ``.`` or ``..``,
            or a character outside ``[A-Za-z0-9._-]``.
    """
    if not name:
        raise MalformedSpiffeIdError(f"{kind} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise MalformedSpiffeIdError(f"{kind} name is longer than {MAX_NAME_LENGTH} characters")
    if name in (".", ".."):
        raise MalformedSpiffeIdError(f"{kind} name may not be {name!r}")
    if not _SEGMENT_RE.fullmatch(name):
        raise MalformedSpiffeIdError(
            f"{kind} name {name!r} may contain only letters, digits, '.', '-' and '_'"
        )
    return name


@dataclass(frozen=True)
class SpiffeId:
    """One clean-room principal's SPIFFE ID.

    ``kind`` is ``"operator"``, ``"party"``, ``"sidecar"`` or ``"broker"``; ``name`` is the party
    name or sidecar id, and empty for the operator and the broker. ``str()`` gives the URI.

    Raises:
        IdentityError: (from the constructor) an unknown kind, a name where none belongs or a
            missing one, or a trust domain or name that the SPIFFE spec does not allow.
    """

    trust_domain: str
    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if self.kind in SINGLETON_KINDS:
            if self.name:
                raise UnsupportedIdentityError(f"a {self.kind} identity carries no name")
        elif self.kind in NAMED_KINDS:
            validate_name(self.kind, self.name)
        else:
            raise UnsupportedIdentityError(
                f"unknown identity kind {self.kind!r} (expected one of {', '.join(sorted(KINDS))})"
            )

    @classmethod
    def operator(cls, trust_domain: str) -> SpiffeId:
        """The operator of ``trust_domain``."""
        return cls(trust_domain, "operator")

    @classmethod
    def broker(cls, trust_domain: str) -> SpiffeId:
        """The key broker of ``trust_domain``."""
        return cls(trust_domain, "broker")

    @classmethod
    def party(cls, trust_domain: str, name: str) -> SpiffeId:
        """The party called ``name``."""
        return cls(trust_domain, "party", name)

    @classmethod
    def sidecar(cls, trust_domain: str, sidecar_id: str) -> SpiffeId:
        """The sidecar with id ``sidecar_id``."""
        return cls(trust_domain, "sidecar", sidecar_id)

    @property
    def path(self) -> str:
        """The URI path: ``/operator``, ``/party/<name>``, ``/sidecar/<id>`` or ``/broker``."""
        return f"/{self.kind}/{self.name}" if self.name else f"/{self.kind}"

    @property
    def uri(self) -> str:
        """The SPIFFE ID as a URI, e.g. ``spiffe://cleanroom.local/party/advertiser``."""
        return f"{SCHEME}://{self.trust_domain}{self.path}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parses and strictly validates a clean-room SPIFFE ID.

    Raises:
        MalformedSpiffeIdError: not a syntactically valid SPIFFE ID: wrong or upper-case scheme,
            bad trust domain, a port, user info, query, fragment or percent-encoding, an empty,
            ``.`` or ``..`` path segment, a disallowed character, or too long.
        UnsupportedIdentityError: a valid SPIFFE ID whose path is not ``/operator``,
            ``/broker``, ``/party/<name>`` or ``/sidecar/<id>``.
    """
    if not isinstance(uri, str):
        raise MalformedSpiffeIdError("SPIFFE ID must be a string")
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_LENGTH:
        raise MalformedSpiffeIdError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes")
    shown = uri if len(uri) <= 200 else uri[:200] + "..."
    prefix = f"{SCHEME}://"
    if not uri.startswith(prefix):
        raise MalformedSpiffeIdError(f"{shown!r} is not a SPIFFE ID: scheme must be 'spiffe://'")
    rest = uri[len(prefix) :]
    for char, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if char in rest:
            raise MalformedSpiffeIdError(f"SPIFFE ID {shown!r} may not contain {what}")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise MalformedSpiffeIdError(f"SPIFFE ID {shown!r} may not contain user info")
    if ":" in authority:
        raise MalformedSpiffeIdError(f"SPIFFE ID {shown!r} may not contain a port")
    try:
        trust_domain = validate_trust_domain(authority)
    except MalformedSpiffeIdError as e:
        raise MalformedSpiffeIdError(f"SPIFFE ID {shown!r}: {e}") from None
    if not slash:
        raise UnsupportedIdentityError(f"{shown!r} names a trust domain, not a principal (no path)")
    segments = path.split("/")
    for seg in segments:
        if not seg:
            raise MalformedSpiffeIdError(
                f"SPIFFE ID {shown!r} has an empty path segment (or a trailing '/')"
            )
        if seg in (".", ".."):
            raise MalformedSpiffeIdError(f"SPIFFE ID {shown!r} has a dot path segment")
        if not _SEGMENT_RE.fullmatch(seg):
            raise MalformedSpiffeIdError(
                f"SPIFFE ID {shown!r}: path segments may contain only letters, digits, "
                "'.', '-' and '_'"
            )
    kind = segments[0]
    expected = len(segments) == (2 if kind in NAMED_KINDS else 1)
    if kind not in KINDS or not expected:
        raise UnsupportedIdentityError(
            f"{shown!r} is not a cleanroom identity (expected /operator, /broker, "
            "/party/<name> or /sidecar/<id>)"
        )
    try:
        return SpiffeId(trust_domain, kind, segments[1] if kind in NAMED_KINDS else "")
    except IdentityError as e:
        raise type(e)(f"SPIFFE ID {shown!r}: {e}") from None


def _load_certificate(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as e:
        raise CertificateIdentityError(f"not a valid X.509 certificate: {e}") from e


def spiffe_id_from_certificate(cert: x509.Certificate | bytes) -> SpiffeId:
    """Reads the SPIFFE ID of a leaf certificate (X.509-SVID), ours or SPIRE's.

    ``cert`` is a parsed certificate or its DER or PEM bytes (with PEM, the first certificate).
    The certificate must carry exactly one URI SAN, a ``spiffe://`` URI, and must not be a CA
    certificate (an SVID's signing certificates are not identities). This does not check the
    signature or validity window; the TLS handshake (or :func:`pki.tls.check_certificate`) does.

    Raises:
        CertificateIdentityError: not a certificate, a CA certificate, no SAN extension, zero or
            several URI SANs, or a URI SAN that is not a SPIFFE ID.
        MalformedSpiffeIdError: the URI SAN is a malformed SPIFFE ID.
        UnsupportedIdentityError: the SPIFFE ID is not one of the cleanroom identity kinds.
    """
    certificate = _load_certificate(cert)
    try:
        bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as e:  # duplicate or undecodable extensions
        raise CertificateIdentityError(f"certificate extensions are invalid: {e}") from e
    if bc is not None and bc.ca:
        raise CertificateIdentityError("a CA certificate is not an identity certificate")
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateIdentityError(
            "certificate has no subjectAltName, so no SPIFFE ID"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise CertificateIdentityError("certificate has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise CertificateIdentityError(
            f"certificate has {len(uris)} URI SANs; an X.509-SVID must have exactly one"
        )
    if not uris[0].startswith(f"{SCHEME}://"):
        raise CertificateIdentityError("certificate's URI SAN is not a spiffe:// URI")
    return parse_spiffe_id(uris[0])
