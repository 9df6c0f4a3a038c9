"""The load benchmark's software AK and quotes: the broker's real checks accept them, and only
them (so the benchmark measures the real verification path, on evidence that could fail it)."""

from __future__ import annotations

import hashlib

import pytest

from broker.errors import PcrDigestError, QualifyingDataError, SignatureError
from broker.quote import verify_quote
from broker.tpmkeys import check_ak_attributes, load_public
from evidence.pcr import MeasurementEvent, replay
from tests.support.softtpm import QUOTED_BANKS, QuoteMaker, SoftAk

EVENTS = (
    MeasurementEvent(
        path="model/train.py",
        size=3,
        digests={bank: hashlib.new(bank, b"abc").digest() for bank in QUOTED_BANKS},
    ),
)
PCR23 = replay(EVENTS, QUOTED_BANKS)
QUALIFYING = hashlib.sha256(b"nonce, ephemeral key and certificate").digest()


@pytest.fixture(scope="module", params=["rsa", "ecc"])
def ak(request: pytest.FixtureRequest) -> SoftAk:
    return SoftAk.generate(request.param)


def _pcr_values(pcr23: dict[str, bytes]) -> dict[tuple[int, str], bytes]:
    return {(23, bank): value for bank, value in pcr23.items()}


def test_the_software_ak_passes_the_attribute_check_and_keeps_its_name(ak: SoftAk) -> None:
    parsed = load_public(ak.tpm2b_public)
    check_ak_attributes(parsed)
    assert parsed.name == ak.name
    assert SoftAk.from_pem(ak.private_pem()).tpm2b_public == ak.tpm2b_public


def test_quotes_verify_with_the_event_log_each_with_its_own_qualifying_data(ak: SoftAk) -> None:
    maker = QuoteMaker(ak, PCR23)
    first = maker.quote(QUALIFYING)
    second = maker.quote(bytes(32))  # the structures are reused: the first must not change
    assert first != second
    for (attest, signature), qualifying in ((first, QUALIFYING), (second, bytes(32))):
        verified = verify_quote(
            ak=load_public(ak.tpm2b_public),
            attest=attest,
            signature=signature,
            pcr_values=_pcr_values(PCR23),
            expected_qualifying_data=qualifying,
            required_pcrs={"sha256": (23,)},
            event_log=EVENTS,
        )
        assert verified.qualified_signer == ak.name
        assert verified.selection == (("sha1", (23,)), ("sha256", (23,)))


def test_the_checks_refuse_a_quote_for_other_data(ak: SoftAk) -> None:
    attest, signature = QuoteMaker(ak, PCR23).quote(QUALIFYING)
    public = load_public(ak.tpm2b_public)
    with pytest.raises(QualifyingDataError):
        verify_quote(
            ak=public,
            attest=attest,
            signature=signature,
            pcr_values=_pcr_values(PCR23),
            expected_qualifying_data=bytes(32),
        )
    other = {bank: bytes(len(v)) for bank, v in PCR23.items()}
    with pytest.raises(PcrDigestError):
        verify_quote(
            ak=public,
            attest=attest,
            signature=signature,
            pcr_values=_pcr_values(other),
            expected_qualifying_data=QUALIFYING,
        )
    with pytest.raises(SignatureError):
        verify_quote(
            ak=load_public(SoftAk.generate(ak.alg).tpm2b_public),
            attest=attest,
            signature=signature,
            pcr_values=_pcr_values(PCR23),
            expected_qualifying_data=QUALIFYING,
        )
