"""Errors of ``cleanroom sidecar run`` (``sidecar.run``).

They sit under the sidecar's root error, so the CLI prints each as one line and exits 1::

    SidecarError
    └── RunError
        ├── RunSetupError              the command, the workload's files or directory, an input
        │                              file or the sidecar's certificate cannot be used
        ├── BrokerUnreachableError     the broker did not answer, after the configured retries
        ├── EnrollmentFailedError      enrolling the AK by credential activation failed
        ├── AttestationDeniedError     the broker refused the challenge or the attestation
        │   └── KeyNotReleasedError        a required input's data key was withheld
        ├── WorkloadStartError         the workload's command could not be started
        └── RunInterruptedError        SIGTERM/SIGHUP arrived before the workload started

Every failure before the workload starts raises one of these (or a TPM or config error) and
leaves nothing running. Messages name files, key ids and the broker, never key material.
"""

from __future__ import annotations

from sidecar.errors import SidecarError

__all__ = [
    "AttestationDeniedError",
    "BrokerUnreachableError",
    "EnrollmentFailedError",
    "KeyNotReleasedError",
    "RunError",
    "RunInterruptedError",
    "RunSetupError",
    "WorkloadStartError",
]


class RunError(SidecarError):
    """Root of the errors of ``sidecar run``."""


class RunSetupError(RunError):
    """Something the configuration or the command line names cannot be used (missing command,
    workload directory or file, input file, unreadable certificate)."""


class BrokerUnreachableError(RunError):
    """The broker could not be reached, or did not answer in time, after the retries."""


class EnrollmentFailedError(RunError):
    """Enrolling the AK with the broker by credential activation failed."""


class AttestationDeniedError(RunError):
    """The broker refused to issue a challenge (AK revoked) or refused the attestation."""


class KeyNotReleasedError(AttestationDeniedError):
    """The attestation succeeded, but the data key of a required input was withheld."""


class WorkloadStartError(RunError):
    """The workload's command could not be executed."""


class RunInterruptedError(RunError):
    """A termination signal arrived before the workload started; nothing was started."""
