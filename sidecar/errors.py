"""Errors of the ``sidecar`` package. Every error it raises derives from :class:`SidecarError`.

The TPM subtree separates "cannot talk to the TPM at all" (:class:`TpmUnavailableError`) from
"the TPM refused a command" (:class:`TpmCommandError`), so that a caller can retry the former
after the platform comes up and report the latter as a configuration or policy problem.
"""

from cleanroom.errors import CleanroomError


class SidecarError(CleanroomError):
    """Root of every error the ``sidecar`` package raises."""


class TpmError(SidecarError):
    """Something went wrong between the sidecar and the TPM."""


class TpmUnavailableError(TpmError):
    """The TPM cannot be reached through the configured TCTI (not running, wrong address)."""


class TpmCommandError(TpmError):
    """The TPM (or the TSS in front of it) refused or failed a command.

    ``rc`` is the TSS2/TPM2 response code, or 0 when the failure was detected by the sidecar.
    """

    def __init__(self, message: str, *, rc: int = 0) -> None:
        super().__init__(message)
        self.rc = rc


class TpmLockoutError(TpmCommandError):
    """The TPM is in dictionary-attack lockout (``TPM_RC_LOCKOUT``), or is rate-limiting the
    writes that count authorization failures (``TPM_RC_NV_RATE``): it refuses to use its
    DA-protected keys, the AK among them, until the lockout is cleared or recovers."""


class PcrResetError(TpmCommandError):
    """The platform does not allow resetting the PCR at the sidecar's locality."""


class PcrNotAvailableError(TpmCommandError):
    """A requested PCR bank (or PCR) is not available in this TPM: it returns no value for it
    and leaves it out of a quote, typically because the bank is not allocated."""


class CredentialActivationError(TpmCommandError):
    """ActivateCredential failed: the credential was made for another AK name or EK, or is
    malformed."""


class AkMismatchError(TpmError):
    """The configured AK handle or key blob holds a key that is not the AK the config asks for."""


class WorkloadMeasurementError(SidecarError):
    """A workload file cannot be measured (missing, unreadable, not a regular file)."""


class PcrMismatchError(WorkloadMeasurementError):
    """After measuring, the TPM's PCR value differs from the event log's replay: something else
    extended the PCR meanwhile."""


class QuoteError(SidecarError):
    """A quote could not be made or is inconsistent with the PCR values read back."""


class InvalidNonceError(QuoteError):
    """The nonce or qualifying data has a length the quote does not accept."""


class FileWriteError(SidecarError):
    """A file the sidecar was asked to write (enrollment material, quote files) cannot be
    written."""


class SnpEvidenceError(SidecarError):
    """The Azure SEV-SNP evidence (the vTPM's HCL report, the chip's VCEK) cannot be collected."""


class VcekUnavailableError(SnpEvidenceError):
    """The VCEK cannot be fetched from the instance metadata service or read from its file."""


class PreparedSidecarError(SidecarError):
    """The prepared sidecar (``cleanroom sidecar serve``) cannot be reached or set up, refused a
    request, or broke the control protocol (docs/sidecar-run.md, "Prepared sidecar")."""
