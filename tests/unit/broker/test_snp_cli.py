"""``cleanroom broker verify-quote --hcl-report --vcek`` on the real Azure Milan evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleanroom.app.cli import main
from tests.vectors.evidence import quote_vector
from tests.vectors.snp import milan_evidence


def _args(d: Path) -> list[str]:
    m = milan_evidence()
    f = m.write(d)
    return [
        "broker",
        "verify-quote",
        "--hcl-report",
        str(f["hcl"]),
        "--vcek",
        str(f["vcek"]),
        "--message",
        str(f["message"]),
        "--signature",
        str(f["signature"]),
        "--pcr",
        str(f["pcr"]),
        "--pcr-format",
        "values",
        "--qualification",
        m.qualifying_data.hex(),
        "--require-pcr",
        "sha256:0,1,2,3,4,5,6,7,23",
    ]


def test_real_evidence_verifies_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_args(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert doc["snp"]["measurement"] == (
        "6a063be9dd79f6371c842e480f8dc3b5c725961344e57130e88c5adf49e8f7f6"
        "c79b75a5eb77fc769959f4aeb2f9401e"
    )
    assert doc["snp"]["product"] == "Milan" and doc["snp"]["debug"] is False
    assert doc["runtime_claims"]["vm-configuration"]["secure-boot"] is True
    assert [k["kid"] for k in doc["runtime_claims"]["keys"]] == ["HCLAkPub", "HCLEkPub"]
    assert doc["pcrs"]["sha256:23"] == "00" * 32


def test_text_output_shows_the_hardware_claims(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("VALID\n")
    assert "SEV-SNP: Milan VCEK, report v3" in out
    assert "reported TCB: bootloader 4, tee 0, snp 24, microcode 219" in out


def test_one_byte_of_the_report_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path)
    hcl = tmp_path / "hcl-report.bin"
    b = bytearray(hcl.read_bytes())
    b[32 + 0x90] ^= 1  # the measurement
    hcl.write_bytes(bytes(b))
    assert main(args) == 1
    assert capsys.readouterr().out.startswith("INVALID: SEV-SNP: SnpSignatureError:")


def test_stale_report_fails_with_snp_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The captured report's user-data is zeros: it was not made for this qualifying data.
    assert main([*_args(tmp_path), "--snp-fresh"]) == 1
    assert "SnpFreshnessError" in capsys.readouterr().out


def test_public_must_be_the_reports_ak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = quote_vector("quote-rsa-rsassa-valid")
    (tmp_path / "other.pub").write_bytes(other.ak_public)
    assert main([*_args(tmp_path), "--public", str(tmp_path / "other.pub")]) == 1
    assert "SnpAkBindingError" in capsys.readouterr().out


def test_quote_by_another_ak_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The report's AK did not sign this quote.
    other = quote_vector("quote-rsa-rsassa-valid")
    args = _args(tmp_path)
    (tmp_path / "quote.msg").write_bytes(other.attest)
    (tmp_path / "quote.sig").write_bytes(other.signature)
    (tmp_path / "quote.pcrs").write_bytes(b"".join(other.pcr_values.values()))
    args[args.index("--qualification") + 1] = other.qualifying_data.hex()
    args[args.index("--require-pcr") + 1] = "sha256:23"
    assert main(args) == 1
    assert "signature does not verify under the AK" in capsys.readouterr().out


def test_hcl_report_needs_the_vcek(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path)
    i = args.index("--vcek")
    del args[i : i + 2]
    assert main(args) != 0
    assert "--hcl-report and --vcek go together" in capsys.readouterr().err


def test_public_that_is_the_reports_ak_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    from broker import snp

    m = milan_evidence()
    claims = snp.verify_hcl_report(
        hcl_report=m.hcl_report, vcek=m.vcek, roots=snp.pinned_amd_roots()
    )
    pem = claims.ak_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "ak.pem").write_bytes(pem)
    args = [*_args(tmp_path), "--public", str(tmp_path / "ak.pem"), "--allow-unchecked-pem"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("VALID\n")
