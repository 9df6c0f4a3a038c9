"""``cleanroom sidecar run``: attest with the broker, then run the workload beside its data.

``run_workload(load_run_config("sidecar.toml"), [])`` does what the command does (see
:mod:`sidecar.run.runner` for the steps and docs/sidecar-run.md for the config). The package
imports gRPC and tpm2-pytss; the CLI imports it only when ``run`` is invoked.
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
    NOT_STARTED_EXIT_CODE,
    PreparedLaunch,
    RunResult,
    prepare_launch,
    run_workload,
    workload_environment,
)

__all__ = [
    "NOT_STARTED_EXIT_CODE",
    "AttestationDeniedError",
    "BrokerUnreachableError",
    "EnrollmentFailedError",
    "KeyNotReleasedError",
    "PreparedLaunch",
    "RunError",
    "RunInterruptedError",
    "RunResult",
    "RunSetupError",
    "WorkloadStartError",
    "prepare_launch",
    "run_workload",
    "workload_environment",
]
