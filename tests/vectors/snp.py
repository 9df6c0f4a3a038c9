"""The real Azure SEV-SNP regression vector (``snp-azure-milan-dcasv5.json``).

The file is a copy of evidence captured on an Azure DCasv5 (Milan) confidential VM, published by
the Confidential Containers Trustee project (its ``source`` field names where it comes from):
the vTPM's HCL report, the chip's VCEK, and a vTPM quote by the AK that the report binds, with
the ASCII qualifying data ``challenge``. The quote's signature is stored raw; it is wrapped in a
TPMT_SIGNATURE here, as ``tpm2_quote`` writes it, so the verifiers take it unchanged.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from tpm2_pytss import TPM2_ALG, TPMT_SIGNATURE

VECTOR = Path(__file__).resolve().parent / "snp-azure-milan-dcasv5.json"


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class MilanEvidence:
    hcl_report: bytes
    vcek: bytes
    attest: bytes
    #: The marshalled TPMT_SIGNATURE (RSASSA, SHA-256).
    signature: bytes
    #: The quoted sha256 PCRs 0-23, keyed like broker.quote's PcrValues.
    pcr_values: dict[tuple[int, str], bytes]
    qualifying_data: bytes

    def write(self, d: Path) -> dict[str, Path]:
        """Writes the evidence as the files ``verify-quote`` reads; returns their paths."""
        files = {
            "hcl": d / "hcl-report.bin",
            "vcek": d / "vcek.der",
            "message": d / "quote.msg",
            "signature": d / "quote.sig",
            "pcr": d / "quote.pcrs",
        }
        files["hcl"].write_bytes(self.hcl_report)
        files["vcek"].write_bytes(self.vcek)
        files["message"].write_bytes(self.attest)
        files["signature"].write_bytes(self.signature)
        files["pcr"].write_bytes(b"".join(self.pcr_values.values()))
        return files


def milan_evidence() -> MilanEvidence:
    doc = json.loads(VECTOR.read_text())
    quote = doc["tpm_quote"]
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.RSASSA)
    sig.signature.rsassa.hash = TPM2_ALG.SHA256
    sig.signature.rsassa.sig = bytes.fromhex(quote["signature"])
    return MilanEvidence(
        hcl_report=_b64url(doc["hcl_report"]),
        vcek=_b64url(doc["vcek"]),
        attest=bytes.fromhex(quote["message"]),
        signature=bytes(sig.marshal()),
        pcr_values={(i, "sha256"): bytes.fromhex(v) for i, v in enumerate(quote["pcrs"])},
        qualifying_data=doc["qualifying_data_ascii"].encode(),
    )
