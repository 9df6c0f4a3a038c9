"""The project's one error root.

Every error our packages raise derives from :class:`CleanroomError`, through that package's own
root (``BrokerError``, ``SidecarError``, ``SealingError``, ``PKIError``, ``EvidenceError``,
``WorkloadError``, ``BlobStoreError``, ``ConfigError``, and the application's ``DemoError``,
``EmulatorError``, ``DevTpmError``). The ``cleanroom`` command catches this one class and prints
:attr:`CleanroomError.user_message` as one line; callers that embed a package catch its root.
"""

from __future__ import annotations


class CleanroomError(Exception):
    """Root of every error the project raises."""

    @property
    def user_message(self) -> str:
        """What the person at the terminal reads: the message, or the error's own summary (the
        first line of its docstring) when it was raised without one."""
        text = str(self)
        if text.strip():
            return text
        doc = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0]
        return doc.rstrip(".")


class ConfigError(CleanroomError):
    """A configuration file or environment variable is missing, malformed or of the wrong type."""
