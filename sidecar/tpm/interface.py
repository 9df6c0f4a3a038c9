"""What the rest of the sidecar needs from a TPM: a small protocol and the values it returns.

The attester and (later) the runtime depend on :class:`TpmDevice`, not on tpm2-pytss, so that
the TPM adapter is the only module that speaks ESAPI. The results are plain data: marshalled
TPM structures as bytes in exactly the formats tpm2-tools reads and writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from evidence.launch import Launch
from evidence.pcr import WORKLOAD_PCR, Measurement

#: A PCR value's key: (PCR index, bank name as tpm2-tools spells it, e.g. ``"sha256"``).
PcrKey = tuple[int, str]


@dataclass(frozen=True)
class EkInfo:
    """The endorsement key as the sidecar reports it for enrollment.

    ``public`` is the marshalled TPM2B_PUBLIC (the file ``tpm2_createek --public`` writes);
    ``certificate`` the DER EK certificate read from ``certificate_index`` in NV, or None when
    the TPM has none for this key type.
    """

    algorithm: Literal["rsa", "ecc"]
    public: bytes
    name: bytes
    certificate: bytes | None
    certificate_index: int

    @property
    def name_hex(self) -> str:
        return self.name.hex()


@dataclass(frozen=True)
class AkInfo:
    """The attestation key: a restricted signing key created under the EK.

    ``public`` is the marshalled TPM2B_PUBLIC exactly as ``tpm2_createak --public`` writes it
    (``tpm2_checkquote --public`` accepts it); ``name`` is the TPM name (nameAlg id followed by
    the digest of the public area), as ``tpm2_createak --ak-name`` writes it. ``handle`` is the
    persistent handle, or None when the AK is kept as a key blob in a file.
    """

    algorithm: Literal["rsa", "ecc"]
    public: bytes
    pem: bytes
    name: bytes
    handle: int | None
    created: bool

    @property
    def name_hex(self) -> str:
        return self.name.hex()


@dataclass(frozen=True)
class QuoteResult:
    """A TPM2_Quote and the PCR values it covers.

    ``attest`` is the marshalled TPMS_ATTEST (``tpm2_quote --message``), ``signature`` the
    marshalled TPMT_SIGNATURE (``tpm2_quote --signature``), ``pcr_selection`` the quoted
    TPML_PCR_SELECTION (a tpm2-pytss object) and ``pcr_values`` the PCR values read right after
    the quote, checked against the quote's PCR digest. ``pcr_order`` lists the keys in the order
    the TPM hashed them into that digest.
    """

    attest: bytes
    signature: bytes
    pcr_selection: Any
    pcr_values: Mapping[PcrKey, bytes]
    pcr_order: tuple[PcrKey, ...]
    qualifying_data: bytes


class TpmDevice(Protocol):
    """The TPM operations the sidecar uses; :class:`sidecar.tpm.Tpm` implements them."""

    def create_ek(self) -> EkInfo: ...

    def create_or_load_ak(self) -> AkInfo: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...

    def reset_pcr(self, index: int = WORKLOAD_PCR) -> None: ...

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None: ...

    def measure(
        self,
        files: Sequence[str | os.PathLike[str]],
        names: Sequence[str] | None = None,
        *,
        launch: Launch | None = None,
    ) -> Measurement: ...

    def read_pcrs(self, selection: Mapping[str, Iterable[int]]) -> dict[PcrKey, bytes]: ...

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int] = (WORKLOAD_PCR,)
    ) -> QuoteResult: ...

    def nv_read(self, index: int) -> bytes: ...

    def nv_write(self, index: int, data: bytes) -> None: ...
