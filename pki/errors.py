"""Errors of the ``pki`` package. Every error it raises derives from :class:`PKIError`.

Subtrees follow the failure areas: identities (SPIFFE IDs and the certificates that carry
them), files on disk, and certificate checks. Messages name files and identities but never
hold key material.
"""

from __future__ import annotations

from cleanroom.errors import CleanroomError


class PKIError(CleanroomError):
    """Root of every error the ``pki`` package raises."""


# --- identities ---------------------------------------------------------------------------


class IdentityError(PKIError):
    """A SPIFFE ID, or the certificate that should carry one, is not a valid identity."""


class MalformedSpiffeIdError(IdentityError):
    """A string is not a syntactically valid SPIFFE ID (scheme, trust domain or path)."""


class UnsupportedIdentityError(IdentityError):
    """A valid SPIFFE ID whose path is not one of the cleanroom identity kinds."""


class CertificateIdentityError(IdentityError):
    """A certificate does not carry exactly one SPIFFE ID as the X.509-SVID spec requires."""


class PeerIdentityError(IdentityError):
    """A gRPC peer presented no client certificate (or the transport is not TLS)."""


# --- files --------------------------------------------------------------------------------


class PKIFileError(PKIError):
    """A PKI file is missing, unreadable, malformed, or would be overwritten."""


class CertificateFileError(PKIFileError):
    """A certificate or key file is missing, unreadable or not valid PEM."""


class KeyMismatchError(PKIFileError):
    """A private key does not belong to the certificate it is paired with."""


class PKIExistsError(PKIFileError):
    """Files already exist and overwriting them was not requested."""


# --- certificate checks -------------------------------------------------------------------


class CertificateCheckError(PKIError):
    """A certificate failed a check against its CA or the clock."""


class CertificateExpiredError(CertificateCheckError):
    """The certificate (or its CA) is past its notAfter time."""


class CertificateNotYetValidError(CertificateCheckError):
    """The certificate (or its CA) is before its notBefore time."""


class UntrustedCertificateError(CertificateCheckError):
    """No chain from the certificate to a CA in the given bundle verifies."""


# --- issuing ------------------------------------------------------------------------------


class IssuanceError(PKIError):
    """A certificate cannot be issued with the requested parameters."""


class CertificateRevokedError(CertificateCheckError):
    """The certificate is listed as revoked on a certificate revocation list of its CA.

    ``serial`` and ``issuer`` (RFC 4514) name the certificate; ``reason`` is the CRL entry's
    reason code (``None`` when the entry has none) and ``source`` the CRL file that lists it.
    """

    def __init__(
        self, message: str, *, serial: int, issuer: str, reason: str | None, source: str
    ) -> None:
        super().__init__(message)
        self.serial = serial
        self.issuer = issuer
        self.reason = reason
        self.source = source


# --- revocation lists ---------------------------------------------------------------------


class CrlError(PKIError):
    """A certificate revocation list cannot be written, read or trusted."""


class CrlFileError(CrlError):
    """A CRL file is missing, unreadable, too large or not a CRL."""


class CrlSignatureError(CrlError):
    """No CA certificate of the trust bundle signed the CRL (or may sign CRLs)."""


class CrlExpiredError(CrlError):
    """The CRL is past its nextUpdate time, or has none: its information is stale."""
