"""Collecting the AMD SEV-SNP evidence of an Azure confidential VM's vTPM.

Before each quote is sent, :class:`SnpCollector` writes the digest of the quote's qualifying
data (:func:`evidence.binding.snp_user_data`, 64 bytes) to the vTPM's NV index 0x01400002, then
reads the HCL report from NV index 0x01400001: Azure's paravisor makes a new SNP report on that
read, with the written bytes as the runtime claims' ``user-data``, so the broker can tell that the
hardware report was made for this very attestation. The chip's VCEK comes from the Azure Instance
Metadata Service (or a file), once per process: it changes only with the chip's TCB, and a TCB
update restarts the VM.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cleanroom.v1 import attestation_pb2
from evidence.binding import snp_user_data
from sidecar.config import TpmConfig
from sidecar.errors import SnpEvidenceError, TpmError, VcekUnavailableError

__all__ = [
    "HCL_REPORT_NV_INDEX",
    "IMDS_VCEK_URL",
    "USER_DATA_NV_INDEX",
    "NvDevice",
    "SnpCollector",
    "VcekSource",
    "snp_collector",
]

#: The vTPM NV index of the HCL report, and the one whose bytes the next report carries.
HCL_REPORT_NV_INDEX = 0x01400001
USER_DATA_NV_INDEX = 0x01400002
#: Where an Azure confidential VM gets its chip's VCEK (with the header ``Metadata: true``).
IMDS_VCEK_URL = "http://169.254.169.254/metadata/THIM/amd/certification"
#: The metadata answer and a VCEK file are a few KiB; anything larger is not one.
_MAX_VCEK_DOCUMENT = 64 * 1024


class NvDevice(Protocol):
    """The NV operations of :class:`sidecar.tpm.Tpm` the collector uses."""

    def nv_read(self, index: int) -> bytes: ...

    def nv_write(self, index: int, data: bytes) -> None: ...


def _der_from(data: bytes, where: str) -> bytes:
    """The VCEK as DER, from DER, PEM, or the metadata service's JSON (``vcekCert``)."""
    text = data.lstrip()
    try:
        if text.startswith(b"{"):
            doc = json.loads(text)
            pem = doc.get("vcekCert") if isinstance(doc, dict) else None
            if not isinstance(pem, str):
                raise VcekUnavailableError(f"{where}: the JSON answer has no vcekCert")
            text = pem.encode()
        if text.startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(text)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise VcekUnavailableError(f"{where}: not a VCEK certificate ({e})") from e
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class VcekSource:
    """Where the VCEK comes from: ``file`` when set, else ``url`` (the metadata service)."""

    file: str | None = None
    url: str = IMDS_VCEK_URL
    timeout_seconds: float = 5.0
    _cached: bytes | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        # Only HTTP(S): urllib would also open file: and other schemes.
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the VCEK URL must be http:// or https://, got {self.url!r}")

    def fetch(self) -> bytes:
        """The VCEK, DER (fetched once, then cached).

        Raises:
            VcekUnavailableError: the file cannot be read, the service does not answer in
                time or with a VCEK.
        """
        with self._lock:
            if self._cached is None:
                self._cached = self._read_file() if self.file else self._read_url()
            return self._cached

    def _read_file(self) -> bytes:
        assert self.file is not None
        path = Path(self.file)
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_VCEK_DOCUMENT + 1)
        except OSError as e:
            raise VcekUnavailableError(
                f"cannot read the VCEK file {path}: {e.strerror or e}"
            ) from e
        if len(data) > _MAX_VCEK_DOCUMENT:
            raise VcekUnavailableError(f"the VCEK file {path} is too large")
        return _der_from(data, str(path))

    def _read_url(self) -> bytes:
        # The scheme is checked in __post_init__ (http or https only).
        request = urllib.request.Request(self.url, headers={"Metadata": "true"})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:  # noqa: S310
                data = response.read(_MAX_VCEK_DOCUMENT + 1)
        except urllib.error.HTTPError as e:
            raise VcekUnavailableError(
                f"the metadata service at {self.url} answered HTTP {e.code}: is this an Azure "
                "SEV-SNP confidential VM?"
            ) from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VcekUnavailableError(
                f"cannot fetch the VCEK from {self.url} within {self.timeout_seconds:g} s: {reason}"
            ) from e
        if len(data) > _MAX_VCEK_DOCUMENT:
            raise VcekUnavailableError(f"the answer from {self.url} is too large for a VCEK")
        return _der_from(data, self.url)


@dataclass
class SnpCollector:
    """Makes the SEV-SNP evidence for one quote."""

    vcek: VcekSource

    def collect(self, tpm: NvDevice, qualifying_data: bytes) -> attestation_pb2.SnpEvidence:
        """Binds a fresh HCL report to ``qualifying_data`` and returns it with the VCEK.

        Raises:
            SnpEvidenceError: the vTPM refuses the NV write or read (not an Azure vTPM?).
            VcekUnavailableError: see :meth:`VcekSource.fetch`.
        """
        try:
            tpm.nv_write(USER_DATA_NV_INDEX, snp_user_data(qualifying_data))
            report = tpm.nv_read(HCL_REPORT_NV_INDEX)
        except TpmError as e:
            raise SnpEvidenceError(
                f"cannot read the HCL report from the vTPM (NV 0x{HCL_REPORT_NV_INDEX:08x}): {e}"
            ) from e
        return attestation_pb2.SnpEvidence(hcl_report=report, vcek=self.vcek.fetch())


def snp_collector(config: TpmConfig) -> SnpCollector | None:
    """The collector ``config`` asks for (``azure_snp``), or None."""
    if not config.azure_snp:
        return None
    return SnpCollector(
        vcek=VcekSource(
            file=config.vcek_file, url=config.vcek_url, timeout_seconds=config.vcek_timeout_seconds
        )
    )
