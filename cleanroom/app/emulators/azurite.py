"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), on loopback.

**For the demo and the tests only.** Azurite is installed into the project, not globally, by
``make setup``, which runs::

    npm install --prefix .cache/azurite azurite@3

:func:`find_azurite` looks for ``azurite-blob`` in ``CLEANROOM_AZURITE_BLOB``, then under
``.cache/azurite`` of the source tree and of the working directory, then on ``PATH``, and fails
naming ``make setup`` when it is missing.

Azurite serves the well-known development account ``devstoreaccount1`` path-style at
``http://127.0.0.1:<port>/devstoreaccount1``. :func:`azurite_command` starts it with
``--skipApiVersionCheck`` (the SDK may be newer than the emulator), ``--loose`` (ignore headers
it does not implement) and ``--disableTelemetry`` (it must not try to reach the network).
Its account key is public (Microsoft documents it): data in Azurite is not protected by it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cleanroom.app.emulators import EmulatorError, EmulatorNotInstalledError, EmulatorStartError
from cleanroom.closing import Stoppable
from cleanroom.loopback import free_port, wait_for_port

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "ENV_AZURITE_BLOB",
    "INSTALL_HINT",
    "LOCAL_INSTALL",
    "Azurite",
    "azurite_command",
    "connection_string",
    "create_container",
    "find_azurite",
    "free_port",
    "start_azurite",
    "wait_for_port",
]

#: The emulator's well-known development account and key (public, documented by Microsoft).
AZURITE_ACCOUNT: Final = "devstoreaccount1"
AZURITE_KEY: Final = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

#: An explicit ``azurite-blob`` executable.
ENV_AZURITE_BLOB: Final = "CLEANROOM_AZURITE_BLOB"
#: Where ``make setup`` installs it, relative to the source tree.
_RELATIVE_INSTALL: Final = Path(".cache") / "azurite" / "node_modules" / ".bin" / "azurite-blob"
_SOURCE_ROOT: Final = Path(__file__).resolve().parents[3]
LOCAL_INSTALL: Final = _SOURCE_ROOT / _RELATIVE_INSTALL
INSTALL_HINT: Final = (
    "run 'make setup' in the repository (it runs 'npm install --prefix .cache/azurite azurite@3')"
)
_STOP_TIMEOUT: Final = 5.0


def find_azurite() -> Path:
    """The ``azurite-blob`` executable.

    Raises:
        EmulatorNotInstalledError: it is not installed where the project installs it (or in
            ``CLEANROOM_AZURITE_BLOB``, or on ``PATH``); the message says how to install it.
    """
    override = os.environ.get(ENV_AZURITE_BLOB)
    if override:
        path = Path(override)
        if not path.is_file():
            raise EmulatorNotInstalledError(
                f"{ENV_AZURITE_BLOB}={override} is not a file: unset it to use the project's "
                f"Azurite, or {INSTALL_HINT}"
            )
        return path
    for candidate in (LOCAL_INSTALL, Path.cwd() / _RELATIVE_INSTALL):
        if candidate.is_file():
            return candidate
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    if shutil.which("node") is None:
        raise EmulatorNotInstalledError(
            f"Azurite (the Azure Storage emulator) needs Node.js, which is not installed: "
            f"{INSTALL_HINT}"
        )
    raise EmulatorNotInstalledError(
        f"Azurite (the Azure Storage emulator) is not installed: {INSTALL_HINT} "
        f"(looked for {LOCAL_INSTALL})"
    )


def azurite_command(executable: Path, *, port: int, location: Path) -> list[str]:
    """The command line that serves Azurite's blob service on ``127.0.0.1:port`` with its data
    under ``location``."""
    return [
        str(executable),
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


def connection_string(port: int, *, account_key: str = AZURITE_KEY) -> str:
    """A connection string for the development account of the Azurite on ``port``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={account_key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


def create_container(connection: str, name: str) -> str:
    """Creates container ``name`` (if missing) and returns its ``azure://`` URL.

    Raises:
        EmulatorError: the emulator refused or cannot be reached.
    """
    from azure.core.exceptions import AzureError, ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection)
    try:
        service.create_container(name)
    except ResourceExistsError:
        pass
    except AzureError as e:
        raise EmulatorError(f"cannot create blob container {name!r}: {e}") from e
    finally:
        service.close()
    return f"azure://{AZURITE_ACCOUNT}/{name}"


@dataclass
class Azurite(Stoppable):
    """A running Azurite blob service. Stop it with :meth:`stop` (or use it as a context
    manager)."""

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
        return connection_string(
            self.port, account_key=self.account_key if account_key is None else account_key
        )

    def create_container(self, name: str) -> str:
        """Creates container ``name`` (if missing); returns its ``azure://`` URL.

        Raises:
            EmulatorError: the emulator refused or cannot be reached.
        """
        return create_container(self.connection_string(), name)

    def log(self) -> str:
        """The end of what Azurite printed (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stops the process (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=_STOP_TIMEOUT)


def start_azurite(workdir: Path, *, timeout: float = 30.0, new_session: bool = False) -> Azurite:
    """Starts Azurite's blob service on a free loopback port with its data and log under
    ``workdir``.

    ``new_session`` starts it in a session (process group) of its own, so that a Ctrl-C in the
    terminal reaches only its parent, which stops it.

    Raises:
        EmulatorNotInstalledError: Azurite is not installed.
        EmulatorStartError: it did not start listening in time.
    """
    exe = find_azurite()
    location = workdir / "azurite-data"
    location.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "azurite.log"
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            azurite_command(exe, port=port, location=location),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=new_session,
        )
    azurite = Azurite(port=port, location=location, process=process, log_path=log_path)
    try:
        wait_for_port(port, timeout=timeout, alive=azurite.alive)
    except TimeoutError as e:
        azurite.stop()
        raise EmulatorStartError(f"Azurite did not start: {e}\n{azurite.log()}") from e
    return azurite
