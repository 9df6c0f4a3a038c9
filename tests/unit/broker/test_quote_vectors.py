"""Every stored quote vector (made by tpm2-tools on swtpm) gets exactly its expected verdict."""

from __future__ import annotations

import pytest

from broker.errors import VerificationError
from broker.quote import pcr_values_from_tools
from tests.vectors.evidence import QuoteVector, quote_vectors

VECTORS = quote_vectors()


def test_vectors_are_present() -> None:
    names = {v.name for v in VECTORS}
    assert {"quote-rsa-rsassa-valid", "quote-ecc-p256-ecdsa-valid"} <= names
    # Every error class of the verifier is guarded by at least one vector.
    expected = {
        "MalformedEvidenceError",
        "NotTpmGeneratedError",
        "AttestTypeError",
        "SignatureError",
        "UnsupportedAlgorithmError",
        "QualifiedSignerError",
        "QualifyingDataError",
        "PcrDigestError",
        "PcrSelectionError",
        "EventLogReplayError",
    }
    assert expected <= {v.expect for v in VECTORS}
    # The refusals that a quote which otherwise verifies must still get (issue 13).
    assert {
        "quote-rsa-signer-not-the-eks-ak",
        "quote-rsa-event-size-not-its-data",
        "quote-ecc-event-size-not-its-data",
    } <= names


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_vector_verdict(vector: QuoteVector) -> None:
    cls = vector.error_class
    if cls is None:
        verified = vector.verify()
        assert dict(verified.pcr_values) == vector.pcr_values
        assert verified.qualifying_data == vector.qualifying_data
        if vector.event_log is not None:
            assert "sha256" in verified.event_log_banks
        return
    with pytest.raises(VerificationError) as info:
        vector.verify()
    # The exact class, not merely a VerificationError: each failure has its own type.
    assert type(info.value) is cls, f"{vector.name}: {info.value!r}"
    assert str(info.value)


@pytest.mark.parametrize(
    "vector",
    [v for v in VECTORS if v.tools_pcr_file is not None],
    ids=[v.name for v in VECTORS if v.tools_pcr_file is not None],
)
def test_tools_pcr_file_reads_to_the_reported_values(vector: QuoteVector) -> None:
    assert vector.tools_pcr_file is not None
    got = pcr_values_from_tools(vector.tools_pcr_file, attest=vector.attest)
    assert got == vector.pcr_values
    assert list(got) == list(vector.pcr_values)
