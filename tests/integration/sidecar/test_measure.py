"""Measuring files into PCR 23 gives the offline values, what tpm2_pcrread reads, in order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from evidence.pcr import measure_files
from sidecar.config import TpmConfig
from sidecar.errors import PcrMismatchError, PcrNotAvailableError, PcrResetError, TpmError
from sidecar.tpm import Tpm
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import REPO, assert_nothing_loaded, write_files

pytestmark = [pytest.mark.swtpm]


def _pcrread(swtpm: Swtpm, tmp_path: Path) -> dict[str, bytes]:
    # tpm2_pcrread --output writes the values one after another in selection order.
    out = tmp_path / "pcrread.bin"
    swtpm.tools("tpm2_pcrread", "sha1:23+sha256:23", "--output", str(out))
    data = out.read_bytes()
    assert len(data) == 20 + 32
    return {"sha1": data[:20], "sha256": data[20:]}


@pytest.mark.tpm2tools
def test_pcr23_equals_offline_computation_and_tpm2_pcrread(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    files = write_files(
        tmp_path / "wl",
        {"train.py": b"import model\n", "model.bin": bytes(range(256)) * 5000, "empty": b""},
    )
    with Tpm(make_config()) as tpm:
        measurement = tpm.measure(files, names=["/app/train.py", "/app/model.bin", "/app/empty"])
        read = tpm.read_pcrs({"sha1": [23], "sha256": [23]})
    offline = measure_files(files, names=["/app/train.py", "/app/model.bin", "/app/empty"])
    assert measurement == offline
    assert [e.path for e in measurement.events] == ["/app/train.py", "/app/model.bin", "/app/empty"]
    assert [e.size for e in measurement.events] == [13, 256 * 5000, 0]
    tools = _pcrread(swtpm, tmp_path)
    for bank in ("sha1", "sha256"):
        assert measurement.pcrs[bank] == offline.pcrs[bank] == tools[bank] == read[(23, bank)]
        assert measurement.pcrs[bank] != bytes(len(measurement.pcrs[bank]))
    assert_nothing_loaded(swtpm)


def test_same_files_give_same_pcr_and_another_order_another(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    a, b = write_files(tmp_path, {"a": b"first", "b": b"second"})
    with Tpm(make_config()) as tpm:
        first = tpm.measure([a, b]).pcrs
        # PCR 23 is reset before measuring, so a second run starts from zeros again.
        again = tpm.measure([a, b]).pcrs
        swapped = tpm.measure([b, a]).pcrs
    assert first == again
    for bank in ("sha1", "sha256"):
        assert swapped[bank] != first[bank]


def test_sha256_only_bank_config(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    files = write_files(tmp_path, {"a": b"x"})
    with Tpm(make_config(banks=("sha256",))) as tpm:
        measurement = tpm.measure(files)
    assert set(measurement.pcrs) == {"sha256"}
    assert measurement.pcrs == measure_files(files, ("sha256",)).pcrs


class _InterferingTpm(Tpm):
    """A Tpm beside which another writer extends PCR 23 (through tpm2-tools) as it measures."""

    def __init__(self, config: TpmConfig, swtpm: Swtpm) -> None:
        super().__init__(config)
        self._swtpm = swtpm

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        super().extend(index, digests)
        self._swtpm.tools("tpm2_pcrextend", "23:sha256=" + "11" * 32)


@pytest.mark.tpm2tools
def test_another_writer_extending_pcr23_is_detected(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    files = write_files(tmp_path, {"a": b"x"})
    with _InterferingTpm(make_config(), swtpm) as tpm:
        with pytest.raises(PcrMismatchError, match=r"PCR 23 \(sha256\).*something else extended"):
            tpm.measure(files)
    assert_nothing_loaded(swtpm)


def test_reset_and_extend_errors(swtpm: Swtpm, make_config: Callable[..., TpmConfig]) -> None:
    with Tpm(make_config()) as tpm:
        with pytest.raises(PcrResetError, match="does not allow resetting PCR 0"):
            tpm.reset_pcr(0)
        with pytest.raises(TpmError, match="sha256 digest must be 32 bytes"):
            tpm.extend(23, {"sha256": b"\x01" * 20})
        with pytest.raises(TpmError, match=r"outside 0\.\.23"):
            tpm.extend(24, {"sha256": b"\x01" * 32})
        with pytest.raises(TpmError, match="unsupported PCR bank 'md5'"):
            tpm.read_pcrs({"md5": [23]})
        tpm.reset_pcr(16)
        tpm.extend(16, {"sha1": b"\x01" * 20, "sha256": b"\x02" * 32})
        assert tpm.read_pcrs({"sha256": [16]})[(16, "sha256")] != bytes(32)
        tpm.reset_pcr(16)
        assert tpm.read_pcrs({"sha256": [16]})[(16, "sha256")] == bytes(32)


def test_the_documented_reset_refusal_is_the_message_the_cli_prints(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig]
) -> None:
    # swtpm lets PCR 23 be reset (as the PC client profile says), so the refusal is produced
    # with PCR 0, whose reset every PC-client TPM refuses at locality 0, through the same code.
    with Tpm(make_config()) as tpm:
        with pytest.raises(PcrResetError) as info:
            tpm.reset_pcr(0)
    assert info.value.rc == 0x907
    printed = f"cleanroom: error: {info.value}"
    assert "PCR 0 at this locality" in printed
    documented = (REPO / "docs" / "sidecar-tpm.md").read_text()
    assert printed.replace("PCR 0 at", "PCR 23 at") in documented.splitlines()
    assert_nothing_loaded(swtpm)


def test_unallocated_bank_is_reported(swtpm: Swtpm, make_config: Callable[..., TpmConfig]) -> None:
    # The test TPM has only sha1 and sha256 banks allocated.
    with Tpm(make_config()) as tpm:
        with pytest.raises(PcrNotAvailableError, match=r"sha384:23.*bank allocated"):
            tpm.read_pcrs({"sha384": [23]})
