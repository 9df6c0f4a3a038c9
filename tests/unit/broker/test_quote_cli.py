"""``cleanroom broker verify-quote`` on files written from the stored tpm2-tools vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.quote import event_log_to_json
from broker.tpmkeys import load_public
from cleanroom.cli import main
from tests.vectors.evidence import QuoteVector, quote_vector


def _files(v: QuoteVector, d: Path) -> list[str]:
    (d / "ak.pub").write_bytes(v.ak_public)
    (d / "q.msg").write_bytes(v.attest)
    (d / "q.sig").write_bytes(v.signature)
    pcrs = v.tools_pcr_file if v.tools_pcr_file is not None else b"".join(v.pcr_values.values())
    (d / "q.pcrs").write_bytes(pcrs)
    args = ["broker", "verify-quote", "--public", str(d / "ak.pub"), "--message", str(d / "q.msg")]
    args += ["--signature", str(d / "q.sig"), "--pcr", str(d / "q.pcrs")]
    return [*args, "--qualification", v.qualifying_data.hex()]


@pytest.fixture
def valid() -> QuoteVector:
    return quote_vector("quote-rsa-rsassa-valid")


def test_valid_quote(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert valid.event_log is not None
    (tmp_path / "log.json").write_bytes(event_log_to_json(valid.event_log))
    sha256 = valid.pcr_values[(23, "sha256")].hex()
    args = [*_files(valid, tmp_path), "--event-log", str(tmp_path / "log.json")]
    assert main([*args, "--expect-pcr", f"sha256:23={sha256}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VALID\n")
    assert f"sha256:23  {sha256}  golden: match" in out
    assert "reset_count" in out and "event log: 3 events, replays in sha1, sha256" in out


def test_invalid_quote_says_why(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _files(valid, tmp_path)
    args[args.index("--qualification") + 1] = "00" * 32
    assert main(args) == 1
    assert capsys.readouterr().out.startswith(
        "INVALID: quote's qualifying data is not the expected value"
    )


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_golden_file(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    good = valid.pcr_values[(23, "sha256")].hex()
    golden = tmp_path / f"golden.{fmt}"
    if fmt == "json":
        golden.write_text(json.dumps({"sha256": {"23": ["00" * 32, good]}}))
    else:
        golden.write_text(f'[sha256]\n23 = ["{good}"]\n')
    assert main([*_files(valid, tmp_path), "--golden", str(golden)]) == 0
    capsys.readouterr()
    golden.write_text(json.dumps({"sha256": {"23": "00" * 32}}))
    assert main([*_files(valid, tmp_path), "--golden", str(golden), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False and "golden values: PCR sha256:23=" in doc["reason"]
    assert doc["golden"]["sha256:23"] == {"value": good, "match": False}
    assert doc["pcrs"]["sha256:23"] == good


def test_json_output(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_files(valid, tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert doc["pcrs"] == {f"{b}:{i}": v.hex() for (i, b), v in valid.pcr_values.items()}
    assert set(doc["clock"]) == {"clock", "reset_count", "restart_count", "safe"}
    assert doc["signature"] == {"scheme": "rsassa", "hash": "sha256"}


def test_values_format_and_required_pcrs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v = quote_vector("quote-rsa-values-pcr-file-valid")
    assert main(_files(v, tmp_path)) == 0
    sha1 = quote_vector("quote-rsa-sha1-only")
    assert main(_files(sha1, tmp_path)) == 1
    assert "SHA-1-only evidence is refused" in capsys.readouterr().out
    assert main([*_files(sha1, tmp_path), "--require-pcr", "sha1:23"]) == 0


def test_pem_ak_needs_consent(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _files(valid, tmp_path)
    key = load_public(valid.ak_public).key
    (tmp_path / "ak.pub").write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert main(args) == 1
    assert capsys.readouterr().out.startswith("INVALID: AK refused: a PEM key")
    assert main([*args, "--allow-unchecked-pem"]) == 0
    assert "warning: AK given as PEM" in capsys.readouterr().out


def test_non_restricted_ak_is_refused(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.vectors.evidence import key_vectors

    args = _files(valid, tmp_path)
    bad = next(k for k in key_vectors() if k.name == "key-rsa-not-restricted")
    (tmp_path / "ak.pub").write_bytes(bad.public)
    assert main(args) == 1
    assert "AK refused: AK lacks restricted" in capsys.readouterr().out


def test_usage_errors(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _files(valid, tmp_path)
    assert main([*args, "--expect-pcr", "md5:23=00"]) == 1
    assert "cleanroom: error:" in capsys.readouterr().err
    assert main([*args[:-1], "xyz"]) == 1
    assert "not hex" in capsys.readouterr().err
    (tmp_path / "q.msg").unlink()
    assert main(args) == 1
    assert "cannot read quote message" in capsys.readouterr().err
