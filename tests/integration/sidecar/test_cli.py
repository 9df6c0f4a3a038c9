"""``cleanroom sidecar enroll/measure/quote`` on a real swtpm, checked with tpm2-tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evidence.pcr import measure_files
from tests.harness.net import free_port
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import (
    assert_nothing_loaded,
    checkquote,
    run_cli,
    write_files,
)

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CLEANROOM_SIDECAR_") and k != "TPM2TOOLS_TCTI"
    }
    env.update(extra)
    return env


def test_enroll_measure_quote_then_checkquote(swtpm: Swtpm, tmp_path: Path) -> None:
    enroll_dir = tmp_path / "enroll"
    proc = run_cli("enroll", "--tcti", swtpm.tcti, "--out", str(enroll_dir), env=_env())
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in enroll_dir.iterdir()}
    assert names == {"ek.pub", "ek.crt", "ak.pub", "ak.pem", "ak.name"}
    ak_name = (enroll_dir / "ak.name").read_bytes()
    assert f"AK name: {ak_name.hex()}" in proc.stdout
    assert "created" in proc.stdout and "0x81010002" in proc.stdout
    assert "certificate from NV 0x01c00002" in proc.stdout

    again = run_cli("enroll", "--tcti", swtpm.tcti, env=_env())
    assert again.returncode == 0 and f"AK name: {ak_name.hex()}" in again.stdout
    assert "existing" in again.stdout

    files = write_files(tmp_path / "wl", {"train.py": b"fit()\n", "data.csv": b"a,b\n1,2\n"})
    log_out = tmp_path / "events.json"
    proc = run_cli(
        "measure", "--tcti", swtpm.tcti, "--log-out", str(log_out), *map(str, files), env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    offline = measure_files(files)
    expected_lines = [
        f"sha1:23 0x{offline.pcrs['sha1'].hex().upper()}",
        f"sha256:23 0x{offline.pcrs['sha256'].hex().upper()}",
    ]
    assert proc.stdout.splitlines() == expected_lines
    log = json.loads(log_out.read_text())
    assert [e["path"] for e in log["events"]] == [str(f) for f in files]
    assert log["events"][0]["digests"]["sha256"] == offline.events[0].digests["sha256"].hex()
    assert log["pcrs"] == {bank: value.hex() for bank, value in offline.pcrs.items()}

    offline_cli = run_cli("measure", "--offline", *map(str, files), env=_env())
    assert offline_cli.returncode == 0 and offline_cli.stdout.splitlines() == expected_lines

    quote_dir = tmp_path / "quote"
    proc = run_cli(
        "quote", "--tcti", swtpm.tcti, "--nonce", "12345678", "--out", str(quote_dir), env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert "sha1:23+sha256:23" in proc.stdout
    check = checkquote(swtpm, enroll_dir / "ak.pub", quote_dir, "12345678")
    assert check.returncode == 0, check.stderr
    assert f"0x{offline.pcrs['sha256'].hex().upper()}" in check.stdout
    assert checkquote(swtpm, enroll_dir / "ak.pub", quote_dir, "12345670").returncode != 0
    assert_nothing_loaded(swtpm)


def test_tcti_from_environment_and_config_file(swtpm: Swtpm, tmp_path: Path) -> None:
    closed = f"swtpm:host=127.0.0.1,port={free_port()}"
    out = str(tmp_path / "q")

    # TPM2TOOLS_TCTI alone is enough, as for tpm2-tools.
    proc = run_cli("quote", "--nonce", "aa", "--out", out, env=_env(TPM2TOOLS_TCTI=swtpm.tcti))
    assert proc.returncode == 0, proc.stderr

    # CLEANROOM_SIDECAR_TPM_TCTI wins over TPM2TOOLS_TCTI ...
    env = _env(TPM2TOOLS_TCTI=closed, CLEANROOM_SIDECAR_TPM_TCTI=swtpm.tcti)
    assert run_cli("quote", "--nonce", "aa", "--out", out, env=env).returncode == 0
    # ... and --tcti wins over both.
    env = _env(TPM2TOOLS_TCTI=swtpm.tcti, CLEANROOM_SIDECAR_TPM_TCTI=swtpm.tcti)
    proc = run_cli("quote", "--tcti", closed, "--nonce", "aa", "--out", out, env=env)
    assert proc.returncode == 1 and closed in proc.stderr

    # The config file's [tpm] table: its TCTI beats TPM2TOOLS_TCTI; its banks are used.
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[tpm]\ntcti = "{swtpm.tcti}"\nbanks = ["sha256"]\n')
    (wl,) = write_files(tmp_path / "wl", {"a": b"a"})
    proc = run_cli("measure", "--config", str(config), str(wl), env=_env(TPM2TOOLS_TCTI=closed))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"sha256:23 0x{measure_files([wl], ('sha256',)).pcrs['sha256'].hex().upper()}"
    ]

    bad = tmp_path / "bad.toml"
    bad.write_text('[tpm]\nak_algorithm = "dsa"\n')
    proc = run_cli("--config", str(bad), "enroll", env=_env())
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "cleanroom: error: [tpm] ak_algorithm must be 'rsa' or 'ecc', got 'dsa'"
    )
    assert_nothing_loaded(swtpm)


def test_quote_over_a_bank_the_tpm_lacks_fails_and_prints_what_was_quoted(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    # The test TPM has sha1 and sha256 only. The quote must fail naming sha384, not print
    # "quoted sha384:23" over a TPMS_ATTEST that covers no PCR (or drop sha384 silently).
    for banks in ('["sha384"]', '["sha1", "sha384"]'):
        config = tmp_path / "sidecar.toml"
        config.write_text(f'[tpm]\ntcti = "{swtpm.tcti}"\nbanks = {banks}\n')
        out = tmp_path / "q"
        proc = run_cli(
            "quote", "--config", str(config), "--nonce", "ab", "--out", str(out), env=_env()
        )
        assert proc.returncode == 1, (banks, proc.stdout)
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("cleanroom: error: the TPM did not quote sha384:23 "), lines
        assert "is the sha384 PCR bank allocated in this TPM?" in lines[0]
        assert not out.exists()

    # With banks the TPM has, the line reports the PCRs read from the signed quote.
    config.write_text(f'[tpm]\ntcti = "{swtpm.tcti}"\nbanks = ["sha256"]\nextra_pcrs = [7, 0]\n')
    proc = run_cli("quote", "--config", str(config), "--nonce", "ab", "--out", str(out), env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "quoted sha256:0,7,23 with qualifying data ab"
    assert_nothing_loaded(swtpm)
