"""A real software TPM (swtpm) with sha1+sha256 PCR banks and an EK certificate.

Manufacturing a TPM state (``swtpm_setup``) takes about a second, so the session makes one
template state and each test gets a fresh copy of it, served by its own swtpm process on free
loopback ports. There is no resource manager in front of swtpm: code under test must flush what
it loads, which the tests check with ``tpm2_getcap handles-transient``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.net import free_port, port_is_free, wait_for_port

#: Where swtpm-tools' local CA keeps the certificates that sign swtpm EK certificates.
SWTPM_LOCALCA_DIR = Path("/var/lib/swtpm-localca")


class SwtpmUnavailable(RuntimeError):
    """swtpm or swtpm_setup is missing or failed; the tests that need it must fail, not skip."""


def manufacture(state_dir: Path) -> None:
    """Creates a TPM 2.0 state with sha1+sha256 banks and RSA and ECC EK certificates.

    Raises:
        SwtpmUnavailable: swtpm_setup is missing or fails.
    """
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm") is None:
        raise SwtpmUnavailable("swtpm and swtpm_setup are required (Debian: swtpm swtpm-tools)")
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--create-ek-cert",
            "--create-platform-cert",
            "--pcr-banks",
            "sha1,sha256",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SwtpmUnavailable(f"swtpm_setup failed: {proc.stdout}\n{proc.stderr}")


@dataclass
class Swtpm:
    """One running swtpm on loopback. ``tcti`` is the TCTI string for tpm2-pytss and tpm2-tools."""

    state_dir: Path
    port: int = 0
    ctrl_port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for running tpm2-tools against this TPM."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def start(self) -> None:
        """Starts swtpm on fresh ports (startup-clear already done, like a booted platform)."""
        for _ in range(20):
            # The swtpm TCTI always talks to the control channel on port + 1, so both must be free.
            self.port = free_port()
            self.ctrl_port = self.port + 1
            if not port_is_free(self.ctrl_port):
                continue
            self._proc = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                wait_for_port(
                    self.port,
                    timeout=5,
                    alive=lambda: self._proc is not None and self._proc.poll() is None,
                )
                return
            except TimeoutError:
                self.stop()
        raise SwtpmUnavailable("swtpm did not start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        """Stops and starts swtpm on the same state: what a reboot of the VM looks like."""
        self.stop()
        time.sleep(0.05)
        self.start()

    def tools(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a tpm2-tools program against this TPM; with ``check``, fails showing its stderr."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=False, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc
