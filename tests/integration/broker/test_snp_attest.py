"""End to end on swtpm: the broker requires the AMD SEV-SNP hardware root behind the vTPM.

The sidecar's own code (``Attester`` with ``SnpCollector``, the real TPM adapter on swtpm) attests
to a real broker process over mTLS. A test AMD chain (ARK -> ASK -> VCEK, RSA-PSS SHA-384 with the
TCB extensions, configured as an extra trusted root, never built in) signs synthetic SNP reports
whose runtime claims bind the swtpm's AK; the emulated paravisor writes each into the swtpm's NV
index 0x01400001 when the sidecar writes its user data to 0x01400002, as Azure's does.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.client import BrokerClient, PermissionDeniedError
from cleanroom.v1 import admin_pb2, common_pb2
from evidence.proto import bank_to_pb, event_log_to_pb
from sidecar.config import TpmConfig
from sidecar.dataplane.keyring import KeyRing
from sidecar.run.attest import Attester, enroll
from sidecar.run.errors import AttestationDeniedError, EnrollmentFailedError
from sidecar.snp import SnpCollector, VcekSource
from tests.harness.amd_snp import EmulatedParavisorTpm, SyntheticAmdRoot, SyntheticChip
from tests.harness.launch import TEST_LAUNCH, with_test_launch
from tests.harness.swtpm import Swtpm
from tests.support.broker import (
    SWTPM_EK_CA_FILES,
    TIMEOUT,
    BrokerProcess,
    add_parties,
    register_key,
    start_broker,
    write_config,
)
from tests.support.pki import make_pki

pytestmark = [pytest.mark.swtpm]

WORKLOAD = {"model/train.py": b"print('join and train')\n", "bin/run.sh": b"#!/bin/sh\n"}
MEASUREMENT = b"\x5a" * 48


@pytest.fixture(scope="module")
def amd() -> SyntheticAmdRoot:
    return SyntheticAmdRoot(product="Test")


@pytest.fixture(scope="module")
def chip(amd: SyntheticAmdRoot) -> SyntheticChip:
    return amd.chip()


@dataclass
class Setup:
    broker: BrokerProcess
    swtpm: Swtpm
    tmp: Path

    def client(self) -> BrokerClient:
        cert, key = self.broker.pki.cert_and_key("sidecar", "sidecar-1")
        return BrokerClient.connect(
            target=self.broker.grpc_address,
            cert_file=cert,
            key_file=key,
            ca_file=self.broker.pki.ca_cert,
        )

    def audit(self, action: str = "attest") -> list[admin_pb2.AuditRecord]:
        records = self.broker.admin("operator").ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
        )
        return [r for r in records.records if r.action == action]


def _broker(
    tmp: Path, amd: SyntheticAmdRoot, *, trust_ek_ca: bool = True, **snp: Any
) -> BrokerProcess:
    pki = make_pki(tmp / "pki")
    cas = list(SWTPM_EK_CA_FILES)
    if not trust_ek_ca:
        # The swtpm's EK certificate chains to nothing the broker trusts: only the hardware
        # root can vouch for its EK.
        cas = []
    config = write_config(tmp / "broker.toml", tmp, pki, trusted_ek_ca_files=cas)
    root_file = tmp / "amd-test-root.pem"
    root_file.write_bytes(amd.pem())
    lines = [
        "[broker.azure_snp]",
        f'trusted_root_files = ["{root_file}"]',
        f'allowed_measurements = ["{MEASUREMENT.hex()}"]',
    ]
    for setting, value in snp.items():
        lines.append(f"{setting} = {str(value).lower() if isinstance(value, bool) else value}")
    with config.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return start_broker(config, pki, tmp)


def _setup(
    tmp: Path, swtpm: Swtpm, amd: SyntheticAmdRoot, *, trust_ek_ca: bool = True, **snp: Any
) -> Iterator[Setup]:
    broker = _broker(tmp, amd, trust_ek_ca=trust_ek_ca, **snp)
    try:
        add_parties(broker, "advertiser", "publisher")
        register_key(broker, "advertiser", "adv-data", secrets.token_bytes(32))
        yield Setup(broker=broker, swtpm=swtpm, tmp=tmp)
    finally:
        assert broker.stop() == 0, broker.stderr()


@pytest.fixture
def required(tmp_path: Path, swtpm: Swtpm, amd: SyntheticAmdRoot) -> Iterator[Setup]:
    yield from _setup(tmp_path, swtpm, amd, required=True)


@pytest.fixture
def snp_enrollment(tmp_path: Path, swtpm: Swtpm, amd: SyntheticAmdRoot) -> Iterator[Setup]:
    yield from _setup(tmp_path, swtpm, amd, trust_ek_ca=False, required=True, enroll=True)


@pytest.fixture
def no_snp_enrollment(tmp_path: Path, swtpm: Swtpm, amd: SyntheticAmdRoot) -> Iterator[Setup]:
    yield from _setup(tmp_path, swtpm, amd, trust_ek_ca=False, required=True)


@pytest.fixture
def optional(tmp_path: Path, swtpm: Swtpm, amd: SyntheticAmdRoot) -> Iterator[Setup]:
    yield from _setup(tmp_path, swtpm, amd)


def _manifest() -> common_pb2.WorkloadManifest:
    manifest = common_pb2.WorkloadManifest(name="join-and-train")
    for path, data in WORKLOAD.items():
        entry = manifest.entries.add(path=path, size=len(data))
        for bank in ("sha1", "sha256"):
            entry.digests.add(algorithm=bank_to_pb(bank), value=hashlib.new(bank, data).digest())
    return with_test_launch(manifest)


def _approve(s: Setup, *, require_snp: bool = False) -> None:
    s.broker.admin("party", "advertiser").ApproveWorkload(
        admin_pb2.ApproveWorkloadRequest(
            manifest=_manifest(),
            key_ids=["adv-data"],
            output_recipients=["advertiser"],
            require_snp=require_snp,
        ),
        timeout=TIMEOUT,
    )


def _attest(
    s: Setup,
    *,
    chip: SyntheticChip | None,
    report: dict[str, Any] | None = None,
    stale: bool = False,
    ek_public: Any = None,
) -> tuple[set[str], EmulatedParavisorTpm]:
    """Enrolls the swtpm's AK, measures the workload and attests with the sidecar's code;
    returns the released key ids (empty when denied)."""
    files = []
    for name, data in WORKLOAD.items():
        path = s.tmp / "workload" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(path)
    # An ECC AK keeps the HCL report (AK and RSA EK as JWKs) within the 2 KiB of an swtpm NV
    # index (Azure's vTPM has an RSA AK and a larger NV index; the unit tests verify that one).
    config = TpmConfig(tcti=s.swtpm.tcti, ak_algorithm="ecc")
    assert chip is not None or report is None
    owner = chip or SyntheticAmdRoot(product="Unused").chip()
    tpm = EmulatedParavisorTpm(config, chip=owner, report=report, stale=stale, ek_public=ek_public)
    with tpm, s.client() as client:
        vcek_file = s.tmp / "vcek.pem"
        vcek_file.write_bytes(owner.vcek.public_bytes(serialization.Encoding.PEM))
        collector = SnpCollector(vcek=VcekSource(file=str(vcek_file))) if chip is not None else None
        ak = tpm.create_or_load_ak()
        try:
            ak_name = enroll(tpm, client, ak, snp=collector, certificate_der=_sidecar_der(s))
        except EnrollmentFailedError:
            raise NotEnrolled(str(sys.exc_info()[1])) from None
        measurement = tpm.measure(files, list(WORKLOAD), launch=TEST_LAUNCH)
        attester = Attester(
            tpm=tpm,
            client=client,
            ak_name=ak_name,
            event_log=event_log_to_pb(measurement.events),
            certificate_der=_sidecar_der(s),
            banks=config.banks,
            pcrs=config.quoted_pcrs,
            key_ids=["adv-data"],
            snp=collector,
        )
        with KeyRing(valid_until=None) as ring:
            try:
                attestation = attester.attest(ring)
            except AttestationDeniedError as e:
                assert isinstance(e.__cause__, PermissionDeniedError)
                assert e.__cause__.code == grpc.StatusCode.PERMISSION_DENIED
                return set(), tpm
            return set(attestation.owners), tpm


class NotEnrolled(Exception):
    """The broker refused the enrollment."""


def _sidecar_der(s: Setup) -> bytes:
    cert = x509.load_pem_x509_certificate(
        s.broker.pki.cert_and_key("sidecar", "sidecar-1").cert.read_bytes()
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _last_denial(s: Setup) -> str:
    denials = [r.reason for r in s.audit() if r.decision == "deny"]
    assert denials, "no attestation was denied"
    return denials[-1]


def test_released_with_fresh_hardware_evidence(required: Setup, chip: SyntheticChip) -> None:
    _approve(required)
    released, tpm = _attest(required, chip=chip)
    assert released == {"adv-data"}
    # One report for the enrollment (sent, but the EK certificate is what counts here), one
    # for the attestation.
    assert tpm.reports_made == 2
    # The report really sits in the swtpm's NV index, where tpm2-tools reads it too.
    nv = required.swtpm.tools("tpm2_nvreadpublic", "0x01400001").stdout
    assert "0x1400001" in nv


def test_refused_without_hardware_evidence(required: Setup) -> None:
    _approve(required)
    released, _ = _attest(required, chip=None)
    assert released == set()
    assert "SnpPolicyError: required: no SEV-SNP evidence" in _last_denial(required)


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"stale": True}, "SnpFreshnessError"),
        ({"report": {"policy": 0x3001F | (1 << 19)}}, "SnpPolicyError: debug"),
        ({"report": {"measurement": b"\x5b" * 48}}, "SnpPolicyError: measurement"),
        (
            {"report": {"vm_configuration": {"secure-boot": False}}},
            "SnpPolicyError: vm-configuration: secure-boot",
        ),
    ],
    ids=["stale-user-data", "debug", "measurement-not-allowed", "no-secure-boot"],
)
def test_refused_with_bad_hardware_evidence(
    required: Setup, chip: SyntheticChip, variant: dict[str, Any], reason: str
) -> None:
    _approve(required)
    released, tpm = _attest(required, chip=chip, **variant)
    assert released == set()
    # One report for the enrollment (sent, but the EK certificate is what counts here), one
    # for the attestation.
    assert tpm.reports_made == 2
    assert reason in _last_denial(required)


def test_refused_with_a_root_the_broker_does_not_trust(required: Setup) -> None:
    _approve(required)
    stranger = SyntheticAmdRoot(product="Stranger").chip()
    released, _ = _attest(required, chip=stranger)
    assert released == set()
    assert "SnpChainError" in _last_denial(required)


def test_per_approval_requirement(optional: Setup, chip: SyntheticChip) -> None:
    # The broker does not require the hardware root, but the advertiser does for its key.
    _approve(optional, require_snp=True)
    released, _ = _attest(optional, chip=None)
    assert released == set()
    withheld = [r.reason for r in optional.audit("key.release") if r.decision == "deny"]
    assert any("requires AMD SEV-SNP evidence; none was verified" in r for r in withheld)
    released, _ = _attest(optional, chip=chip)
    assert released == {"adv-data"}


# --- enrollment without an EK certificate ----------------------------------------------------


def _ek_enrollments(s: Setup) -> list[admin_pb2.AuditRecord]:
    return s.audit("ek.enroll")


def _credential_denials(s: Setup) -> list[str]:
    return [r.reason for r in s.audit("ak.credential") if r.decision == "deny"]


def test_hardware_root_vouches_for_an_ek_without_a_trusted_certificate(
    snp_enrollment: Setup, chip: SyntheticChip
) -> None:
    _approve(snp_enrollment)
    released, tpm = _attest(snp_enrollment, chip=chip)
    assert released == {"adv-data"}
    # One report for the enrollment, one for the attestation.
    assert tpm.reports_made == 2
    (ek,) = _ek_enrollments(snp_enrollment)
    assert (
        ek.reason == "credential activated under it; vouched by a verified AMD SEV-SNP HCL report"
    )
    aks = snp_enrollment.broker.admin("operator").ListAks(
        admin_pb2.ListAksRequest(), timeout=TIMEOUT
    )
    assert [a.enrolled_by for a in aks.aks] == ["credential-activation"]


def test_no_enrollment_without_the_hardware_root(snp_enrollment: Setup) -> None:
    # The swtpm's EK certificate is not trusted here, and no SNP evidence comes with it.
    with pytest.raises(NotEnrolled):
        _attest(snp_enrollment, chip=None)
    assert "no self-signed root among the trusted CA" in _credential_denials(snp_enrollment)[-1]
    assert _ek_enrollments(snp_enrollment) == []


def test_no_enrollment_through_the_hardware_root_unless_configured(
    no_snp_enrollment: Setup, chip: SyntheticChip
) -> None:
    with pytest.raises(NotEnrolled):
        _attest(no_snp_enrollment, chip=chip)
    # The evidence is not even looked at: the untrusted EK certificate decides.
    assert "no self-signed root among the trusted CA" in _credential_denials(no_snp_enrollment)[-1]
    assert _ek_enrollments(no_snp_enrollment) == []


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"stale": True}, "SnpFreshnessError"),
        ({"report": {"policy": 0x3001F | (1 << 19)}}, "SnpPolicyError: debug"),
        ("other-ek", "SnpEkBindingError"),
    ],
    ids=["stale-user-data", "debug", "another-tpms-ek"],
)
def test_enrollment_refused_with_bad_hardware_evidence(
    snp_enrollment: Setup, chip: SyntheticChip, variant: Any, reason: str
) -> None:
    if variant == "other-ek":
        from cryptography.hazmat.primitives.asymmetric import ec

        variant = {"ek_public": ec.generate_private_key(ec.SECP256R1()).public_key()}
    with pytest.raises(NotEnrolled):
        _attest(snp_enrollment, chip=chip, **variant)
    assert reason in _credential_denials(snp_enrollment)[-1]
    assert _ek_enrollments(snp_enrollment) == []
