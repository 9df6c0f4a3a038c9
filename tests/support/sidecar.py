"""Helpers for the sidecar's TPM tests: tpm2-tools checks, the CLI in a process, files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness.swtpm import Swtpm

REPO = Path(__file__).resolve().parents[2]

#: A second persistent handle, for tests that need another AK beside the default one.
OTHER_AK_HANDLE = 0x81010003


def assert_nothing_loaded(swtpm: Swtpm) -> None:
    """No transient object and no session is left in the TPM (there is no resource manager)."""
    transient = swtpm.tools("tpm2_getcap", "handles-transient").stdout.strip()
    sessions = swtpm.tools("tpm2_getcap", "handles-loaded-session").stdout.strip()
    assert transient == "", f"transient objects left behind: {transient}"
    assert sessions == "", f"sessions left behind: {sessions}"


def checkquote(
    swtpm: Swtpm, ak_pub: Path, quote_dir: Path, qualification_hex: str
) -> subprocess.CompletedProcess[str]:
    """Runs tpm2_checkquote exactly as the manual recipe does; returns without raising."""
    return swtpm.tools(
        "tpm2_checkquote",
        "--public",
        str(ak_pub),
        "--message",
        str(quote_dir / "quote.msg"),
        "--signature",
        str(quote_dir / "quote.sig"),
        "--pcr",
        str(quote_dir / "quote.pcrs"),
        "--qualification",
        qualification_hex,
        check=False,
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Runs ``cleanroom sidecar ...`` in a new process, as a user would."""
    full_env = dict(os.environ if env is None else env)
    full_env.pop("TSS2_LOG", None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "cleanroom.app.cli", "sidecar", *args],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def write_files(directory: Path, contents: dict[str, bytes]) -> list[Path]:
    """Writes workload files and returns their paths in the given order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in contents.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def drive_into_lockout(tpm: Swtpm, directory: Path) -> None:
    """Puts the TPM into dictionary-attack lockout the way a real one gets there: failed
    authorizations of a DA-protected key, after lowering the threshold to two failures."""
    tpm.tools(
        "tpm2_dictionarylockout",
        "--setup-parameters",
        "--max-tries=2",
        "--recovery-time=600",
        "--lockout-recovery-time=600",
    )
    ctx = directory / "da-key.ctx"
    tpm.tools("tpm2_createprimary", "-C", "o", "-G", "ecc", "-p", "secret", "-c", str(ctx))
    # No resource manager: what the tools leave loaded stays, so flush as we go.
    tpm.tools("tpm2_flushcontext", "-t")
    try:
        for _ in range(3):
            failed = tpm.tools(
                "tpm2_create",
                "-C",
                str(ctx),
                "-P",
                "wrong",
                "-G",
                "ecc",
                "-u",
                str(directory / "x.pub"),
                "-r",
                str(directory / "x.priv"),
                check=False,
            )
            assert failed.returncode != 0
            tpm.tools("tpm2_flushcontext", "-t")
    finally:
        tpm.tools("tpm2_flushcontext", "-t", check=False)
    counter = tpm.tools("tpm2_getcap", "properties-variable").stdout
    assert "TPM2_PT_LOCKOUT_COUNTER: 0x2" in counter, counter
