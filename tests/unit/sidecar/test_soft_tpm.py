"""The tests' software TPM (tests/support/softtpm.py) is a faithful TpmDevice: what it
measures and quotes passes the broker's own verifier, and a quote over other values does not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from broker.errors import PcrDigestError
from broker.quote import verify_quote
from broker.tpmkeys import load_public
from evidence.pcr import WORKLOAD_PCR
from sidecar.errors import TpmCommandError
from sidecar.tpm.interface import TpmDevice
from tests.support.softtpm import SoftAk, SoftTpm


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_a_software_quote_passes_the_broker_verifier(tmp_path: Path, alg: str) -> None:
    (tmp_path / "run.py").write_bytes(b"print('hello')\n")
    tpm: TpmDevice = SoftTpm(SoftAk.generate(alg))
    measurement = tpm.measure([tmp_path / "run.py"], ["run.py"])
    qualifying = hashlib.sha256(b"nonce").digest()
    quote = tpm.quote(qualifying)
    ak = load_public(tpm.create_or_load_ak().public)
    verified = verify_quote(
        ak=ak,
        attest=quote.attest,
        signature=quote.signature,
        pcr_values=quote.pcr_values,
        expected_qualifying_data=qualifying,
        event_log=measurement.events,
    )
    assert verified.pcr_values[(WORKLOAD_PCR, "sha256")] == measurement.pcrs["sha256"]
    lying = dict(quote.pcr_values)
    lying[(WORKLOAD_PCR, "sha256")] = bytes(32)
    with pytest.raises(PcrDigestError):
        verify_quote(
            ak=ak,
            attest=quote.attest,
            signature=quote.signature,
            pcr_values=lying,
            expected_qualifying_data=qualifying,
        )


def test_the_software_tpm_has_no_ek() -> None:
    with pytest.raises(TpmCommandError, match="no EK"):
        SoftTpm().create_ek()
