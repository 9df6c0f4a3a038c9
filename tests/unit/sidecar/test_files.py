"""tpm2-tools file formats written from the sidecar's results, without a TPM."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from tpm2_pytss import TPML_PCR_SELECTION

from sidecar.errors import FileWriteError
from sidecar.tpm.files import tools_pcr_file, write_enrollment_files, write_tools_quote_files
from sidecar.tpm.interface import AkInfo, EkInfo, QuoteResult

VECTORS = Path(__file__).parent / "vectors"

# The PCR 23 values in the vector, as tpm2_quote 5.4 printed them when it wrote the file.
SHA1_23 = bytes.fromhex("D6EBC4E04E1612A1AE465C51C090608BC5E6E174")
SHA256_23 = bytes.fromhex("86BFBCE7F88E77DAB6BBFB923BB70E2411D374DC658DB751C9BDEC438F5CCE54")

SELECTION_SIZE = 132  # TPML_PCR_SELECTION in memory: count + 16 padded TPMS_PCR_SELECTIONs
DIGEST_LIST_SIZE = 532  # TPML_DIGEST in memory: count + 8 TPM2B_DIGESTs of 66 bytes


def test_pcr_file_equals_what_tpm2_quote_wrote() -> None:
    # tpm2-tools writes host byte order; the vector comes from a little-endian (x86-64) host,
    # like every platform the sidecar supports.
    assert sys.byteorder == "little"
    vector = (VECTORS / "tpm2_quote_5.4_pcrs_sha1_sha256_pcr23.bin").read_bytes()
    selection = TPML_PCR_SELECTION.parse("sha1:23+sha256:23")
    assert tools_pcr_file(selection, [SHA1_23, SHA256_23]) == vector


def test_pcr_file_splits_values_into_lists_of_eight() -> None:
    selection = TPML_PCR_SELECTION.parse("sha256:0,1,2,3,4,5,6,7,8")
    values = [bytes([i]) * 32 for i in range(9)]
    data = tools_pcr_file(selection, values)
    assert len(data) == SELECTION_SIZE + 4 + 2 * DIGEST_LIST_SIZE
    (lists,) = struct.unpack_from("=I", data, SELECTION_SIZE)
    first = SELECTION_SIZE + 4
    second = first + DIGEST_LIST_SIZE
    assert lists == 2
    assert struct.unpack_from("=I", data, first)[0] == 8
    assert struct.unpack_from("=I", data, second)[0] == 1
    assert data.index(values[8]) > second
    assert data.index(values[7]) < second


def _result() -> QuoteResult:
    selection = TPML_PCR_SELECTION.parse("sha1:23+sha256:23")
    return QuoteResult(
        attest=b"attest",
        signature=b"signature",
        pcr_selection=selection,
        pcr_values={(23, "sha256"): SHA256_23, (23, "sha1"): SHA1_23},
        pcr_order=((23, "sha1"), (23, "sha256")),
        qualifying_data=b"n",
    )


def test_quote_files_are_written(tmp_path: Path) -> None:
    files = write_tools_quote_files(_result(), tmp_path / "new" / "dir")
    assert files.message.read_bytes() == b"attest"
    assert files.signature.read_bytes() == b"signature"
    # Values go in pcr_order, not in the mapping's order.
    pcrs = files.pcrs.read_bytes()
    assert pcrs.index(SHA1_23) < pcrs.index(SHA256_23)
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == [
        "quote.msg",
        "quote.pcrs",
        "quote.sig",
    ]


def test_unwritable_output_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(FileWriteError, match=f"cannot write {blocker}/quote.msg"):
        write_tools_quote_files(_result(), blocker)


def test_enrollment_files(tmp_path: Path) -> None:
    ek = EkInfo(
        algorithm="ecc",
        public=b"ekpub",
        name=b"ekname",
        certificate=None,
        certificate_index=0x01C0000A,
    )
    ak = AkInfo(
        algorithm="ecc",
        public=b"akpub",
        pem=b"PEM",
        name=b"\x00\x0bname",
        handle=None,
        created=True,
    )
    files = write_enrollment_files(ek, ak, tmp_path)
    assert files.ek_certificate is None and not (tmp_path / "ek.crt").exists()
    assert files.ak_name.read_bytes() == b"\x00\x0bname"
    assert files.ek_public.read_bytes() == b"ekpub" and files.ak_pem.read_bytes() == b"PEM"
    with_cert = EkInfo(
        algorithm="rsa", public=b"p", name=b"n", certificate=b"DER", certificate_index=0x01C00002
    )
    files = write_enrollment_files(with_cert, ak, tmp_path / "rsa")
    assert files.ek_certificate is not None and files.ek_certificate.read_bytes() == b"DER"
