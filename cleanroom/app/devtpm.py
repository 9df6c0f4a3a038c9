"""A local software TPM (swtpm) for development, the demo and the tests.

:func:`manufacture` creates a TPM 2.0 state the way a TPM vendor would: sha1 and sha256 PCR
banks, an endorsement key with its certificate in NV (0x01C00002 for RSA), and a platform
certificate, all signed by swtpm-tools' local CA (see :data:`SWTPM_LOCALCA_DIR`). :class:`Swtpm`
serves such a state with ``swtpm socket`` on loopback, already started up (``startup-clear``),
like a booted platform. Its :attr:`Swtpm.tcti` reaches it from tpm2-pytss and tpm2-tools.

This is for machines without a hardware TPM. It is not a security boundary: anyone who can read
the state directory can read the TPM's secrets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Final

from cleanroom.app.errors import (
    DevTpmError,
    SwtpmNotInstalledError,
    SwtpmSetupError,
    SwtpmStartError,
)
from cleanroom.closing import Service
from cleanroom.loopback import accepts, free_port, port_is_free

__all__ = [
    "SWTPM_LOCALCA_DIR",
    "DevTpmError",
    "Swtpm",
    "SwtpmNotInstalledError",
    "SwtpmSetupError",
    "SwtpmStartError",
    "check_installed",
    "ek_ca_files",
    "manufacture",
]

#: Where swtpm-tools' local CA keeps the certificates that sign swtpm EK certificates.
SWTPM_LOCALCA_DIR: Final = Path("/var/lib/swtpm-localca")
#: The local CA's root and issuing certificates: what a broker must trust to accept swtpm EKs.
_LOCALCA_FILES: Final = ("swtpm-localca-rootca-cert.pem", "issuercert.pem")

#: PCR banks a manufactured state has: sha1 as in the manual recipe, sha256 for policy.
PCR_BANKS: Final = ("sha1", "sha256")

_HOST: Final = "127.0.0.1"
_START_ATTEMPTS: Final = 20
_STOP_TIMEOUT: Final = 5.0
_MAX_ERROR_TEXT: Final = 2000


def check_installed() -> None:
    """Checks that ``swtpm`` and ``swtpm_setup`` are on PATH.

    Raises:
        SwtpmNotInstalledError: one of them is missing.
    """
    missing = [tool for tool in ("swtpm", "swtpm_setup") if shutil.which(tool) is None]
    if missing:
        raise SwtpmNotInstalledError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
            "(Debian packages swtpm and swtpm-tools): run `make setup`"
        )


def ek_ca_files() -> tuple[Path, ...]:
    """The certificates of swtpm-tools' local CA, which sign the EK certificates that
    :func:`manufacture` creates. A broker that should accept swtpm EKs trusts these.

    Raises:
        SwtpmNotInstalledError: a certificate is missing or unreadable (swtpm_setup creates
            them the first time it runs, so call this after :func:`manufacture`).
    """
    paths = tuple(SWTPM_LOCALCA_DIR / name for name in _LOCALCA_FILES)
    for path in paths:
        if not os.access(path, os.R_OK):
            raise SwtpmNotInstalledError(
                f"{path} is missing or unreadable: swtpm-tools' local CA is not set up "
                "(run `make setup`)"
            )
    return paths


def _tail(text: str) -> str:
    text = " ".join(text.split())
    return text[-_MAX_ERROR_TEXT:]


def manufacture(state_dir: str | os.PathLike[str]) -> None:
    """Creates a TPM 2.0 state in ``state_dir`` (made if missing, replaced if present).

    The state has sha1 and sha256 PCR banks, RSA and ECC EK certificates and a platform
    certificate, signed by swtpm-tools' local CA. Takes about a second.

    Raises:
        SwtpmNotInstalledError: swtpm or swtpm_setup is missing.
        SwtpmSetupError: swtpm_setup failed (its output is in the message).
    """
    check_installed()
    state = Path(state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SwtpmSetupError(f"cannot create TPM state directory {state}: {e.strerror}") from e
    try:
        proc = subprocess.run(
            [
                "swtpm_setup",
                "--tpm2",
                "--tpmstate",
                str(state),
                "--create-ek-cert",
                "--create-platform-cert",
                "--pcr-banks",
                ",".join(PCR_BANKS),
                "--overwrite",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SwtpmSetupError(f"swtpm_setup could not run: {e}") from e
    if proc.returncode != 0:
        raise SwtpmSetupError(
            f"swtpm_setup exited {proc.returncode}: {_tail(proc.stdout + ' ' + proc.stderr)}"
        )


class Swtpm(Service):
    """One ``swtpm socket`` process serving a manufactured state on loopback.

    The swtpm TCTI always reaches the control channel on the server port + 1, so both ports
    must be free; :meth:`start` picks such a pair. Use it as a context manager, or call
    :meth:`start` and :meth:`stop`.

    Args:
        state_dir: a state made by :func:`manufacture`.
        log_file: where swtpm's output goes (default: kept in a temporary file, shown in the
            error when swtpm fails to start).
        new_session: run swtpm in its own session and process group, so that a Ctrl-C in the
            terminal reaches only its parent, which then stops it in order.
    """

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str],
        log_file: str | os.PathLike[str] | None = None,
        new_session: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.log_file = Path(log_file) if log_file is not None else None
        self.new_session = new_session
        #: The TPM command port (0 until started); the control port is ``port + 1``.
        self.port = 0
        self.ctrl_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"Swtpm(state_dir={str(self.state_dir)!r}, port={self.port})"

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-pytss and tpm2-tools."""
        return f"swtpm:host={_HOST},port={self.port}"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``TPM2TOOLS_TCTI`` set to this TPM."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    @property
    def pid(self) -> int | None:
        """The swtpm process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _open_log(self) -> IO[bytes]:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            return open(self.log_file, "ab")  # kept open while swtpm runs
        return tempfile.TemporaryFile()  # kept open while swtpm runs

    def _log_text(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0)
            return _tail(self._log.read().decode(errors="replace"))
        except (OSError, ValueError):
            return ""

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._log is not None
        return subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=tcp,port={self.port},bindaddr={_HOST}",
                "--ctrl",
                f"type=tcp,port={self.ctrl_port},bindaddr={_HOST}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if accepts(self.port):
                return True
            time.sleep(0.02)
        return False

    def start(self, *, timeout: float = 5.0) -> None:
        """Starts swtpm on a fresh pair of free loopback ports and waits until it listens.

        Raises:
            SwtpmNotInstalledError: swtpm is missing.
            SwtpmStartError: swtpm did not listen (it exited, or every port pair was taken).
        """
        if self.running:
            return
        check_installed()
        last = ""
        for _ in range(_START_ATTEMPTS):
            # Another process may take a port between the check and swtpm's bind; then swtpm
            # exits and the next attempt picks another pair.
            self.port = free_port()
            self.ctrl_port = self.port + 1
            if self.ctrl_port > 65535 or not port_is_free(self.ctrl_port):
                continue
            self._log = self._open_log()
            try:
                self._proc = self._spawn()
            except OSError as e:
                self._close_log()
                raise SwtpmStartError(f"cannot run swtpm: {e.strerror or e}") from e
            if self._wait_listening(timeout):
                return
            last = self._log_text()
            self.stop()
        detail = f": {last}" if last else ""
        raise SwtpmStartError(f"swtpm did not start on {self.state_dir}{detail}")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stops swtpm (SIGTERM, then SIGKILL after five seconds). Stopping twice is harmless."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._close_log()

    def restart(self) -> None:
        """Stops and starts swtpm on the same state (new ports): what a reboot looks like.

        Raises:
            SwtpmStartError: swtpm did not come back.
        """
        self.stop()
        time.sleep(0.05)
        self.start()
