"""``cleanroom sidecar run``: attest with the broker, then run the workload beside its data.

``run_workload(load_run_config("sidecar.toml"), ["python", "run.py"])`` does what the command
does (see :mod:`sidecar.run.runner` for the steps and docs/sidecar-run.md for the config). The
package imports gRPC and tpm2-pytss; the CLI imports it only when ``run`` is invoked.
"""

from sidecar.run.errors import (
    AttestationDeniedError,
    BrokerUnreachableError,
    EnrollmentFailedError,
    KeyNotReleasedError,
    RunError,
    RunInterruptedError,
    RunSetupError,
    WorkloadStartError,
)
from sidecar.run.runner import (
    ENVIRONMENT_DROPPED_PREFIXES,
    NOT_STARTED_EXIT_CODE,
    RunResult,
    run_workload,
    workload_environment,
)

__all__ = [
    "ENVIRONMENT_DROPPED_PREFIXES",
    "NOT_STARTED_EXIT_CODE",
    "AttestationDeniedError",
    "BrokerUnreachableError",
    "EnrollmentFailedError",
    "KeyNotReleasedError",
    "RunError",
    "RunInterruptedError",
    "RunResult",
    "RunSetupError",
    "WorkloadStartError",
    "run_workload",
    "workload_environment",
]
