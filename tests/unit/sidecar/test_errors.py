"""The sidecar's errors form one tree under SidecarError."""

from __future__ import annotations

import inspect

import sidecar.errors as errors


def test_every_error_derives_from_sidecar_error_and_is_named_error() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, errors.SidecarError), cls
        assert cls.__name__.endswith("Error"), cls


def test_tpm_command_error_keeps_the_response_code() -> None:
    e = errors.CredentialActivationError("no", rc=0x9A2)
    assert isinstance(e, errors.TpmCommandError) and e.rc == 0x9A2 and str(e) == "no"
    assert issubclass(errors.InvalidNonceError, errors.QuoteError)
    assert issubclass(errors.PcrMismatchError, errors.WorkloadMeasurementError)
    assert issubclass(errors.TpmUnavailableError, errors.TpmError)
