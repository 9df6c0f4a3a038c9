"""The enrollment record in the state directory, and the run's pure helpers (the workload's
environment, the broker error mapping)."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from broker.client import (
    BrokerClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
)
from cleanroom.v1 import attestation_pb2
from sidecar.dataplane import SOCKET_ENV
from sidecar.run import (
    AttestationDeniedError,
    BrokerUnreachableError,
    RunError,
    RunSetupError,
    workload_environment,
)
from sidecar.run.attest import ATTESTATION, broker_error, is_not_enrolled
from sidecar.run.state import ENROLLMENT_FILE, load_enrollment, save_enrollment


def test_enrollment_record_round_trips_with_private_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load_enrollment(state) is None
    path = save_enrollment(state, ak_name="000b" + "ab" * 32, broker="127.0.0.1:50051")
    assert path == state / ENROLLMENT_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    record = load_enrollment(state)
    assert record is not None
    assert (record.ak_name, record.broker) == ("000b" + "ab" * 32, "127.0.0.1:50051")
    assert record.enrolled_at
    assert record.matches(broker="127.0.0.1:50051")
    assert record.matches(broker="127.0.0.1:50051", ak_name="000b" + "ab" * 32)
    assert not record.matches(broker="other:1")
    assert not record.matches(broker="127.0.0.1:50051", ak_name="000b")
    # Replaced atomically, no temporary file left behind.
    save_enrollment(state, ak_name="000bff", broker="b:1")
    assert [p.name for p in state.iterdir()] == [ENROLLMENT_FILE]
    assert json.loads(path.read_text())["ak_name"] == "000bff"


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"ak_name": "x"}', b"\xff\xfe"])
def test_an_unreadable_record_means_not_enrolled(tmp_path: Path, content: bytes) -> None:
    (tmp_path / ENROLLMENT_FILE).write_bytes(content)
    assert load_enrollment(tmp_path) is None


def test_an_unwritable_state_dir_is_a_setup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunSetupError, match="cannot write the enrollment record"):
        save_enrollment(blocker / "state", ak_name="x", broker="b:1")


def test_the_workload_environment_is_the_approved_one_plus_the_socket() -> None:
    approved = {"LANG": "C.UTF-8", "OMP_NUM_THREADS": "2"}
    env = workload_environment(approved, {SOCKET_ENV: "/run/user/1/x/workload.sock"})
    assert env == {
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "2",
        SOCKET_ENV: "/run/user/1/x/workload.sock",
    }


def _error(cls: type[BrokerClientError], code: grpc.StatusCode, details: str) -> BrokerClientError:
    return cls(f"X: {details} [{code.name}]", code=code, details=details, method="X")


def test_broker_errors_become_one_clear_run_error() -> None:
    unavailable = _error(UnavailableError, grpc.StatusCode.UNAVAILABLE, "failed to connect")
    e = broker_error(unavailable, target="b:1", doing="a challenge")
    assert isinstance(e, BrokerUnreachableError)
    assert str(e) == "cannot reach the broker at b:1 while a challenge, after retries: " + (
        "failed to connect"
    )
    late = _error(DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
    assert isinstance(broker_error(late, target="b:1", doing="x"), BrokerUnreachableError)

    # A broker that sends no AttestDenial: the sidecar says so and guesses at nothing.
    denied = _error(PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, "attestation denied")
    e = broker_error(denied, target="b:1", doing=ATTESTATION)
    assert isinstance(e, AttestationDeniedError)
    assert str(e) == "the broker denied the release (attestation denied; no audit record given)"

    revoked = _error(FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "AK x revoked")
    e = broker_error(revoked, target="b:1", doing="a challenge")
    assert isinstance(e, AttestationDeniedError)
    assert str(e) == "the broker refused a challenge: AK x revoked"
    assert not is_not_enrolled(revoked)
    not_enrolled = _error(
        FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "AK 000b is not enrolled"
    )
    assert is_not_enrolled(not_enrolled)

    bad = _error(InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "quote: too big")
    e = broker_error(bad, target="b:1", doing=ATTESTATION)
    assert type(e) is RunError and "quote: too big" in str(e)


def test_a_denial_states_only_what_the_broker_said() -> None:
    def denied(denial: attestation_pb2.AttestDenial) -> str:
        e = PermissionDeniedError(
            "Attest: attestation denied [PERMISSION_DENIED]",
            code=grpc.StatusCode.PERMISSION_DENIED,
            details="attestation denied",
            method="Attest",
            denial=denial,
        )
        error = broker_error(e, target="b:1", doing=ATTESTATION)
        assert isinstance(error, AttestationDeniedError)
        return str(error)

    golden = attestation_pb2.DENIAL_REASON_PLATFORM_NOT_ACCEPTED
    assert denied(attestation_pb2.AttestDenial(reason=golden, audit_record=42)) == (
        "the broker denied the release (PLATFORM_NOT_ACCEPTED; audit record 42)"
    )
    mixed = attestation_pb2.AttestDenial(
        reason=attestation_pb2.DENIAL_REASON_KEYS_WITHHELD, audit_record=9
    )
    mixed.denied_keys.add(key_id="a", reason=attestation_pb2.DENIAL_REASON_NOT_APPROVED,
                          audit_record=7)  # fmt: skip
    mixed.denied_keys.add(key_id="b", reason=golden, audit_record=8)
    assert denied(mixed) == (
        "the broker denied the release (KEYS_WITHHELD; audit record 9; withheld: "
        "'a' NOT_APPROVED; audit record 7, 'b' PLATFORM_NOT_ACCEPTED; audit record 8)"
    )
    # A reason this sidecar does not know yet (a newer broker) is shown by its number.
    assert denied(attestation_pb2.AttestDenial(reason=99, audit_record=3)) == (  # type: ignore[arg-type]
        "the broker denied the release (reason 99; audit record 3)"
    )
    assert denied(attestation_pb2.AttestDenial(reason=golden)) == (
        "the broker denied the release (PLATFORM_NOT_ACCEPTED; no audit record)"
    )


def test_inputs_whose_keys_were_withheld() -> None:
    from sidecar.run.attest import Attestation
    from sidecar.run.errors import KeyNotReleasedError
    from sidecar.run.runner import _input_specs
    from sidecar.runconfig import BrokerSettings, InputSettings, RunConfig, WorkloadSettings

    def config(*inputs: InputSettings) -> RunConfig:
        return RunConfig(
            broker=BrokerSettings(cert_file="c", key_file="k", ca_file="a"),
            workload=WorkloadSettings(files=("run.py",)),
            inputs=inputs,
        )

    released = Attestation(
        session_id="s1",
        expires_at=None,
        owners={"adv-key": "advertiser"},
        denied=("pub-key",),
        recipients=(),
    )
    adv = InputSettings(name="adv", url="/a", key_id="adv-key")
    optional = InputSettings(name="pub", url="/p", key_id="pub-key", required=False)
    specs = _input_specs(config(adv, optional), released)
    assert [(s.name, s.key_id, s.owner_party) for s in specs] == [("adv", "adv-key", "advertiser")]
    required = InputSettings(name="pub", url="/p", key_id="pub-key")
    with pytest.raises(KeyNotReleasedError, match="withheld data key 'pub-key' of required input"):
        _input_specs(config(adv, required), released)
    # What the broker said of the key, and nothing else.
    told = replace(released, withheld={"pub-key": "PLATFORM_NOT_ACCEPTED; audit record 12"})
    with pytest.raises(KeyNotReleasedError) as info:
        _input_specs(config(adv, required), told)
    assert str(info.value) == (
        "the broker withheld data key 'pub-key' of required input 'pub' "
        "(PLATFORM_NOT_ACCEPTED; audit record 12); the workload was not started"
    )
