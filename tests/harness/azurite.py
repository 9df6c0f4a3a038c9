"""A real Azurite blob service (the Azure Storage emulator, npm package ``azurite``) on loopback.

Azurite is installed into the project, not globally::

    npm install --prefix .cache/azurite azurite@3

:func:`find_azurite` looks for ``.cache/azurite/node_modules/.bin/azurite-blob`` under the
repository (or the path in ``CLEANROOM_AZURITE_BLOB``, or ``azurite-blob`` on ``PATH``) and fails
with that instruction when it is missing: tests that need Azurite fail rather than skip.

Azurite serves the well-known development account ``devstoreaccount1`` path-style at
``http://127.0.0.1:<port>/devstoreaccount1``. It is started with ``--skipApiVersionCheck`` (the
SDK may be newer than the emulator), ``--loose`` (ignore headers it does not implement) and
``--disableTelemetry`` (it must not try to reach the network).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.net import free_port, wait_for_port

#: The emulator's well-known development account and key (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_INSTALL = REPO_ROOT / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
INSTALL_HINT = "npm install --prefix .cache/azurite azurite@3"


class AzuriteUnavailable(RuntimeError):
    """Azurite is not installed or did not start."""


def find_azurite() -> Path:
    """The ``azurite-blob`` executable.

    Raises:
        AzuriteUnavailable: it is not installed where the project installs it.
    """
    override = os.environ.get("CLEANROOM_AZURITE_BLOB")
    if override:
        path = Path(override)
        if not path.is_file():
            raise AzuriteUnavailable(f"CLEANROOM_AZURITE_BLOB={override} is not a file")
        return path
    if LOCAL_INSTALL.is_file():
        return LOCAL_INSTALL
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    if shutil.which("node") is None:
        raise AzuriteUnavailable(
            "Azurite needs Node.js: install the Debian packages nodejs and npm, then run "
            f"'{INSTALL_HINT}' in the repository"
        )
    raise AzuriteUnavailable(
        f"Azurite is not installed: run '{INSTALL_HINT}' in the repository "
        f"(looked for {LOCAL_INSTALL})"
    )


@dataclass
class Azurite:
    """A running Azurite blob service."""

    port: int
    location: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    account: str = AZURITE_ACCOUNT
    account_key: str = field(default=AZURITE_KEY, repr=False)

    @property
    def account_url(self) -> str:
        """The path-style endpoint of the development account."""
        return f"http://127.0.0.1:{self.port}/{self.account}"

    def connection_string(self, *, account_key: str | None = None) -> str:
        """A connection string for the development account (another key to test refusals)."""
        key = self.account_key if account_key is None else account_key
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={key};"
            f"BlobEndpoint={self.account_url};"
        )

    def log(self) -> str:
        """What Azurite printed (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stops the process (SIGTERM, then SIGKILL after 5 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_azurite(workdir: Path, *, timeout: float = 30.0) -> Azurite:
    """Starts Azurite's blob service on a free loopback port with its data under ``workdir``.

    Raises:
        AzuriteUnavailable: it is not installed or did not start listening in time.
    """
    exe = find_azurite()
    location = workdir / "azurite-data"
    location.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "azurite.log"
    port = free_port()
    cmd = [
        str(exe),
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(location),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
        )
    azurite = Azurite(port=port, location=location, process=process, log_path=log_path)
    try:
        wait_for_port(port, timeout=timeout, alive=azurite.alive)
    except TimeoutError as e:
        azurite.stop()
        raise AzuriteUnavailable(f"Azurite did not start: {e}\n{azurite.log()}") from e
    return azurite
