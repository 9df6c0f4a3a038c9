"""The sidecar's TPM: the :class:`TpmDevice` protocol, its tpm2-pytss adapter and file formats.

``from sidecar.tpm import Tpm`` loads tpm2-pytss; callers that only need the protocol and the
result types import :mod:`sidecar.tpm.interface`, which does not.
"""

from sidecar.tpm.device import EK_CERT_INDEX, MAX_QUALIFYING_DATA, Tpm, open_tpm
from sidecar.tpm.files import (
    EnrollmentFiles,
    QuoteFiles,
    tools_pcr_file,
    write_enrollment_files,
    write_tools_quote_files,
)
from sidecar.tpm.interface import AkInfo, EkInfo, PcrKey, QuoteResult, TpmDevice

__all__ = [
    "EK_CERT_INDEX",
    "MAX_QUALIFYING_DATA",
    "AkInfo",
    "EkInfo",
    "EnrollmentFiles",
    "PcrKey",
    "QuoteFiles",
    "QuoteResult",
    "Tpm",
    "TpmDevice",
    "open_tpm",
    "tools_pcr_file",
    "write_enrollment_files",
    "write_tools_quote_files",
]
