"""The attester checks its inputs before it touches a TPM."""

from __future__ import annotations

import pytest

from sidecar.attester import QuoteBinding, make_quote
from sidecar.config import TpmConfig
from sidecar.errors import InvalidNonceError

# If the attester opened the TPM before checking the nonce, these tests would see
# TpmUnavailableError for this TCTI instead of InvalidNonceError.
NO_TPM = TpmConfig(tcti="swtpm:host=127.0.0.1,port=1")
BINDING = QuoteBinding(kem=1, ephemeral_public_key=b"k" * 32, tls_certificate_der=b"cert")


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_bound_quote_needs_the_brokers_32_byte_nonce(length: int) -> None:
    with pytest.raises(InvalidNonceError, match=f"nonce must be 32 bytes, got {length}"):
        make_quote(NO_TPM, nonce=b"\x00" * length, binding=BINDING)


def test_malformed_binding_is_an_invalid_nonce_error() -> None:
    empty_key = QuoteBinding(kem=1, ephemeral_public_key=b"", tls_certificate_der=b"cert")
    with pytest.raises(InvalidNonceError, match="ephemeral public key is empty"):
        make_quote(NO_TPM, nonce=b"\x00" * 32, binding=empty_key)
