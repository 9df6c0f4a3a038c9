"""One-line explanations of TLS handshake failures, for the clients' error messages.

gRPC reports a failed handshake as ``UNAVAILABLE`` with BoringSSL's words (``Ssl handshake failed
(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:
CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate``). The operator needs to know
which file is wrong; the original text stays at the end for whoever needs it.
"""

from __future__ import annotations

from typing import Final

#: (marker in gRPC's details, what it means for the person running the client).
_HINTS: Final = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the broker's certificate is not signed by the CA in the CA file this client was given "
        "(--ca / CLEANROOM_ADMIN_CA): check that it is the broker's CA bundle",
    ),
    (
        "not in peer certificate",
        "the broker's certificate does not name the address connected to: give --server-name "
        "with the DNS name it carries",
    ),
    (
        "CERTIFICATE_REQUIRED",
        "the broker refused this client's certificate (not signed by a CA it trusts, or none)",
    ),
    (
        "TLSV1_ALERT_UNKNOWN_CA",
        "the broker does not trust this client's certificate (not signed by a CA in its "
        "tls.ca_file)",
    ),
    (
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "the broker says this client's certificate is revoked",
    ),
)


def explain_tls_failure(details: str) -> str | None:
    """A one-line explanation of a handshake failure in gRPC's ``details``, or None when the
    details are not one that this module knows."""
    for marker, meaning in _HINTS:
        if marker in details:
            return meaning
    return None


__all__ = ["explain_tls_failure"]
