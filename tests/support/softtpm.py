"""The tests' software TPM: a :class:`~sidecar.tpm.interface.TpmDevice` built on the software
AK and quote maker of :mod:`cleanroom.app.emulators.softak` (re-exported here for the tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from cryptography.hazmat.primitives import serialization

from cleanroom.app.emulators.softak import (
    AK_ATTRIBUTES,
    QUOTED_BANKS,
    QuoteMaker,
    SoftAk,
    SoftKey,
    pcr_selection,
)
from evidence.launch import Launch
from evidence.pcr import BANK_SIZES, WORKLOAD_PCR, Measurement, extend, measure_files
from sidecar.errors import TpmCommandError
from sidecar.tpm.interface import AkInfo, EkInfo, QuoteResult

__all__ = [
    "AK_ATTRIBUTES",
    "QUOTED_BANKS",
    "QuoteMaker",
    "SoftAk",
    "SoftKey",
    "SoftTpm",
    "pcr_selection",
]


class SoftTpm:
    """A :class:`sidecar.tpm.interface.TpmDevice` in software: PCR 23 of sha1 and sha256 kept
    in memory, quotes made by :class:`QuoteMaker` with a :class:`SoftAk`.

    It is injected where the sidecar takes a TPM (``run_workload(..., tpm_factory=...)``) the
    way python-tuf injects its fetcher, so that a test can run the sidecar's whole path where no
    swtpm can be started for every attester. It has no EK: its AK is enrolled by the operator
    (``cleanroom admin ak enroll``), and the EK, credential activation and NV calls raise
    :class:`sidecar.errors.TpmCommandError`.
    """

    banks: Final = QUOTED_BANKS

    def __init__(self, ak: SoftAk | None = None) -> None:
        self.ak = ak if ak is not None else SoftAk.generate()
        self._pcrs: dict[tuple[int, str], bytes] = {}
        self.reset_pcr(WORKLOAD_PCR)

    def __enter__(self) -> SoftTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def create_ek(self) -> EkInfo:
        raise TpmCommandError("the software TPM has no EK: enroll its AK with the operator")

    def create_or_load_ak(self) -> AkInfo:
        pem = self.ak.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return AkInfo(
            algorithm="rsa" if self.ak.alg == "rsa" else "ecc",
            public=self.ak.tpm2b_public,
            pem=pem,
            name=self.ak.name,
            handle=None,
            created=False,
        )

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        raise TpmCommandError("the software TPM has no EK to activate a credential with")

    def reset_pcr(self, index: int = WORKLOAD_PCR) -> None:
        for bank in self.banks:
            self._pcrs[(index, bank)] = bytes(BANK_SIZES[bank])

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        for bank, digest in digests.items():
            self._pcrs[(index, bank)] = extend(self._pcrs[(index, bank)], digest, bank)

    def measure(
        self,
        files: Sequence[str | os.PathLike[str]],
        names: Sequence[str] | None = None,
        *,
        launch: Launch | None = None,
    ) -> Measurement:
        measurement = measure_files(files, self.banks, names=names, launch=launch)
        self.reset_pcr(WORKLOAD_PCR)
        for event in measurement.events:
            self.extend(WORKLOAD_PCR, event.digests)
        return measurement

    def read_pcrs(self, selection: Mapping[str, Iterable[int]]) -> dict[tuple[int, str], bytes]:
        return {
            (i, bank): self._pcrs[(i, bank)] for bank, indexes in selection.items() for i in indexes
        }

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int] = (WORKLOAD_PCR,)) -> QuoteResult:
        if tuple(pcrs) != (WORKLOAD_PCR,):
            raise TpmCommandError("the software TPM quotes PCR 23 only")
        values = {bank: self._pcrs[(WORKLOAD_PCR, bank)] for bank in self.banks}
        attest, signature = QuoteMaker(self.ak, values).quote(qualifying_data)
        order = tuple((WORKLOAD_PCR, bank) for bank in self.banks)
        return QuoteResult(
            attest=attest,
            signature=signature,
            pcr_selection=pcr_selection(),
            pcr_values={key: self._pcrs[key] for key in order},
            pcr_order=order,
            qualifying_data=bytes(qualifying_data),
        )

    def nv_read(self, index: int) -> bytes:
        raise TpmCommandError(f"the software TPM has no NV index 0x{index:08x}")

    def nv_write(self, index: int, data: bytes) -> None:
        raise TpmCommandError(f"the software TPM has no NV index 0x{index:08x}")
