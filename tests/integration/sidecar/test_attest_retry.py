"""The sidecar starts a whole new challenge-quote-attest cycle when the broker answers Attest
with UNAVAILABLE (a transient fault on its side), and never resends an Attest.

A real swtpm quotes; the broker is the scripted fake gRPC server of the client tests (mTLS),
which fails Attest as told and records every request.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from cleanroom.v1 import attestation_pb2, common_pb2
from sidecar.config import TpmConfig
from sidecar.dataplane import KeyRing
from sidecar.run.attest import Attester
from sidecar.run.errors import AttestationDeniedError, BrokerUnreachableError
from sidecar.tpm import Tpm
from tests.harness.swtpm import Swtpm
from tests.support.fake_broker import RunningFake, running_fake
from tests.support.pki import make_pki

pytestmark = [pytest.mark.swtpm]

U = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[RunningFake]:
    with running_fake(make_pki(tmp_path / "pki")) as running:
        expires = datetime.now(UTC) + timedelta(minutes=5)
        challenge = attestation_pb2.GetChallengeResponse(
            nonce=bytes(range(32)),
            pcr_selection=[
                attestation_pb2.PcrSelection(bank=common_pb2.HASH_ALGORITHM_SHA256, indices=[23])
            ],
        )
        answer = attestation_pb2.AttestResponse(session_id="session-1")
        answer.attestation_expires_at.FromDatetime(expires)
        running.fake.responses["GetChallenge"] = challenge
        running.fake.responses["Attest"] = answer
        yield running


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[Tpm]:
    with Tpm(TpmConfig(tcti=swtpm.tcti)) as device:
        device.create_or_load_ak()
        yield device


def _attester(tpm: Tpm, fake: RunningFake, sleeps: list[float]) -> Attester:
    attester = Attester(
        tpm=tpm,
        client=fake.client("sidecar-sidecar-1"),
        ak_name=tpm.create_or_load_ak().name_hex,
        event_log=common_pb2.EventLog(),
        certificate_der=b"the sidecar's certificate",
        banks=["sha256"],
        pcrs=[23],
        key_ids=["k1"],
    )
    attester._sleep = sleeps.append  # record the pauses instead of waiting
    return attester


def test_an_unavailable_attest_is_retried_with_a_new_challenge_and_quote(
    tpm: Tpm, fake: RunningFake
) -> None:
    fake.fake.failures["Attest"] = [U, U]
    sleeps: list[float] = []
    attester = _attester(tpm, fake, sleeps)
    with KeyRing(valid_until=None, reattest=lambda: attester.reattest(ring)) as ring:
        attestation = attester.attest(ring)
    assert attestation.session_id == "session-1"
    assert fake.fake.calls["Attest"] == 3
    assert fake.fake.calls["GetChallenge"] == 3, "each cycle asks for a new challenge"
    requests = [
        r for r in fake.fake.requests["Attest"] if isinstance(r, attestation_pb2.AttestRequest)
    ]
    assert len(requests) == 3
    quotes = [bytes(r.quote.attest) for r in requests]
    keys = [bytes(r.ephemeral_key.public_key) for r in requests]
    assert len(set(quotes)) == 3, "each cycle quotes anew"
    assert len(set(keys)) == 3, "each cycle has its own ephemeral key"
    assert sleeps == [0.5, 1.0]
    assert attester.session_ids == ("session-1",)


def test_a_broker_unavailable_for_every_attempt_is_one_clear_error(
    tpm: Tpm, fake: RunningFake
) -> None:
    fake.fake.failures["Attest"] = [U, U, U]
    attester = _attester(tpm, fake, [])
    with (
        KeyRing(valid_until=None, reattest=lambda: attester.reattest(ring)) as ring,
        pytest.raises(BrokerUnreachableError, match="could not complete the attestation, 3 "),
    ):
        attester.attest(ring)
    assert fake.fake.calls["Attest"] == 3
    assert attester.session_ids == ()


def test_a_denial_is_not_retried(tpm: Tpm, fake: RunningFake) -> None:
    fake.fake.failures["Attest"] = [grpc.StatusCode.PERMISSION_DENIED]
    attester = _attester(tpm, fake, [])
    with (
        KeyRing(valid_until=None, reattest=lambda: attester.reattest(ring)) as ring,
        pytest.raises(AttestationDeniedError),
    ):
        attester.attest(ring)
    assert fake.fake.calls["Attest"] == 1


def test_without_a_challenge_in_hand_the_sidecar_attests_on_one_stream(
    tpm: Tpm, fake: RunningFake
) -> None:
    attester = _attester(tpm, fake, [])
    with KeyRing(valid_until=None, reattest=lambda: attester.reattest(ring)) as ring:
        attester.attest(ring)
        attester.reattest(ring)
    assert fake.fake.calls["AttestStream"] == 2
    assert fake.fake.calls["GetChallenge"] == fake.fake.calls["Attest"] == 2
    # Each stream's evidence answers that stream's challenge.
    sent = [r for r in fake.fake.requests["Attest"] if isinstance(r, attestation_pb2.AttestRequest)]
    assert [bytes(r.nonce) for r in sent] == [bytes(range(32))] * 2


def test_a_broker_without_the_stream_gets_the_unary_calls(tpm: Tpm, fake: RunningFake) -> None:
    fake.fake.disabled.add("AttestStream")
    attester = _attester(tpm, fake, [])
    with KeyRing(valid_until=None, reattest=lambda: attester.reattest(ring)) as ring:
        assert attester.attest(ring).session_id == "session-1"
        attester.reattest(ring)
    # Asked once, then never again: the unary calls from then on.
    assert fake.fake.calls["AttestStream"] == 1
    assert fake.fake.calls["GetChallenge"] == fake.fake.calls["Attest"] == 2
