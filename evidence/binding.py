"""The qualifying data that binds a quote to a nonce, an ephemeral key and a TLS certificate.

``qualifying_data = SHA-256(label || u32 len(nonce) || nonce || u16 kem ||
u32 len(ephemeral_public_key) || ephemeral_public_key || SHA-256(tls_certificate_der))``

The label separates this use of SHA-256 from any other. Binding the ephemeral key means the data
keys the broker releases can only be opened by the process that made the quote; binding the TLS
certificate means a quote relayed over another sidecar's connection is refused.
"""

from __future__ import annotations

import hashlib
import struct

from evidence.errors import BindingError

LABEL = b"cleanroom/v1 quote binding\x00"
NONCE_SIZE = 32


def qualifying_data(
    *, nonce: bytes, kem: int, ephemeral_public_key: bytes, tls_certificate_der: bytes
) -> bytes:
    """Returns the 32-byte qualifying data for a quote.

    ``kem`` is the ``cleanroom.v1.KemAlgorithm`` number of the ephemeral key.

    Raises:
        BindingError: the nonce is not 32 bytes, or the key or certificate is empty.
    """
    if len(nonce) != NONCE_SIZE:
        raise BindingError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if not ephemeral_public_key:
        raise BindingError("ephemeral public key is empty")
    if not tls_certificate_der:
        raise BindingError("TLS certificate is empty")
    if not 0 < kem < 0x10000:
        raise BindingError(f"invalid KEM identifier {kem}")
    h = hashlib.sha256(LABEL)
    h.update(struct.pack(">I", len(nonce)) + nonce)
    h.update(struct.pack(">H", kem))
    h.update(struct.pack(">I", len(ephemeral_public_key)) + ephemeral_public_key)
    h.update(hashlib.sha256(tls_certificate_der).digest())
    return h.digest()


SNP_USER_DATA_LABEL = b"cleanroom/v1 snp user-data\x00"
SNP_USER_DATA_SIZE = 64


SNP_ENROLLMENT_LABEL = b"cleanroom/v1 snp enrollment\x00"


def snp_enrollment_binding(
    *, ek_public: bytes, ak_public: bytes, tls_certificate_der: bytes
) -> bytes:
    """What an enrollment's HCL report binds (through :func:`snp_user_data`): SHA-256 over a
    label and the length-prefixed EK public, AK public and the sidecar's TLS certificate."""
    h = hashlib.sha256(SNP_ENROLLMENT_LABEL)
    for part in (ek_public, ak_public, tls_certificate_der):
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.digest()


def snp_user_data(qualifying_data: bytes) -> bytes:
    """The 64 bytes a sidecar on an Azure SEV-SNP confidential VM writes to the vTPM's NV index
    0x01400002 before it reads the HCL report (0x01400001), whose runtime claims then carry them
    as ``user-data``: ``SHA-512(label || qualifying_data)``.

    The qualifying data already commits to the broker's nonce, the ephemeral key and the TLS
    certificate, so the hardware report is as fresh, and as bound, as the quote.
    """
    return hashlib.sha512(SNP_USER_DATA_LABEL + qualifying_data).digest()
