"""Bad input gives one clear error naming what went wrong, from the library and from the CLI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tpm2_pytss import TPMS_ATTEST

from evidence.binding import qualifying_data
from sidecar.attester import QuoteBinding, make_quote
from sidecar.config import TpmConfig
from sidecar.errors import (
    InvalidNonceError,
    TpmLockoutError,
    TpmUnavailableError,
    WorkloadMeasurementError,
)
from sidecar.tpm import Tpm
from tests.harness.net import free_port
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import (
    assert_nothing_loaded,
    drive_into_lockout,
    run_cli,
    write_files,
)


def _one_line_error(proc: object) -> str:
    import subprocess

    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cleanroom: error: ")
    return str(lines[0])


def test_unreachable_tpm_names_the_tcti(tmp_path: Path) -> None:
    # Nothing listens on a port that was free a moment ago: a TPM that is not running.
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    with pytest.raises(TpmUnavailableError, match=f"cannot reach the TPM through TCTI '{tcti}'"):
        Tpm(TpmConfig(tcti=tcti)).open()
    with pytest.raises(TpmUnavailableError, match="port="):
        make_quote(TpmConfig(tcti=tcti), nonce=b"n")
    line = _one_line_error(
        run_cli("quote", "--tcti", tcti, "--nonce", "12", "--out", str(tmp_path))
    )
    assert tcti in line and "cannot reach the TPM" in line
    line = _one_line_error(run_cli("--tcti", tcti, "enroll"))
    assert tcti in line


def test_unknown_tcti_is_reported() -> None:
    with pytest.raises(TpmUnavailableError, match="nosuchtcti"):
        Tpm(TpmConfig(tcti="nosuchtcti:foo")).open()


@pytest.mark.swtpm
def test_bad_files_are_named(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    (good,) = write_files(tmp_path, {"good": b"ok"})
    # Root reads any file regardless of its mode, so these are the ways a path cannot be
    # measured that hold for root too: it does not exist, it is a directory, it lies under a
    # regular file (ENOTDIR), or it is a FIFO (not a regular file, and reading would block).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path: "not a regular file",
        good / "below-a-file": "does not exist",
        fifo: "not a regular file",
    }
    with Tpm(make_config()) as tpm:
        for path, reason in cases.items():
            with pytest.raises(WorkloadMeasurementError, match=reason) as info:
                tpm.measure([good, path])
            assert f"cannot measure {path}:" in str(info.value)
        # A regular file whose read fails (EIO) after it was opened.
        with pytest.raises(WorkloadMeasurementError, match="/proc/self/mem: Input/output error"):
            tpm.measure([Path("/proc/self/mem")])
    assert_nothing_loaded(swtpm)
    line = _one_line_error(run_cli("measure", "--tcti", swtpm.tcti, str(good), str(fifo)))
    assert str(fifo) in line and "not a regular file" in line
    line = _one_line_error(run_cli("measure", "--offline", str(tmp_path / "missing")))
    assert str(tmp_path / "missing") in line


@pytest.mark.swtpm
def test_file_without_read_permission_is_named(swtpm: Swtpm, tmp_path: Path) -> None:
    # What chmod 000 really does only shows without the capabilities that let root ignore file
    # modes, so as root the CLI runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from
    # its bounding set (setpriv); as another user it runs as is.
    (secret,) = write_files(tmp_path, {"secret": b"nope"})
    secret.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to drop root's DAC override"
        prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")
    line = _one_line_error(run_cli("measure", "--tcti", swtpm.tcti, str(secret), prefix=prefix))
    assert f"cannot measure {secret}: permission denied" in line
    assert_nothing_loaded(swtpm)


@pytest.mark.swtpm
def test_invalid_nonce_lengths_say_what_is_accepted(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    config = make_config()
    with Tpm(config) as tpm:
        for bad in (b"", b"\x01" * 65):
            with pytest.raises(InvalidNonceError, match="must be 1 to 64 bytes, got"):
                tpm.quote(bad)
        tpm.quote(b"\x01" * 64)
        binding = QuoteBinding(kem=1, ephemeral_public_key=b"k" * 32, tls_certificate_der=b"c")
        with pytest.raises(InvalidNonceError, match="nonce must be 32 bytes, got 31"):
            make_quote(config, nonce=b"\x00" * 31, binding=binding, tpm=tpm)
        bound = make_quote(config, nonce=b"\x00" * 32, binding=binding, tpm=tpm)
    # The quote carries the evidence package's binding digest, which the broker recomputes.
    expected = qualifying_data(
        nonce=b"\x00" * 32, kem=1, ephemeral_public_key=b"k" * 32, tls_certificate_der=b"c"
    )
    attest, _ = TPMS_ATTEST.unmarshal(bound.attest)
    assert bound.qualifying_data == bytes(attest.extraData) == expected
    assert_nothing_loaded(swtpm)
    out = str(tmp_path / "q")
    line = _one_line_error(
        run_cli("quote", "--tcti", swtpm.tcti, "--nonce", "ab" * 65, "--out", out)
    )
    assert "1 to 64 bytes, got 65" in line
    line = _one_line_error(run_cli("quote", "--tcti", swtpm.tcti, "--nonce", "xyz", "--out", out))
    assert "hexadecimal" in line
    assert not Path(out).exists()


def test_a_tpm_in_dictionary_attack_lockout_names_the_cause_and_the_fix(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    config = make_config()
    with Tpm(config) as tpm:
        tpm.create_or_load_ak()
    drive_into_lockout(swtpm, tmp_path)
    with Tpm(config) as tpm, pytest.raises(TpmLockoutError) as info:
        tpm.quote(b"n" * 32)
    assert info.value.rc == 0x921
    assert "dictionary-attack lockout" in str(info.value)
    assert "tpm2_dictionarylockout --clear-lockout" in str(info.value)
    assert_nothing_loaded(swtpm)
    line = _one_line_error(
        run_cli("quote", "--tcti", swtpm.tcti, "--nonce", "00" * 32, "--out", str(tmp_path / "q"))
    )
    assert "the TPM is in dictionary-attack lockout" in line
    # A restart of the software TPM does not clear it (the counter is in its NV state); the
    # command the message names does.
    swtpm.stop()
    swtpm.start()
    assert "lockout" in _one_line_error(
        run_cli("quote", "--tcti", swtpm.tcti, "--nonce", "00" * 32, "--out", str(tmp_path / "q"))
    )
    swtpm.tools("tpm2_dictionarylockout", "--clear-lockout")
    assert (
        run_cli(
            "quote", "--tcti", swtpm.tcti, "--nonce", "00" * 32, "--out", str(tmp_path / "q")
        ).returncode
        == 0
    )
