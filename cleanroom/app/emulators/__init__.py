"""Local stand-ins for the Azure services, for the demo and the tests only.

Nothing here is used unless asked for (``cleanroom demo --azure-emulators``, the test
fixtures): a deployment talks to the real Azure Key Vault and Blob Storage.

* :mod:`cleanroom.app.emulators.keyvault`: a **test double** of Azure Key Vault, a local HTTPS
  server that speaks the few Key Vault REST calls the broker's KEK provider makes (no Key Vault
  emulator exists). It is not a vault: its keys live in process memory, its TLS CA is
  throwaway and it accepts one static bearer token.
* :mod:`cleanroom.app.emulators.azurite`: a launcher for **Azurite**, Microsoft's storage emulator
  (the npm package ``azurite``, installed by ``make setup`` under ``.cache/azurite``).
"""

from __future__ import annotations

from cleanroom.app.emulators.errors import (
    EmulatorError,
    EmulatorNotInstalledError,
    EmulatorStartError,
)

__all__ = ["EmulatorError", "EmulatorNotInstalledError", "EmulatorStartError"]
