"""broker.snp: the real Azure Milan evidence verifies, and every tampered variant is refused
with the error that names the failed check."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker import errors, quote, snp, tpmkeys
from tests.harness.amd_snp import SyntheticAmdRoot, SyntheticChip, Tcb
from tests.vectors.evidence import quote_vector
from tests.vectors.snp import MilanEvidence, milan_evidence

HCL = 32  # The SNP report starts after the 32-byte HCL header.
CLAIMS = 32 + 1184 + 20


@pytest.fixture(scope="module")
def milan() -> MilanEvidence:
    return milan_evidence()


@pytest.fixture(scope="module")
def pinned() -> snp.AmdRoots:
    return snp.pinned_amd_roots()


@pytest.fixture(scope="module")
def root() -> SyntheticAmdRoot:
    return SyntheticAmdRoot()


@pytest.fixture(scope="module")
def chip(root: SyntheticAmdRoot) -> SyntheticChip:
    return root.chip()


@pytest.fixture(scope="module")
def trusted(pinned: snp.AmdRoots, root: SyntheticAmdRoot) -> snp.AmdRoots:
    return pinned + snp.load_amd_roots(root.pem(), what="test root")


@pytest.fixture(scope="module")
def ak() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _verify(m: MilanEvidence, roots: snp.AmdRoots, **kw: object) -> snp.SnpClaims:
    args: dict[str, object] = {"hcl_report": m.hcl_report, "vcek": m.vcek, "roots": roots}
    args.update(kw)
    return snp.verify_hcl_report(**args)  # type: ignore[arg-type]


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


# --- the real evidence --------------------------------------------------------------------


def test_pinned_roots_are_amds_three_product_lines(pinned: snp.AmdRoots) -> None:
    assert pinned.products == ("Milan", "Genoa", "Turin")
    for r in pinned.roots:
        names = sorted(c.subject.rfc4514_string().split(",")[0] for c in r.intermediates)
        assert names == [f"CN=SEV-{r.product}", f"CN=SEV-VLEK-{r.product}"]


def test_real_milan_evidence_verifies(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    claims = _verify(milan, pinned)
    assert claims.product == "Milan" and claims.signing_key == "vcek"
    assert claims.report_version == 3
    assert claims.measurement.hex() == (
        "6a063be9dd79f6371c842e480f8dc3b5c725961344e57130e88c5adf49e8f7f6"
        "c79b75a5eb77fc769959f4aeb2f9401e"
    )
    assert claims.policy == 0x3001F and not claims.debug and claims.vmpl == 0
    assert claims.reported_tcb.components() == {
        "bootloader": 4,
        "tee": 0,
        "snp": 24,
        "microcode": 219,
    }
    assert claims.vm_configuration["secure-boot"] is True
    assert claims.user_data == bytes(64)
    # The AK the report binds is the one that signed the vector's quote.
    ak = tpmkeys.load_public(
        claims.ak_public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verified = quote.verify_quote(
        ak=ak,
        attest=milan.attest,
        signature=milan.signature,
        pcr_values=milan.pcr_values,
        expected_qualifying_data=milan.qualifying_data,
        required_pcrs={"sha256": tuple(range(24))},
    )
    assert verified.signature_scheme == "rsassa"


# Every SNP report field the verifier reads, tampered in the real report: a field under the
# signature fails the signature; version and signature algorithm are refused before it.
SIGNED_FIELDS = {
    # 3 becomes 2, a supported version: the signature refuses it.
    "version": (0x00, errors.SnpSignatureError),
    "guest_svn": (0x04, errors.SnpSignatureError),
    "policy_debug": (0x0A, errors.SnpSignatureError),
    "vmpl": (0x30, errors.SnpSignatureError),
    "signature_algo": (0x34, errors.SnpUnsupportedError),
    "current_tcb": (0x38, errors.SnpSignatureError),
    "report_data": (0x50, errors.SnpSignatureError),
    "measurement": (0x90, errors.SnpSignatureError),
    "host_data": (0xC0, errors.SnpSignatureError),
    "reported_tcb": (0x180, errors.SnpSignatureError),
    "chip_id": (0x1A0, errors.SnpSignatureError),
    "committed_tcb": (0x1E0, errors.SnpSignatureError),
    "launch_tcb": (0x1F0, errors.SnpSignatureError),
    "signature_r": (0x2A0, errors.SnpSignatureError),
    "signature_s": (0x2E8, errors.SnpSignatureError),
}


@pytest.mark.parametrize("name", sorted(SIGNED_FIELDS))
def test_tampered_report_field_is_refused(
    milan: MilanEvidence, pinned: snp.AmdRoots, name: str
) -> None:
    offset, error = SIGNED_FIELDS[name]
    tampered = _flip(milan.hcl_report, HCL + offset)
    with pytest.raises(error):
        snp.verify_hcl_report(hcl_report=tampered, vcek=milan.vcek, roots=pinned)


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFF])
def test_unsupported_report_version_is_refused(
    milan: MilanEvidence, pinned: snp.AmdRoots, version: int
) -> None:
    b = bytearray(milan.hcl_report)
    struct.pack_into("<I", b, HCL, version)
    with pytest.raises(errors.SnpUnsupportedError, match=f"version {version} "):
        snp.verify_hcl_report(hcl_report=bytes(b), vcek=milan.vcek, roots=pinned)


def test_one_byte_of_runtime_claims_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    # The last hex digit of user-data: still valid JSON, but not what REPORT_DATA commits to.
    claims = milan.hcl_report[CLAIMS:].rstrip(b"\x00 ")
    at = CLAIMS + len(claims) - 3
    tampered = bytearray(milan.hcl_report)
    tampered[at] = ord("1")
    with pytest.raises(errors.SnpReportDataError, match="sha256 of the runtime claims"):
        snp.verify_hcl_report(hcl_report=bytes(tampered), vcek=milan.vcek, roots=pinned)


@pytest.mark.parametrize(
    "cut",
    [0, 31, 32 + 1183, CLAIMS - 1, CLAIMS + 10],
    ids=["empty", "header", "report", "hdr2", "claims"],
)
def test_truncated_report_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots, cut: int) -> None:
    with pytest.raises(errors.SnpMalformedError):
        snp.verify_hcl_report(hcl_report=milan.hcl_report[:cut], vcek=milan.vcek, roots=pinned)


def test_claims_size_past_the_end_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    b = bytearray(milan.hcl_report)
    struct.pack_into("<I", b, CLAIMS - 4, 0xFFFF)
    struct.pack_into("<I", b, CLAIMS - 20, 0xFFFF + 20)
    with pytest.raises(errors.SnpMalformedError, match="run past the end"):
        snp.verify_hcl_report(hcl_report=bytes(b), vcek=milan.vcek, roots=pinned)


def test_not_an_hcl_report_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    with pytest.raises(errors.SnpMalformedError, match="HCLA"):
        snp.verify_hcl_report(
            hcl_report=b"XXXX" + milan.hcl_report[4:], vcek=milan.vcek, roots=pinned
        )


def test_garbage_vcek_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    with pytest.raises(errors.SnpCertificateError):
        snp.verify_hcl_report(hcl_report=milan.hcl_report, vcek=b"\x30\x82garbage", roots=pinned)


def test_another_chips_vcek_is_refused(
    milan: MilanEvidence, trusted: snp.AmdRoots, chip: SyntheticChip
) -> None:
    # A genuine-looking VCEK of another chip (under a trusted root) did not sign this report.
    with pytest.raises(errors.SnpSignatureError):
        snp.verify_hcl_report(hcl_report=milan.hcl_report, vcek=chip.vcek_der(), roots=trusted)


def test_vcek_without_a_trusted_root_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    genoa_only = snp.AmdRoots(roots=tuple(r for r in pinned.roots if r.product != "Milan"))
    with pytest.raises(errors.SnpChainError, match="not a trusted AMD key"):
        snp.verify_hcl_report(hcl_report=milan.hcl_report, vcek=milan.vcek, roots=genoa_only)


def test_vcek_signed_by_an_impostor_ask_is_refused(
    milan: MilanEvidence, pinned: snp.AmdRoots
) -> None:
    # An attacker's chain that names itself SEV-Milan: same issuer name, another key.
    milan_ask = next(r for r in pinned.roots if r.product == "Milan").intermediates[0]
    impostor = SyntheticAmdRoot(product="Milan", ask_subject=milan_ask.subject)
    fake = impostor.chip(chip_id=b"\x01" * 64)
    claims = snp.verify_hcl_report(hcl_report=milan.hcl_report, vcek=milan.vcek, roots=pinned)
    assert claims.product == "Milan"
    report = fake.hcl_report(ak_public=claims.ak_public)
    with pytest.raises(errors.SnpChainError, match="is not signed by"):
        snp.verify_hcl_report(hcl_report=report, vcek=fake.vcek_der(), roots=pinned)


def test_expired_vcek_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    later = datetime(2033, 1, 1, tzinfo=UTC)
    with pytest.raises(errors.SnpChainError, match="not valid now"):
        snp.verify_hcl_report(hcl_report=milan.hcl_report, vcek=milan.vcek, roots=pinned, now=later)


def test_ak_that_is_not_the_quotes_signer_is_refused(
    milan: MilanEvidence, pinned: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(errors.SnpAkBindingError):
        _verify(milan, pinned, ak=ak.public_key())
    # And the report's AK does not verify a quote some other AK signed.
    other = quote_vector("quote-rsa-rsassa-valid")
    claims = _verify(milan, pinned)
    hcl_ak = tpmkeys.load_public(
        claims.ak_public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(errors.SignatureError):
        quote.verify_quote(
            ak=hcl_ak,
            attest=other.attest,
            signature=other.signature,
            pcr_values=other.pcr_values,
            expected_qualifying_data=other.qualifying_data,
        )


def test_stale_user_data_is_refused(milan: MilanEvidence, pinned: snp.AmdRoots) -> None:
    with pytest.raises(errors.SnpFreshnessError):
        _verify(milan, pinned, expected_user_data=snp.user_data_for(milan.qualifying_data))


def test_user_data_binding_is_sha512_of_label_and_qualifying_data() -> None:
    q = bytes(range(32))
    assert snp.user_data_for(q) == hashlib.sha512(b"cleanroom/v1 snp user-data\x00" + q).digest()
    assert len(snp.user_data_for(q)) == 64


@pytest.mark.parametrize(
    "tamper, error",
    [
        (
            lambda m: (_flip(m.attest, 40), m.signature, m.pcr_values, m.qualifying_data),
            errors.SignatureError,
        ),
        (
            lambda m: (m.attest, _flip(m.signature, 20), m.pcr_values, m.qualifying_data),
            errors.SignatureError,
        ),
        (
            lambda m: (
                m.attest,
                m.signature,
                {**m.pcr_values, (0, "sha256"): bytes(32)},
                m.qualifying_data,
            ),
            errors.PcrDigestError,
        ),
        (lambda m: (m.attest, m.signature, m.pcr_values, b"challengf"), errors.QualifyingDataError),
    ],
    ids=["quote", "signature", "pcr-values", "nonce"],
)
def test_tampered_quote_is_refused(
    milan: MilanEvidence,
    pinned: snp.AmdRoots,
    tamper: Callable[[MilanEvidence], tuple[bytes, bytes, dict[tuple[int, str], bytes], bytes]],
    error: type[Exception],
) -> None:
    claims = _verify(milan, pinned)
    hcl_ak = tpmkeys.load_public(
        claims.ak_public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    attest, signature, pcrs, qualifying = tamper(milan)
    with pytest.raises(error):
        quote.verify_quote(
            ak=hcl_ak,
            attest=attest,
            signature=signature,
            pcr_values=pcrs,
            expected_qualifying_data=qualifying,
            required_pcrs={"sha256": tuple(range(24))},
        )


# --- synthetic chain: the checks a real signature hides -------------------------------------


def test_synthetic_report_verifies_and_binds_the_ak(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    user = snp.user_data_for(b"q" * 32)
    report = chip.hcl_report(ak_public=ak.public_key(), user_data=user)
    claims = snp.verify_hcl_report(
        hcl_report=report,
        vcek=chip.vcek_der(),
        roots=trusted,
        ak=ak.public_key(),
        expected_user_data=user,
    )
    assert claims.product == "Test" and claims.user_data == user


def test_ec_ak_binds_too(chip: SyntheticChip, trusted: snp.AmdRoots) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    report = chip.hcl_report(ak_public=key)
    snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=trusted, ak=key)


def test_untrusted_synthetic_root_is_refused(
    chip: SyntheticChip, pinned: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    report = chip.hcl_report(ak_public=ak.public_key())
    with pytest.raises(errors.SnpChainError):
        snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=pinned)


def test_vcek_tcb_not_the_reported_tcb_is_refused(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    # The same chip key certified for an older TCB: the report claims a newer one.
    old = chip.make_vcek(tcb=Tcb(snp=23))
    report = chip.hcl_report(ak_public=ak.public_key())
    with pytest.raises(errors.SnpTcbError, match="snp SPL 23"):
        snp.verify_hcl_report(
            hcl_report=report,
            vcek=old.public_bytes(serialization.Encoding.DER),
            roots=trusted,
        )


def test_vcek_hwid_not_the_chip_id_is_refused(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    other = chip.make_vcek(hwid=b"\x02" * 64)
    report = chip.hcl_report(ak_public=ak.public_key())
    with pytest.raises(errors.SnpChipIdError):
        snp.verify_hcl_report(
            hcl_report=report, vcek=other.public_bytes(serialization.Encoding.DER), roots=trusted
        )


def test_report_data_not_the_claims_hash_is_refused(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    report = chip.hcl_report(ak_public=ak.public_key(), report_data=bytes(64))
    with pytest.raises(errors.SnpReportDataError):
        snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=trusted)


@pytest.mark.parametrize(
    "claims",
    [
        b"not json",
        b"[]",
        b'{"keys": []}',
        json.dumps({"keys": [{"kid": "HCLAkPub", "kty": "OKP"}]}).encode(),
    ],
)
def test_malformed_runtime_claims_are_refused(
    chip: SyntheticChip, trusted: snp.AmdRoots, claims: bytes
) -> None:
    report = chip.hcl_report(ak_public=None, claims_override=claims)
    with pytest.raises(errors.SnpRuntimeClaimsError):
        snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=trusted)


def test_report_version_2_verifies(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    report = chip.hcl_report(ak_public=ak.public_key(), version=2)
    claims = snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=trusted)
    assert claims.report_version == 2


def test_extra_root_file_without_an_ark_is_refused(root: SyntheticAmdRoot) -> None:
    ask_only = root.ask.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(errors.SnpChainError, match="no self-signed ARK"):
        snp.load_amd_roots(ask_only)


# --- policy -------------------------------------------------------------------------------


def _claims(
    chip: SyntheticChip, roots: snp.AmdRoots, ak: rsa.RSAPrivateKey, **kw: object
) -> snp.SnpClaims:
    report = chip.hcl_report(ak_public=ak.public_key(), **kw)  # type: ignore[arg-type]
    return snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=roots)


def test_policy_accepts_what_it_allows(
    chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    claims = _claims(chip, trusted, ak)
    snp.check_snp_policy(
        claims,
        snp.SnpPolicy(
            allowed_measurements=(b"\x5a" * 48,),
            min_tcb={"snp": 24, "microcode": 200},
            vm_configuration={"secure-boot": True},
        ),
    )


@pytest.mark.parametrize(
    "report, policy, reason",
    [
        ({"policy": 0x3001F | (1 << 19)}, snp.SnpPolicy(), "debug"),
        ({"vmpl": 2}, snp.SnpPolicy(), "vmpl"),
        ({}, snp.SnpPolicy(allowed_measurements=(b"\x01" * 48,)), "measurement"),
        ({}, snp.SnpPolicy(min_tcb={"snp": 25}), "tcb: .*snp 24 < 25"),
        (
            {"vm_configuration": {"secure-boot": False}},
            snp.SnpPolicy(vm_configuration={"secure-boot": True}),
            "vm-configuration: secure-boot",
        ),
    ],
    ids=["debug", "vmpl", "measurement", "tcb", "secure-boot"],
)
def test_policy_names_the_failed_check(
    chip: SyntheticChip,
    trusted: snp.AmdRoots,
    ak: rsa.RSAPrivateKey,
    report: dict[str, object],
    policy: snp.SnpPolicy,
    reason: str,
) -> None:
    claims = _claims(chip, trusted, ak, **report)
    with pytest.raises(errors.SnpPolicyError, match=reason):
        snp.check_snp_policy(claims, policy)


def test_tcb_layout_on_turin() -> None:
    raw = int.from_bytes(bytes([7, 4, 1, 24, 0, 0, 0, 219]), "little")
    t = snp.TcbVersion.from_raw(raw, turin=True)
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (7, 4, 1, 24, 219)
    m = snp.TcbVersion.from_raw(raw, turin=False)
    assert (m.bootloader, m.tee, m.snp, m.microcode, m.fmc) == (7, 4, 0, 219, None)


def test_ek_binding(chip: SyntheticChip, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey) -> None:
    ek = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    report = chip.hcl_report(ak_public=ak.public_key(), ek_public=ek)
    claims = snp.verify_hcl_report(hcl_report=report, vcek=chip.vcek_der(), roots=trusted)
    snp.check_ek_binding(claims, ek)
    with pytest.raises(errors.SnpEkBindingError):
        snp.check_ek_binding(claims, ak.public_key())
    without = snp.verify_hcl_report(
        hcl_report=chip.hcl_report(ak_public=ak.public_key()), vcek=chip.vcek_der(), roots=trusted
    )
    with pytest.raises(errors.SnpRuntimeClaimsError, match="0 HCLEkPub"):
        snp.check_ek_binding(without, ek)


def test_vlek_signed_report_verifies(
    root: SyntheticAmdRoot, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey
) -> None:
    vlek = root.chip(vlek=True)
    report = vlek.hcl_report(ak_public=ak.public_key())
    claims = snp.verify_hcl_report(hcl_report=report, vcek=vlek.vcek_der(), roots=trusted)
    assert claims.signing_key == "vlek" and claims.product == "Test"


@pytest.mark.parametrize("vlek", [False, True], ids=["vcek-says-vlek", "vlek-says-vcek"])
def test_signing_key_field_must_match_the_certificate(
    root: SyntheticAmdRoot, trusted: snp.AmdRoots, ak: rsa.RSAPrivateKey, vlek: bool
) -> None:
    signer = root.chip(vlek=vlek)
    report = signer.hcl_report(ak_public=ak.public_key(), signing_key=0 if vlek else 1)
    with pytest.raises(errors.SnpChainError, match="signing key field"):
        snp.verify_hcl_report(hcl_report=report, vcek=signer.vcek_der(), roots=trusted)
