"""A software AK and quote maker: the quotes a TPM would make, signed by a key in memory.

**For the benchmarks and the tests only; never an attester.** :class:`SoftAk` is a key held in
``cryptography``, presented as a TPM2B_PUBLIC with tpm2_createak's attributes; nothing keeps it
in a TPM, so a broker that enrolls it by the operator's word trusts only that word.
:class:`QuoteMaker` builds the real TPM2_Quote structures (TPMS_ATTEST, TPMT_SIGNATURE,
marshalled by tpm2-pytss) and signs them with it; the broker runs every one of its checks on
what they make. The load generator (bench/_loadgen.py) and the tests that need many attesters,
or a crash mid-decision, use them; the tests' software :class:`~sidecar.tpm.interface.TpmDevice`
(tests/support/softtpm.py) is built on them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_ECC_CURVE,
    TPM2_GENERATED,
    TPM2_ST,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPM2B_PUBLIC_KEY_RSA,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CLOCK_INFO,
    TPMS_PCR_SELECTION,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMS_SIGNATURE_RSA,
    TPMT_ASYM_SCHEME,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from evidence.pcr import WORKLOAD_PCR

#: The banks the sidecar measures and quotes, in the order tpm2_quote -l sha1,sha256:23 selects.
QUOTED_BANKS: Final = ("sha1", "sha256")


_TPM_ALG: Final = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256}


#: What tpm2_createak sets on an AK (and what the broker's attribute check requires).
AK_ATTRIBUTES: Final = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)


SoftKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SoftAk:
    """An AK whose private key is in software: its TPM2B_PUBLIC, its TPM name and the key."""

    key: SoftKey
    tpm2b_public: bytes
    name: bytes

    @property
    def name_hex(self) -> str:
        return self.name.hex()

    @property
    def alg(self) -> str:
        """``rsa`` or ``ecc``, as :meth:`generate` takes it."""
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ecc"

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def generate(cls, alg: str = "rsa") -> SoftAk:
        """A fresh RSA-2048 (``rsa``) or ECC P-256 (``ecc``) AK."""
        key: SoftKey
        if alg == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ecc":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unknown AK algorithm {alg!r}")
        return cls.from_key(key)

    @classmethod
    def from_pem(cls, pem: bytes) -> SoftAk:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("an AK is an RSA or ECC key")
        return cls.from_key(key)

    @classmethod
    def from_key(cls, key: SoftKey) -> SoftAk:
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        scheme = TPMT_ASYM_SCHEME(
            scheme=TPM2_ALG.RSASSA if isinstance(key, rsa.RSAPrivateKey) else TPM2_ALG.ECDSA
        )
        scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
        public = TPM2B_PUBLIC.from_pem(
            pem, nameAlg=TPM2_ALG.SHA256, objectAttributes=AK_ATTRIBUTES, scheme=scheme
        )
        if isinstance(key, ec.EllipticCurvePrivateKey):
            assert public.publicArea.parameters.eccDetail.curveID == TPM2_ECC_CURVE.NIST_P256
        return cls(key=key, tpm2b_public=bytes(public.marshal()), name=bytes(public.get_name()))


def pcr_selection() -> TPML_PCR_SELECTION:
    """The selection every quote names: PCR 23 of each bank of :data:`QUOTED_BANKS`."""
    bitmap = bytearray(3)
    bitmap[WORKLOAD_PCR // 8] |= 1 << (WORKLOAD_PCR % 8)
    return TPML_PCR_SELECTION(
        [
            TPMS_PCR_SELECTION(hash=_TPM_ALG[bank], sizeofSelect=3, pcrSelect=bytes(bitmap))
            for bank in QUOTED_BANKS
        ]
    )


class QuoteMaker:
    """Makes quotes as a TPM would for one AK, over fixed PCR 23 values.

    The TPMS_ATTEST and TPMT_SIGNATURE are tpm2-pytss structures built once; each quote sets
    the fields that change (extraData, the clock, the signature) and marshals them, which costs
    a fifth of building them afresh and leaves the load generator's CPU to the broker.
    """

    def __init__(
        self, ak: SoftAk, pcr23: Mapping[str, bytes], *, signer: bytes | None = None
    ) -> None:
        """``signer`` is the qualifiedSigner the quotes name: the AK's qualified name under its
        parent, as a TPM reports it (default: the AK's name, for an AK enrolled without EK)."""
        self.ak = ak
        values = [pcr23[bank] for bank in QUOTED_BANKS]
        # TPM2_Quote digests the selected PCRs, in selection order, with the scheme's hash.
        pcr_digest = hashlib.sha256(b"".join(values)).digest()
        self._start = time.monotonic()
        self._attest = TPMS_ATTEST(
            magic=TPM2_GENERATED.VALUE,
            type=TPM2_ST.ATTEST_QUOTE,
            qualifiedSigner=TPM2B_NAME(ak.name if signer is None else signer),
            extraData=TPM2B_DATA(bytes(32)),
            clockInfo=TPMS_CLOCK_INFO(clock=0, resetCount=1, restartCount=0, safe=1),
            firmwareVersion=0x20191023,
            attested=TPMU_ATTEST(
                quote=TPMS_QUOTE_INFO(pcrSelect=pcr_selection(), pcrDigest=TPM2B_DIGEST(pcr_digest))
            ),
        )
        self._rsa = isinstance(ak.key, rsa.RSAPrivateKey)
        if self._rsa:
            self._sig = TPMT_SIGNATURE(
                sigAlg=TPM2_ALG.RSASSA,
                signature=TPMU_SIGNATURE(rsassa=TPMS_SIGNATURE_RSA(hash=TPM2_ALG.SHA256)),
            )
        else:
            self._sig = TPMT_SIGNATURE(
                sigAlg=TPM2_ALG.ECDSA,
                signature=TPMU_SIGNATURE(ecdsa=TPMS_SIGNATURE_ECC(hash=TPM2_ALG.SHA256)),
            )

    def quote(self, qualifying: bytes) -> tuple[bytes, bytes]:
        """The marshalled TPMS_ATTEST and TPMT_SIGNATURE of a quote with ``qualifying``."""
        attest_s = self._attest
        attest_s.extraData = TPM2B_DATA(qualifying)
        attest_s.clockInfo.clock = int((time.monotonic() - self._start) * 1000)
        attest = bytes(attest_s.marshal())
        key = self.ak.key
        sig = self._sig
        if isinstance(key, rsa.RSAPrivateKey):
            raw = key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
            sig.signature.rsassa.sig = TPM2B_PUBLIC_KEY_RSA(raw)
        else:
            r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(hashes.SHA256())))
            sig.signature.ecdsa.signatureR = TPM2B_ECC_PARAMETER(r.to_bytes(32, "big"))
            sig.signature.ecdsa.signatureS = TPM2B_ECC_PARAMETER(s.to_bytes(32, "big"))
        return attest, bytes(sig.marshal())


__all__ = ["AK_ATTRIBUTES", "QUOTED_BANKS", "QuoteMaker", "SoftAk", "SoftKey", "pcr_selection"]
