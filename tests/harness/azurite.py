"""A real Azurite blob service for tests: a thin layer over :mod:`cleanroom.app.emulators.azurite`.

The launcher lives in the product (the demo's ``--azure-emulators`` uses it too), so its code
exists once. Azurite is installed by ``make setup`` under ``.cache/azurite``; tests that need it
fail (never skip) with that instruction when it is missing.
"""

from __future__ import annotations

from cleanroom.app.emulators import EmulatorError
from cleanroom.app.emulators.azurite import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    INSTALL_HINT,
    LOCAL_INSTALL,
    Azurite,
    find_azurite,
    start_azurite,
)

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "INSTALL_HINT",
    "LOCAL_INSTALL",
    "REPO_ROOT",
    "Azurite",
    "AzuriteUnavailable",
    "find_azurite",
    "start_azurite",
]

REPO_ROOT = LOCAL_INSTALL.parents[4]

#: Azurite is not installed or did not start (the product's root emulator error).
AzuriteUnavailable = EmulatorError
