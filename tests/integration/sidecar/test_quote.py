"""Quotes made by the sidecar are what tpm2_quote makes: tpm2_checkquote accepts exactly them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

from evidence.pcr import measure_files
from sidecar.config import TpmConfig
from sidecar.errors import PcrNotAvailableError, QuoteError
from sidecar.tpm import Tpm, write_tools_quote_files
from sidecar.tpm.interface import PcrKey
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import (
    OTHER_AK_HANDLE,
    assert_nothing_loaded,
    checkquote,
    write_files,
)

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

NONCE = bytes.fromhex("12345678")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", ["rsa", "ecc"])
def test_quote_passes_checkquote_and_tampering_fails_it(
    swtpm: Swtpm,
    make_config: Callable[..., TpmConfig],
    tmp_path: Path,
    algorithm: str,
) -> None:
    files = write_files(tmp_path / "wl", {"model.py": b"print('model')\n", "data.bin": b"\0" * 99})
    config = make_config(ak_algorithm=algorithm, ek_algorithm=algorithm)
    with Tpm(config) as tpm:
        ak = tpm.create_or_load_ak()
        tpm.measure(files)
        result = tpm.quote(NONCE)
    ak_pub = tmp_path / "ak.pub"
    ak_pub.write_bytes(ak.public)
    good = tmp_path / "good"
    write_tools_quote_files(result, good)
    assert_nothing_loaded(swtpm)

    ok = checkquote(swtpm, ak_pub, good, NONCE.hex())
    assert ok.returncode == 0, ok.stderr
    offline = measure_files(files)
    for bank in ("sha1", "sha256"):
        assert "0x" + offline.pcrs[bank].hex().upper() in ok.stdout
        assert result.pcr_values[(23, bank)] == offline.pcrs[bank]

    # One byte changed in each file: the message, the signature, a quoted PCR value.
    pcrs_data = (good / "quote.pcrs").read_bytes()
    offsets = {
        "quote.msg": len(result.attest) // 2,
        "quote.sig": len(result.signature) - 1,
        "quote.pcrs": pcrs_data.index(result.pcr_values[(23, "sha256")]) + 5,
    }
    for name, offset in offsets.items():
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        _flip(bad / name, offset)
        assert checkquote(swtpm, ak_pub, bad, NONCE.hex()).returncode != 0, name

    assert checkquote(swtpm, ak_pub, good, "12345679").returncode != 0

    with Tpm(make_config(ak_algorithm=algorithm, ak_handle=OTHER_AK_HANDLE)) as tpm:
        other = tpm.create_or_load_ak()
    assert other.name != ak.name
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(other.public)
    assert checkquote(swtpm, other_pub, good, NONCE.hex()).returncode != 0
    assert_nothing_loaded(swtpm)


def test_pcr_file_is_byte_for_byte_what_tpm2_quote_writes(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    # Eleven PCRs in two banks: 22 values, more than one TPM2_PCR_Read answer (at most 8) and
    # more than one TPML_DIGEST in the file.
    pcrs = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 23)
    config = make_config(extra_pcrs=pcrs[:-1])
    files = write_files(tmp_path / "wl", {"a": b"a", "b": b"b"})
    with Tpm(config) as tpm:
        ak = tpm.create_or_load_ak()
        tpm.measure(files)
        result = tpm.quote(NONCE, config.quoted_pcrs)
    ours = tmp_path / "ours"
    write_tools_quote_files(result, ours)
    assert_nothing_loaded(swtpm)
    assert len(result.pcr_values) == 22

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    listing = ",".join(str(p) for p in pcrs)
    swtpm.tools(
        "tpm2_quote",
        "--key-context",
        f"0x{config.ak_handle:08x}",
        "--pcr-list",
        f"sha1:{listing}+sha256:{listing}",
        "--message",
        str(theirs / "quote.msg"),
        "--signature",
        str(theirs / "quote.sig"),
        "--qualification",
        NONCE.hex(),
        "--hash-algorithm",
        "sha256",
        "--pcr",
        str(theirs / "quote.pcrs"),
    )
    assert (ours / "quote.pcrs").read_bytes() == (theirs / "quote.pcrs").read_bytes()

    ak_pub = tmp_path / "ak.pub"
    ak_pub.write_bytes(ak.public)
    for directory in (ours, theirs):
        proc = checkquote(swtpm, ak_pub, directory, NONCE.hex())
        assert proc.returncode == 0, proc.stderr


class _ExtendsAfterQuote(Tpm):
    """A Tpm beside which another writer (tpm2_pcrextend) extends PCR 23 after some quotes."""

    def __init__(self, config: TpmConfig, swtpm: Swtpm, interfere: int) -> None:
        super().__init__(config)
        self._swtpm = swtpm
        self._left = interfere

    def read_pcrs(self, selection: Mapping[str, Iterable[int]]) -> dict[PcrKey, bytes]:
        if self._left > 0:
            self._left -= 1
            self._swtpm.tools("tpm2_pcrextend", "23:sha1=" + "22" * 20 + ",sha256=" + "33" * 32)
        return super().read_pcrs(selection)


def test_quote_is_retried_when_a_pcr_changes_before_it_is_read(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    config = make_config()
    with _ExtendsAfterQuote(config, swtpm, interfere=1) as tpm:
        ak = tpm.create_or_load_ak()
        result = tpm.quote(NONCE)
    write_tools_quote_files(result, tmp_path / "q")
    (tmp_path / "ak.pub").write_bytes(ak.public)
    proc = checkquote(swtpm, tmp_path / "ak.pub", tmp_path / "q", NONCE.hex())
    assert proc.returncode == 0, proc.stderr

    with _ExtendsAfterQuote(config, swtpm, interfere=10) as tpm:
        with pytest.raises(QuoteError, match="kept changing"):
            tpm.quote(NONCE)
    assert_nothing_loaded(swtpm)


def test_a_hundred_quotes_leave_nothing_loaded(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    for config in (
        make_config(),
        make_config(ak_algorithm="ecc", ak_handle=0, ak_context_file=str(tmp_path / "ak.blob")),
    ):
        with Tpm(config) as tpm:
            tpm.create_or_load_ak()
            for i in range(100):
                tpm.quote(i.to_bytes(4, "big"))
        # A fresh connection per quote, as a one-shot CLI does.
        for i in range(10):
            with Tpm(config) as tpm:
                tpm.quote(i.to_bytes(4, "big"))
        assert_nothing_loaded(swtpm)


@pytest.mark.parametrize(
    ("banks", "asked", "quoted"),
    [(("sha384",), "sha384:23", "nothing"), (("sha1", "sha384"), "sha1:23+sha384:23", "sha1:23")],
)
def test_a_bank_the_tpm_does_not_have_fails_the_quote(
    swtpm: Swtpm,
    make_config: Callable[..., TpmConfig],
    banks: tuple[str, ...],
    asked: str,
    quoted: str,
) -> None:
    # The test TPM has only sha1 and sha256 banks; TPM2_Quote leaves sha384 out of the signed
    # selection without an error, so the adapter has to compare what it got with what it asked.
    with Tpm(make_config(banks=banks)) as tpm:
        tpm.create_or_load_ak()
        with pytest.raises(PcrNotAvailableError) as info:
            tpm.quote(NONCE)
    assert str(info.value).startswith(
        f"the TPM did not quote sha384:23 (asked for {asked}, quoted {quoted}): "
        "is the sha384 PCR bank allocated in this TPM?"
    )
    assert_nothing_loaded(swtpm)
