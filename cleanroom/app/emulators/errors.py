"""The emulators' errors: an emulator is missing or did not start."""

from __future__ import annotations

from cleanroom.errors import CleanroomError

__all__ = ["EmulatorError", "EmulatorNotInstalledError", "EmulatorStartError"]


class EmulatorError(CleanroomError):
    """Root of this package's errors: an emulator is missing or did not start."""


class EmulatorNotInstalledError(EmulatorError):
    """An emulator (Azurite, or Node.js for it) is not installed where it is looked for."""


class EmulatorStartError(EmulatorError):
    """An emulator was found but did not start (or stopped) listening."""
