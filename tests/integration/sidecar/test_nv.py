"""The TPM adapter's NV reads and writes (the Azure vTPM's HCL report path), on swtpm, checked
against tpm2-tools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config import TpmConfig
from sidecar.errors import TpmCommandError
from sidecar.tpm.device import Tpm
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import assert_nothing_loaded

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

USER_DATA = 0x01400002
REPORT = 0x01400001


def test_write_defines_the_index_as_tpm2_tools_reads_it(swtpm: Swtpm, tmp_path: Path) -> None:
    data = os.urandom(64)
    with Tpm(TpmConfig(tcti=swtpm.tcti)) as tpm:
        tpm.nv_write(USER_DATA, data)
        tpm.nv_write(USER_DATA, data[::-1])  # the second write reuses the index
    out = tmp_path / "nv.bin"
    swtpm.tools("tpm2_nvread", "-C", "o", "-o", str(out), hex(USER_DATA))
    assert out.read_bytes() == data[::-1]
    assert_nothing_loaded(swtpm)


def test_read_spans_several_nv_buffers(swtpm: Swtpm, tmp_path: Path) -> None:
    # Larger than TPM_PT_NV_BUFFER_MAX (1024 on swtpm): read and written in chunks.
    data = os.urandom(2000)
    src = tmp_path / "report.bin"
    src.write_bytes(data)
    swtpm.tools("tpm2_nvdefine", "-C", "o", "-s", str(len(data)), hex(REPORT))
    swtpm.tools("tpm2_nvwrite", "-C", "o", "-i", str(src), hex(REPORT))
    with Tpm(TpmConfig(tcti=swtpm.tcti)) as tpm:
        assert tpm.nv_read(REPORT) == data
        tpm.nv_write(REPORT, data[::-1])
        assert tpm.nv_read(REPORT) == data[::-1]
    assert_nothing_loaded(swtpm)


def test_reading_an_undefined_index_is_a_clear_error(swtpm: Swtpm) -> None:
    with (
        Tpm(TpmConfig(tcti=swtpm.tcti)) as tpm,
        pytest.raises(TpmCommandError, match="NV index 0x01400001 is not defined"),
    ):
        tpm.nv_read(REPORT)
