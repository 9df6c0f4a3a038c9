"""The files tpm2-tools reads and writes, produced from the sidecar's TPM results.

``quote.msg``, ``quote.sig`` and ``quote.pcrs`` are what ``tpm2_quote --message/--signature/--pcr``
write, so ``tpm2_checkquote`` verifies a sidecar quote exactly as in the manual recipe;
``ek.pub``, ``ak.pub`` and ``ak.name`` are what ``tpm2_createek``/``tpm2_createak`` write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.errors import FileWriteError
from sidecar.tpm.interface import AkInfo, EkInfo, QuoteResult

# A TPML_DIGEST holds at most eight digests; tpm2-tools writes one per TPM2_PCR_Read answer,
# and tpm2_checkquote concatenates them in order, so any split into groups of <= 8 is read back
# the same way.
_DIGESTS_PER_LIST = 8


@dataclass(frozen=True)
class QuoteFiles:
    """Paths of the three files ``tpm2_checkquote`` takes."""

    message: Path
    signature: Path
    pcrs: Path


@dataclass(frozen=True)
class EnrollmentFiles:
    """Paths of the enrollment material; ``ek_certificate`` is None when the TPM has none."""

    ek_public: Path
    ek_certificate: Path | None
    ak_public: Path
    ak_pem: Path
    ak_name: Path


def tools_pcr_file(pcr_selection: Any, values: Sequence[bytes]) -> bytes:
    """The bytes of a ``tpm2_quote --pcr`` file for ``pcr_selection`` and its values in order.

    tpm2-tools 5.x writes this file by dumping C structures as they are in memory (so in the
    host's byte order, with the compiler's padding): the TPML_PCR_SELECTION, a UINT32 count of
    TPML_DIGEST lists, then the lists. We let the TSS's own C definitions lay the structures out
    through cffi rather than re-deriving sizes and padding by hand.

    Raises:
        ValueError: a value is longer than a TPM2B_DIGEST holds.
    """
    from tpm2_pytss import TPM2B_DIGEST, TPML_DIGEST, TPML_PCR_SELECTION
    from tpm2_pytss._libtpm2_pytss import ffi

    # A fresh copy: its C structure is zero-filled (padding and unused entries, as tpm2-tools'
    # are) and held through a pointer, which is what ffi.buffer needs.
    selection, _ = TPML_PCR_SELECTION.unmarshal(pcr_selection.marshal())
    out = bytearray(ffi.buffer(selection._cdata))
    groups = [values[i : i + _DIGESTS_PER_LIST] for i in range(0, len(values), _DIGESTS_PER_LIST)]
    count = ffi.new("uint32_t *", len(groups))
    out += ffi.buffer(count)
    for group in groups:
        digests = TPML_DIGEST([TPM2B_DIGEST(v) for v in group])
        out += ffi.buffer(digests._cdata)
    return bytes(out)


def write_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` atomically (a reader sees the old file or the whole new one).

    Raises:
        FileWriteError: the directory or file cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise FileWriteError(f"cannot write {path}: {e.strerror or e}") from e


def write_tools_quote_files(result: QuoteResult, out_dir: str | os.PathLike[str]) -> QuoteFiles:
    """Writes ``quote.msg``, ``quote.sig`` and ``quote.pcrs`` into ``out_dir`` (created if needed).

    Raises:
        FileWriteError: a file cannot be written.
    """
    out = Path(out_dir)
    files = QuoteFiles(
        message=out / "quote.msg", signature=out / "quote.sig", pcrs=out / "quote.pcrs"
    )
    values = [result.pcr_values[key] for key in result.pcr_order]
    write_file(files.message, result.attest)
    write_file(files.signature, result.signature)
    write_file(files.pcrs, tools_pcr_file(result.pcr_selection, values))
    return files


def write_enrollment_files(
    ek: EkInfo, ak: AkInfo, out_dir: str | os.PathLike[str]
) -> EnrollmentFiles:
    """Writes ``ek.pub``, ``ek.crt`` (when the TPM has an EK certificate), ``ak.pub``, ``ak.pem``
    and ``ak.name`` into ``out_dir`` (created if needed).

    Raises:
        FileWriteError: a file cannot be written.
    """
    out = Path(out_dir)
    files = EnrollmentFiles(
        ek_public=out / "ek.pub",
        ek_certificate=out / "ek.crt" if ek.certificate is not None else None,
        ak_public=out / "ak.pub",
        ak_pem=out / "ak.pem",
        ak_name=out / "ak.name",
    )
    write_file(files.ek_public, ek.public)
    if files.ek_certificate is not None and ek.certificate is not None:
        write_file(files.ek_certificate, ek.certificate)
    write_file(files.ak_public, ak.public)
    write_file(files.ak_pem, ak.pem)
    write_file(files.ak_name, ak.name)
    return files
