"""``cleanroom pki ...`` through the real dispatcher, in process."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cleanroom.app.cli import main
from pki.ca import issue_certificate, load_ca
from pki.identity import SpiffeId
from pki.tls import load_certificates


def test_init_prints_one_line_per_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    rc = main(
        [
            "pki",
            "init",
            "--out",
            str(out),
            "--trust-domain",
            "example.org",
            "--party",
            "bank",
            "--party",
            "shop",
            "--sidecar",
            "tee-1",
            "--broker-dns",
            "broker.example.org",
            "--broker-ip",
            "10.1.2.3",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    written = {Path(line.split()[1]).name for line in lines}
    files = {p.name for p in out.iterdir()}
    assert written == files
    assert len(lines) == len(files) == 12
    assert "party-shop.key" in files and "sidecar-tee-1.crt" in files
    assert any("spiffe://example.org/party/bank" in line for line in lines)
    for p in out.glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_init_refuses_then_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["pki", "init", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cleanroom: error: ") and "already exists" in err
    assert err.count("\n") == 1
    assert main(["pki", "init", "--out", str(tmp_path), "--force"]) == 0


def test_bad_party_name_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pki", "init", "--out", str(tmp_path / "x"), "--party", "a/b"]) == 1
    err = capsys.readouterr().err
    assert "party name 'a/b' may contain only" in err
    assert not (tmp_path / "x").exists()


def test_issue_show_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init", "--out", str(tmp_path), "--party", "a", "--sidecar", "s"]) == 0
    capsys.readouterr()
    assert main(["pki", "issue", "--dir", str(tmp_path), "--sidecar", "tee-9"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "spiffe://cleanroom.local/sidecar/tee-9" in out[0]
    cert = tmp_path / "sidecar-tee-9.crt"

    assert main(["pki", "show", str(cert)]) == 0
    shown = capsys.readouterr().out
    assert "spiffe id:   spiffe://cleanroom.local/sidecar/tee-9" in shown
    assert "issuer:      CN=cleanroom CA cleanroom.local" in shown
    from cryptography.hazmat.primitives import hashes

    fp = load_certificates(cert)[0].fingerprint(hashes.SHA256()).hex(":")
    assert f"sha256:      {fp}" in shown

    assert main(["pki", "verify", str(cert), "--ca", str(tmp_path / "ca.crt")]) == 0
    assert capsys.readouterr().out.strip() == "ok: spiffe://cleanroom.local/sidecar/tee-9"

    # Re-issuing needs --force; the operator flag takes no name.
    assert main(["pki", "issue", "--dir", str(tmp_path), "--sidecar", "tee-9"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["pki", "issue", "--dir", str(tmp_path), "--operator", "--force"]) == 0
    capsys.readouterr()


def test_verify_reports_expiry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datetime as dt

    from pki.ca import cert_to_pem

    assert main(["pki", "init", "--out", str(tmp_path), "--party", "a", "--sidecar", "s"]) == 0
    capsys.readouterr()
    ca_key, ca_cert = load_ca(tmp_path)
    now = dt.datetime.now(dt.UTC)
    _, old = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=SpiffeId.party("cleanroom.local", "a"),
        not_before=now - dt.timedelta(days=3),
        not_after=now - dt.timedelta(days=1),
    )
    path = tmp_path / "old.crt"
    path.write_bytes(cert_to_pem(old))
    assert main(["pki", "verify", str(path), "--ca", str(tmp_path / "ca.crt")]) == 1
    err = capsys.readouterr().err
    assert "certificate for spiffe://cleanroom.local/party/a expired on" in err
    assert main(["pki", "show", str(tmp_path / "ca.crt")]) == 0
    assert "CA certificate of trust domain cleanroom.local" in capsys.readouterr().out


def test_issue_requires_one_identity(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["pki", "issue", "--dir", str(tmp_path), "--party", "a", "--operator"])
    assert e.value.code == 2
