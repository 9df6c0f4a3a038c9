"""The SEV-SNP evidence fields of StartEnrollment and Attest are bounded and come in pairs."""

from __future__ import annotations

import pytest

from broker.server import validate
from broker.server.errors import InvalidRequestError
from cleanroom.v1 import attestation_pb2


def _start(**snp: bytes) -> attestation_pb2.StartEnrollmentRequest:
    req = attestation_pb2.StartEnrollmentRequest(ek_public=b"e", ak_public=b"a")
    req.snp_evidence.CopyFrom(attestation_pb2.SnpEvidence(**snp))
    return req


def test_both_parts_are_accepted() -> None:
    validate.check_start_enrollment(_start(hcl_report=b"HCLA", vcek=b"0"))


@pytest.mark.parametrize(
    "snp, field",
    [
        ({"hcl_report": b"HCLA"}, "snp_evidence.vcek"),
        ({"vcek": b"0"}, "snp_evidence.hcl_report"),
        ({"hcl_report": b"x" * 16385, "vcek": b"0"}, "snp_evidence.hcl_report"),
        ({"hcl_report": b"HCLA", "vcek": b"0" * 16385}, "snp_evidence.vcek"),
    ],
    ids=["no-vcek", "no-report", "report-too-large", "vcek-too-large"],
)
def test_a_missing_or_oversized_part_is_refused(snp: dict[str, bytes], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        validate.check_start_enrollment(_start(**snp))
