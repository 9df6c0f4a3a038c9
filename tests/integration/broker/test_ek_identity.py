"""One TPM, one identity, against a real broker process and a real swtpm.

The attack: after ``cleanroom admin ek revoke``, whoever controls the TPM creates a new AK and
enrolls it, sending the same EK's public area re-encoded (the RSA exponent written as 65537
instead of 0, another authPolicy, userWithAuth set) with the TPM's real, unchanged EK
certificate. The real TPM activates the credential whatever the encoding, so the broker must
recognise the EK by its key (the SHA-256 of its SubjectPublicKeyInfo), not by its encoding. The
sidecar's side is played by tpm2-tools (``tpm2_createak``, ``tpm2_activatecredential``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker import tpmkeys
from broker.tpmkeys import to_tools_credential_file
from cleanroom.v1 import admin_pb2, attestation_pb2
from pki.ca import init_pki
from tests.harness.reencode import reencode
from tests.harness.swtpm import Swtpm
from tests.support.broker import (
    TIMEOUT,
    BrokerProcess,
    rpc_error,
    running_swtpm_broker,
)
from tests.vectors import tpm2tools as tt

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

CLEANROOM = Path(sys.executable).parent / "cleanroom"
SIDECAR_1 = "spiffe://cleanroom.local/sidecar/sidecar-1"
SIDECAR_2 = "spiffe://cleanroom.local/sidecar/sidecar-2"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with running_swtpm_broker(
        tmp_path,
        init_pki(tmp_path / "pki", parties=("advertiser",), sidecars=("sidecar-1", "sidecar-2")),
    ) as process:
        yield process


def admin_cli(broker: BrokerProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    """``cleanroom admin ARGV`` as the operator, as a separate process."""
    cert, key = broker.pki.cert_and_key("operator")
    return subprocess.run(
        [
            str(CLEANROOM),
            "admin",
            *("--broker", broker.grpc_address, "--cert", str(cert), "--key", str(key)),
            *("--ca", str(broker.pki.ca_cert), "--server-name", "localhost"),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _start(
    broker: BrokerProcess, ek_public: bytes, cert: bytes, ak: tt.KeyFiles, sidecar: str
) -> attestation_pb2.StartEnrollmentResponse:
    stub = broker.attestation("sidecar", sidecar)
    response: attestation_pb2.StartEnrollmentResponse = stub.StartEnrollment(
        attestation_pb2.StartEnrollmentRequest(
            ek_public=ek_public, ek_certificate=cert, ak_public=ak.public.read_bytes()
        ),
        timeout=TIMEOUT,
    )
    return response


def _activate(
    swtpm: Swtpm,
    workdir: Path,
    start: attestation_pb2.StartEnrollmentResponse,
    ak: tt.KeyFiles,
    ek: tt.KeyFiles,
) -> bytes:
    credential = workdir / f"credential-{start.enrollment_id}.out"
    credential.write_bytes(
        to_tools_credential_file(bytes(start.credential_blob), bytes(start.encrypted_secret))
    )
    secret = tt.activate_credential(swtpm, workdir, ak=ak, ek=ek, credential=credential)
    assert secret is not None, "the TPM refused to activate the broker's credential"
    return secret


def _enroll(
    broker: BrokerProcess, swtpm: Swtpm, workdir: Path, ek: tt.KeyFiles, cert: bytes, prefix: str
) -> str:
    """Enrolls a new tpm2_createak AK under ``ek`` by credential activation; its name."""
    ak = tt.create_ak(swtpm, workdir, ek, prefix=prefix)
    start = _start(broker, ek.public.read_bytes(), cert, ak, "sidecar-1")
    secret = _activate(swtpm, workdir, start, ak, ek)
    done = broker.attestation("sidecar", "sidecar-1").CompleteEnrollment(
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=secret),
        timeout=TIMEOUT,
    )
    return str(done.ak_name)


def _records(broker: BrokerProcess) -> list[admin_pb2.AuditRecord]:
    return list(
        broker.admin("operator")
        .ListAuditRecords(admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT)
        .records
    )


def _ek_files(swtpm: Swtpm, workdir: Path) -> tuple[tt.KeyFiles, bytes]:
    ek = tt.create_ek(swtpm, workdir, alg="rsa")
    cert = workdir / "ek.der"
    swtpm.tools("tpm2_nvread", "0x1c00002", "-o", str(cert))
    return ek, cert.read_bytes()


def test_the_ek_is_enrolled_only_by_an_activation_from_the_identity_that_asked(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    ek, cert = _ek_files(swtpm, tmp_path)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    operator = broker.admin("operator")
    start = _start(broker, ek.public.read_bytes(), cert, ak, "sidecar-1")
    # A valid certificate is not enough: nothing is enrolled before the TPM answers.
    assert not operator.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks
    secret = _activate(swtpm, tmp_path, start, ak, ek)

    # Another sidecar holding the right answer cannot complete sidecar-1's enrollment.
    error = rpc_error(
        broker.attestation("sidecar", "sidecar-2").CompleteEnrollment,
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=secret),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"the credential challenge was issued to {SIDECAR_1}, not to {SIDECAR_2}"
    )
    assert not operator.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks
    assert not operator.ListAks(admin_pb2.ListAksRequest(), timeout=TIMEOUT).aks

    # The challenge is still sidecar-1's.
    done = broker.attestation("sidecar", "sidecar-1").CompleteEnrollment(
        attestation_pb2.CompleteEnrollmentRequest(enrollment_id=start.enrollment_id, secret=secret),
        timeout=TIMEOUT,
    )
    (listed,) = operator.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks
    assert listed.ek_id == tpmkeys.load_public(ek.public.read_bytes()).spki_sha256
    assert [
        a.ak_name for a in operator.ListAks(admin_pb2.ListAksRequest(), timeout=TIMEOUT).aks
    ] == [done.ak_name]
    records = [(r.actor, r.action, r.subject, r.decision, r.reason) for r in _records(broker)]
    assert (
        SIDECAR_2,
        "ak.activate",
        start.enrollment_id,
        "deny",
        error.details(),
    ) in records
    enrolls = [r for r in records if r[1] == "ek.enroll"]
    assert enrolls == [
        (
            SIDECAR_1,
            "ek.enroll",
            listed.ek_id,
            "allow",
            "credential activated under it; certificate chains to a trusted EK CA",
        )
    ]


@pytest.mark.parametrize("encoding", ["exponent-65537", "auth-policy", "user-with-auth", "same"])
def test_a_revoked_ek_stays_out_in_every_encoding(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path, encoding: str
) -> None:
    ek, cert = _ek_files(swtpm, tmp_path)
    first = _enroll(broker, swtpm, tmp_path, ek, cert, "ak1")
    (listed,) = broker.admin("operator").ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks
    revoke = admin_cli(broker, "ek", "revoke", listed.ek_id, "--reason", "test: TEE retired")
    assert revoke.returncode == 0, revoke.stderr

    # The attacker's new AK (the old one evicted), with the EK re-encoded and the real cert.
    ak = tt.create_ak(swtpm, tmp_path, ek, prefix="ak2")
    real = ek.public.read_bytes()
    sent = real if encoding == "same" else reencode(real, encoding)
    error = rpc_error(
        broker.attestation("sidecar", "sidecar-1").StartEnrollment,
        attestation_pb2.StartEnrollmentRequest(
            ek_public=sent, ek_certificate=cert, ak_public=ak.public.read_bytes()
        ),
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"EK {listed.ek_id} is revoked",
    )
    # The EK's identity is its key's, whatever the encoding.
    assert tpmkeys.load_public(sent).spki_sha256 == listed.ek_id
    # No credential was issued, so the new AK never enrolls, never gets a nonce, and no key
    # can be released to it.
    ak_name = tpmkeys.load_public(ak.public.read_bytes()).name
    assert ak_name is not None
    error = rpc_error(
        broker.attestation("sidecar", "sidecar-1").GetChallenge,
        attestation_pb2.GetChallengeRequest(ak_name=ak_name.hex()),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not enrolled" in str(error.details())
    # The old AK is out too.
    error = rpc_error(
        broker.attestation("sidecar", "sidecar-1").GetChallenge,
        attestation_pb2.GetChallengeRequest(ak_name=first),
    )
    assert error.details() == f"AK {first} is revoked"

    # One row for the TPM, and the refusal in the audit log.
    listing = admin_cli(broker, "--json", "ek", "list")
    assert listing.returncode == 0, listing.stderr
    assert '"ek_id": "' + listed.ek_id + '"' in listing.stdout
    assert listing.stdout.count('"ek_id"') == 1
    aks = broker.admin("operator").ListAks(admin_pb2.ListAksRequest(), timeout=TIMEOUT).aks
    assert [a.ak_name for a in aks] == [first]
    refusals = [r for r in _records(broker) if r.action == "ak.credential" and r.decision == "deny"]
    assert [r.reason for r in refusals] == [f"EK {listed.ek_id} is revoked"]
    assert not [r for r in _records(broker) if r.action == "key.release"]


@pytest.mark.parametrize("encoding", ["exponent-65537", "auth-policy", "user-with-auth"])
def test_an_ek_that_is_not_a_tcg_template_is_refused(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path, encoding: str
) -> None:
    ek, cert = _ek_files(swtpm, tmp_path)
    ak = tt.create_ak(swtpm, tmp_path, ek)
    error = rpc_error(
        broker.attestation("sidecar", "sidecar-1").StartEnrollment,
        attestation_pb2.StartEnrollmentRequest(
            ek_public=reencode(ek.public.read_bytes(), encoding),
            ek_certificate=cert,
            ak_public=ak.public.read_bytes(),
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error.details()).startswith("EK public does not match the TCG EK template L-1: ")
    refusals = [
        r.reason for r in _records(broker) if r.action == "ak.credential" and r.decision == "deny"
    ]
    assert refusals == [error.details()]
    assert not broker.admin("operator").ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks


def test_revoking_one_ak_keeps_the_tpms_other_aks_out_until_readmitted(
    broker: BrokerProcess, swtpm: Swtpm, tmp_path: Path
) -> None:
    ek, cert = _ek_files(swtpm, tmp_path)
    first = _enroll(broker, swtpm, tmp_path, ek, cert, "ak1")
    second = _enroll(broker, swtpm, tmp_path, ek, cert, "ak2")
    revoke = admin_cli(broker, "ak", "revoke", first, "--reason", "test: leaked")
    assert revoke.returncode == 0, revoke.stderr
    (listed,) = broker.admin("operator").ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT).eks
    assert listed.revoked and listed.revoked_reason == f"AK {first} revoked: test: leaked"

    # The other AK of the same TPM gets no challenge: the check is the EK's too.
    sidecar = broker.attestation("sidecar", "sidecar-1")
    error = rpc_error(sidecar.GetChallenge, attestation_pb2.GetChallengeRequest(ak_name=second))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"EK {listed.ek_id} is revoked",
    )
    denied = [r for r in _records(broker) if r.action == "challenge" and r.decision == "deny"]
    assert [(r.subject, r.reason) for r in denied] == [
        (second, f"EK {listed.ek_id} is revoked: AK {first} revoked: test: leaked")
    ]

    readmit = admin_cli(broker, "--json", "ek", "readmit", listed.ek_id, "--reason", "test")
    assert readmit.returncode == 0, readmit.stderr
    assert '"was_revoked": true' in readmit.stdout
    assert sidecar.GetChallenge(
        attestation_pb2.GetChallengeRequest(ak_name=second), timeout=TIMEOUT
    ).nonce
    # The revoked AK stays revoked.
    error = rpc_error(sidecar.GetChallenge, attestation_pb2.GetChallengeRequest(ak_name=first))
    assert error.details() == f"AK {first} is revoked"
    # Re-admitting again changes nothing, and says so (audited both times).
    again = admin_cli(broker, "ek", "readmit", listed.ek_id)
    assert again.stdout == f"EK {listed.ek_id} was not revoked (nothing changed)\n"
    readmits = [
        (r.subject, r.decision, r.reason) for r in _records(broker) if r.action == "ek.readmit"
    ]
    assert readmits == [
        (listed.ek_id, "allow", f"test; lifted: AK {first} revoked: test: leaked"),
        (listed.ek_id, "allow", "was not revoked"),
    ]
