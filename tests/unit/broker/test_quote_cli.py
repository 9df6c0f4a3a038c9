"""``cleanroom broker verify-quote`` on files written from the stored tpm2-tools vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.quote import event_log_to_json
from broker.tpmkeys import load_public
from cleanroom.app.cli import main
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


# --- bad inputs: each gives one clear line and a non-zero exit, never a silent pass ----------


@pytest.mark.parametrize("content", [b"", b" \n\n"], ids=["zero-bytes", "blank"])
def test_empty_event_log_is_refused(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    log = tmp_path / "log.json"
    log.write_bytes(content)
    assert main([*_files(valid, tmp_path), "--event-log", str(log)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"INVALID: event log {log} is empty"), out


_DIGEST = "00" * 32


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe", "is not valid JSON"),
        (b'{"events": 5}', 'must be a list or an object with "events"'),
        (b'{"events": [{"digests": {"sha256": "00"}}]}', "sha256 digest must be 32 bytes"),
        (f'{{"events": [{{"digests": {{"sha256": "{_DIGEST}"}}, "size": 1e400}}]}}', "malformed"),
        (
            f'{{"events": [{{"digests": {{"sha256": "{_DIGEST}"}}, "pcr_index": 1e400}}]}}',
            "malformed",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["binary", "events-not-a-list", "short-digest", "huge-size", "huge-index", "deep"],
)
def test_unparsable_event_log_is_refused(
    valid: QuoteVector,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes,
    reason: str,
) -> None:
    log = tmp_path / "log.json"
    log.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main([*_files(valid, tmp_path), "--event-log", str(log), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False
    assert doc["reason"].startswith(f"event log {log}"), doc["reason"]
    assert reason in doc["reason"]


def _golden_error(
    valid: QuoteVector, tmp_path: Path, capsys: pytest.CaptureFixture[str], golden: Path
) -> str:
    """Runs verify-quote with ``golden``; returns its one error line (and checks it is one)."""
    assert main([*_files(valid, tmp_path), "--golden", str(golden)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "", "a bad golden file must not get as far as a verdict"
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cleanroom: error: {golden}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("golden.json", "", "is empty"),
        ("golden.toml", " \n", "is empty"),
        ("golden", "", "is empty"),
        ("golden.json", "{}", "names no PCR"),
        ("golden.toml", "# nothing\n", "names no PCR"),
        ("golden.json", '{"sha256": {}}', "sha256 names no PCR"),
        ("golden.toml", "[sha256]\n", "sha256 names no PCR"),
    ],
)
def test_golden_naming_no_pcr_is_refused(
    valid: QuoteVector,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    reason: str,
) -> None:
    golden = tmp_path / name
    golden.write_text(content)
    assert reason in _golden_error(valid, tmp_path, capsys, golden)


_GOOD = "d6d4520965653e03a242a3b7b5346ed88c68623e6e98c88aa04f9a4265550c78"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("golden.json", '{"sha256": {"1,2": "00"}}', "PCR index '1,2' is not an integer"),
        ("golden.json", f'{{"sha256": {{"2_3": "{_GOOD}"}}}}', "PCR index '2_3' is not an integer"),
        ("golden.json", f'{{"sha256": {{"32": "{_GOOD}"}}}}', "PCR index '32' is not an integer"),
        ("golden.json", '{"sha256": {"23": "zz"}}', "sha256:23 value is not hex"),
        (
            "golden.json",
            '{"sha256": {"23": "00"}}',
            "sha256:23 value is 1 byte; sha256 values are 32 bytes",
        ),
        (
            "golden.toml",
            f'[sha1]\n23 = ["{_GOOD}"]\n',
            "sha1:23 value is 32 bytes; sha1 values are 20 bytes",
        ),
        ("golden.json", '{"md5": {"23": "00"}}', "unknown bank 'md5'"),
        ("golden.json", '{"sha256": {"23": [1]}}', "sha256:23 value must be a hex string"),
        ("golden.json", '{"sha256": {"23": true}}', "sha256:23 needs a hex value or a list"),
        ("golden.json", '{"sha256": {"23": []}}', "sha256:23 needs a hex value or a list"),
        ("golden.json", '{"sha256": "00"}', "sha256 must map PCR indices to values"),
        ("golden.json", "[1]", "expected a table of banks"),
        ("golden.json", '{"sha256": {"23":', "not valid JSON"),
        ("golden.toml", "[sha256\n", "not valid TOML"),
        ("golden", "[sha256\n", "neither JSON"),
        ("golden.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("golden.toml", "a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("golden.json", b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_golden_gives_one_clear_line(
    valid: QuoteVector,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | bytes,
    reason: str,
) -> None:
    golden = tmp_path / name
    golden.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _golden_error(valid, tmp_path, capsys, golden)
    assert reason in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize(
    ("value", "reason"),
    [("00", "is 1 byte; sha256 values are 32 bytes"), ("", "is 0 bytes"), ("xy", "not hex")],
)
def test_expect_pcr_of_the_wrong_size_is_a_usage_error(
    valid: QuoteVector,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    value: str,
    reason: str,
) -> None:
    assert main([*_files(valid, tmp_path), "--expect-pcr", f"sha256:23={value}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cleanroom: error: --expect-pcr sha256:23")
    assert reason in captured.err
