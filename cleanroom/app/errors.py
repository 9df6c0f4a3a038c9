"""The application's own errors (the development TPM); the demo and the emulators keep theirs in
``cleanroom.app.demo.errors`` and ``cleanroom.app.emulators.errors``."""

from __future__ import annotations

from cleanroom.errors import CleanroomError

__all__ = ["DevTpmError", "SwtpmNotInstalledError", "SwtpmSetupError", "SwtpmStartError"]


class DevTpmError(CleanroomError):
    """Root of this module's errors: swtpm is missing, cannot manufacture a state or start."""


class SwtpmNotInstalledError(DevTpmError):
    """``swtpm`` or ``swtpm_setup`` is not on PATH, or swtpm-tools' local CA is missing."""


class SwtpmSetupError(DevTpmError):
    """``swtpm_setup`` failed to manufacture a TPM state."""


class SwtpmStartError(DevTpmError):
    """``swtpm socket`` did not start listening (it exited, or no usable port pair was found)."""
