"""Errors of the ``evidence`` package. Every error it raises derives from :class:`EvidenceError`."""

from cleanroom.errors import CleanroomError


class EvidenceError(CleanroomError):
    """Root of every error the ``evidence`` package raises."""


class MeasurementError(EvidenceError):
    """A file of a workload manifest cannot be measured (missing, unreadable, not a file)."""


class EventLogError(EvidenceError):
    """An event log is malformed (unknown bank, wrong digest size, too many events)."""


class BindingError(EvidenceError):
    """The inputs to the quote's qualifying data are malformed (wrong nonce length, empty key)."""


class LaunchError(EvidenceError):
    """A launch (command, executable, environment, working directory) is malformed."""
