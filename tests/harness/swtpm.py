"""A real software TPM (swtpm) with sha1+sha256 PCR banks and an EK certificate.

A thin layer over the product's launcher, :mod:`cleanroom.app.devtpm`, which the demo uses too, so
the code that manufactures and serves a swtpm exists once. This module adds what only tests
need: :meth:`Swtpm.tools` to run tpm2-tools against the TPM.

Manufacturing a TPM state (``swtpm_setup``) takes about a second, so the session makes one
template state and each test gets a fresh copy of it, served by its own swtpm process on free
loopback ports. There is no resource manager in front of swtpm: code under test must flush what
it loads, which the tests check with ``tpm2_getcap handles-transient``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cleanroom.app import devtpm
from cleanroom.app.devtpm import SWTPM_LOCALCA_DIR

__all__ = ["SWTPM_LOCALCA_DIR", "Swtpm", "SwtpmUnavailable", "manufacture", "running_copy"]

#: swtpm or swtpm_setup is missing or failed; the tests that need it must fail, not skip.
SwtpmUnavailable = devtpm.DevTpmError


def manufacture(state_dir: Path) -> None:
    """Creates a TPM 2.0 state with sha1+sha256 banks and RSA and ECC EK certificates.

    Raises:
        SwtpmUnavailable: swtpm_setup is missing or fails.
    """
    devtpm.manufacture(state_dir)


class Swtpm(devtpm.Swtpm):
    """One running swtpm on loopback. ``tcti`` is the TCTI string for tpm2-pytss and tpm2-tools.

    Unlike the product's launcher it stays in the test runner's process group, so a Ctrl-C of
    pytest stops it too.
    """

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir=state_dir, new_session=False)

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


@contextmanager
def running_copy(template: Path, state_dir: Path) -> Iterator[Swtpm]:
    """A running swtpm on a copy of ``template`` (a manufactured state) made in ``state_dir``,
    stopped on exit: what every swtpm fixture starts, for one test or for one module."""
    shutil.copytree(template, state_dir)
    tpm = Swtpm(state_dir=state_dir)
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()
