"""Re-encodings of one EK public area: the same key, another TPM2B_PUBLIC.

An attacker who controls a revoked TPM can send its EK's public area with a harmless change: the
RSA exponent written as 65537 instead of 0 (which means 65537), another authPolicy, or the
userWithAuth attribute set. Each is the same key (the same SubjectPublicKeyInfo, the same
certificate), so credential activation on the real TPM still works; the tests use these to check
that the broker sees one TPM in all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from tpm2_pytss import TPM2B_DIGEST, TPM2B_PUBLIC, TPMA_OBJECT

__all__ = ["REENCODINGS", "reencode"]


def _exponent_65537(area: Any) -> None:
    area.parameters.rsaDetail.exponent = 65537


def _other_auth_policy(area: Any) -> None:
    area.authPolicy = TPM2B_DIGEST(hashlib.sha256(b"another policy").digest())


def _user_with_auth(area: Any) -> None:
    area.objectAttributes = int(area.objectAttributes) | int(TPMA_OBJECT.USERWITHAUTH)


#: The re-encodings by name; "exponent-65537" applies to RSA EKs only.
REENCODINGS: dict[str, Callable[[Any], None]] = {
    "exponent-65537": _exponent_65537,
    "auth-policy": _other_auth_policy,
    "user-with-auth": _user_with_auth,
}


def reencode(public: bytes, how: str) -> bytes:
    """``public`` (a marshalled TPM2B_PUBLIC) re-encoded the way ``how`` names."""
    parsed, _ = TPM2B_PUBLIC.unmarshal(public)
    REENCODINGS[how](parsed.publicArea)
    out = bytes(TPM2B_PUBLIC(publicArea=parsed.publicArea).marshal())
    assert out != public
    return out
