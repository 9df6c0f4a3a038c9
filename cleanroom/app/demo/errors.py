"""Errors of ``cleanroom demo``. Every error it raises derives from :class:`DemoError`, and each
message is one line that says what failed and, where it helps, what to do about it."""

from __future__ import annotations

from cleanroom.errors import CleanroomError


class DemoError(CleanroomError):
    """Root of the errors the demo raises."""


class PrerequisiteError(DemoError):
    """Something the demo needs is not installed or not set up (swtpm, swtpm's local CA)."""


class WorkspaceError(DemoError):
    """The demo directory cannot be created, is not a demo directory, or a file in it cannot be
    written."""


class ServiceError(DemoError):
    """A process the demo started (swtpm, the broker, the sidecar) failed to start or exited
    with an error; the message names its log file."""


class StepError(DemoError):
    """A step that the demo runs in-process (issuing certificates, sealing, registering a key,
    approving, opening an output) failed; the message names the step and the acting identity."""


class UnexpectedOutcomeError(DemoError):
    """The clean room did something it must not do: released a key to the tampered workload,
    or produced outputs that are missing or do not open."""
