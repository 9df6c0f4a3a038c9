"""pki/crl.py: writing the CA's CRL, trusting CRLs, and following them in a server."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cleanroom.app.cli import main
from pki import cli as pki_cli
from pki.ca import PkiLayout, init_pki, load_ca
from pki.crl import (
    CRL_FILE,
    REASONS,
    CrlWatcher,
    RevocationList,
    read_crl,
    refresh,
    revoke,
)
from pki.errors import (
    CertificateRevokedError,
    CrlError,
    CrlExpiredError,
    CrlFileError,
    CrlSignatureError,
    UntrustedCertificateError,
)
from pki.tls import load_certificates

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(tmp_path_factory.mktemp("pki"), sidecars=("sidecar-1", "sidecar-2"))


@pytest.fixture
def fresh_pki(tmp_path: Path) -> PkiLayout:
    return init_pki(tmp_path / "pki", parties=("advertiser",), sidecars=("sidecar-1",))


def _cert(layout: PkiLayout, kind: str, name: str = "") -> x509.Certificate:
    return load_certificates(layout.cert_and_key(kind, name).cert)[0]


def _ca(layout: PkiLayout) -> x509.Certificate:
    return load_ca(layout.directory)[1]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- revoke and refresh ---------------------------------------------------------------------


def test_revoke_lists_exactly_the_revoked_certificate(fresh_pki: PkiLayout) -> None:
    sidecar = fresh_pki.cert_and_key("sidecar", "sidecar-1").cert
    done = revoke(fresh_pki.directory, sidecar, reason="key-compromise", now=NOW)
    assert done.newly_revoked
    assert done.crl.path == fresh_pki.directory / CRL_FILE
    assert (done.crl.number, done.crl.entries) == (1, 1)
    assert done.crl.next_update == NOW + dt.timedelta(days=7)

    revoked = RevocationList.load([done.crl.path], [_ca(fresh_pki)])
    target = _cert(fresh_pki, "sidecar", "sidecar-1")
    assert revoked.is_revoked(target)
    assert not revoked.is_revoked(_cert(fresh_pki, "party", "advertiser"))
    assert not revoked.is_revoked(_cert(fresh_pki, "operator"))
    with pytest.raises(CertificateRevokedError) as e:
        revoked.check(target)
    assert e.value.serial == target.serial_number == done.serial
    assert e.value.reason == "keyCompromise"
    assert f"{target.serial_number:#x}" in str(e.value)
    with pytest.raises(CertificateRevokedError):
        revoked.check_der(_der(target))
    revoked.check_der(_der(_cert(fresh_pki, "operator")))  # not revoked: no error


def test_revoking_again_keeps_the_entry_and_bumps_the_crl_number(fresh_pki: PkiLayout) -> None:
    sidecar = fresh_pki.cert_and_key("sidecar", "sidecar-1").cert
    first = revoke(fresh_pki.directory, sidecar, reason="superseded", now=NOW)
    later = NOW + dt.timedelta(hours=1)
    again = revoke(fresh_pki.directory, sidecar, reason="key-compromise", now=later)
    assert not again.newly_revoked
    assert (again.crl.number, again.crl.entries) == (first.crl.number + 1, 1)
    (entry,) = RevocationList.load([again.crl.path], [_ca(fresh_pki)], now=later).entries()
    assert entry.reason == "superseded"
    assert entry.revoked_at == NOW.replace(microsecond=0)


def test_refresh_creates_an_empty_crl_then_keeps_entries_with_a_new_next_update(
    fresh_pki: PkiLayout,
) -> None:
    info = refresh(fresh_pki.directory, days=2, now=NOW)
    assert (info.number, info.entries) == (1, 0)
    assert len(RevocationList.load([info.path], [_ca(fresh_pki)])) == 0
    revoke(fresh_pki.directory, fresh_pki.cert_and_key("operator").cert, now=NOW)
    info = refresh(fresh_pki.directory, days=30, now=NOW)
    assert (info.number, info.entries) == (3, 1)
    crl = read_crl(info.path)
    assert crl.next_update_utc == NOW.replace(microsecond=0) + dt.timedelta(days=30)
    (entry,) = RevocationList.load([info.path], [_ca(fresh_pki)]).entries()
    assert entry.reason is None  # "unspecified" writes no reason code (RFC 5280)


def test_revoke_refuses_foreign_and_ca_certificates_and_bad_arguments(
    fresh_pki: PkiLayout, pki: PkiLayout
) -> None:
    with pytest.raises(UntrustedCertificateError):
        revoke(fresh_pki.directory, pki.cert_and_key("operator").cert)
    with pytest.raises(CrlError, match="CA certificate"):
        revoke(fresh_pki.directory, fresh_pki.ca_cert)
    sidecar = fresh_pki.cert_and_key("sidecar", "sidecar-1").cert
    with pytest.raises(CrlError, match="unknown revocation reason"):
        revoke(fresh_pki.directory, sidecar, reason="certificate-hold")
    with pytest.raises(CrlError, match="positive"):
        revoke(fresh_pki.directory, sidecar, days=0)
    assert not (fresh_pki.directory / CRL_FILE).exists()


def test_revoke_refuses_to_resign_a_crl_of_another_ca(fresh_pki: PkiLayout, pki: PkiLayout) -> None:
    # The other CA has the same subject name (same trust domain): only the signature tells.
    refresh(pki.directory)
    (fresh_pki.directory / CRL_FILE).write_bytes((pki.directory / CRL_FILE).read_bytes())
    with pytest.raises(CrlSignatureError):
        revoke(fresh_pki.directory, fresh_pki.cert_and_key("operator").cert)


# --- trusting CRLs --------------------------------------------------------------------------


def test_a_crl_no_ca_of_the_bundle_signed_is_refused(fresh_pki: PkiLayout, pki: PkiLayout) -> None:
    info = refresh(fresh_pki.directory)
    assert _ca(pki).subject == _ca(fresh_pki).subject
    with pytest.raises(CrlSignatureError, match="not signed by a CA of the trust bundle"):
        RevocationList.load([info.path], [_ca(pki)])
    # A bundle holding both CAs (a CA rotation) accepts it.
    assert len(RevocationList.load([info.path], [_ca(pki), _ca(fresh_pki)])) == 0


def test_a_stale_crl_is_refused(fresh_pki: PkiLayout) -> None:
    info = refresh(fresh_pki.directory, days=1, now=NOW)
    ca = _ca(fresh_pki)
    RevocationList.load([info.path], [ca], now=NOW + dt.timedelta(hours=23))
    with pytest.raises(CrlExpiredError, match="stale"):
        RevocationList.load([info.path], [ca], now=NOW + dt.timedelta(days=1, seconds=1))


def test_missing_and_malformed_files_are_refused(tmp_path: Path, pki: PkiLayout) -> None:
    with pytest.raises(CrlFileError, match="does not exist"):
        RevocationList.load([tmp_path / "nope.pem"], [_ca(pki)])
    bogus = tmp_path / "bogus.pem"
    bogus.write_bytes(pki.ca_cert.read_bytes())
    with pytest.raises(CrlFileError, match="not a certificate revocation list"):
        RevocationList.load([bogus], [_ca(pki)])


def test_several_crls_are_merged_and_der_is_accepted(
    fresh_pki: PkiLayout, pki: PkiLayout, tmp_path: Path
) -> None:
    revoke(fresh_pki.directory, fresh_pki.cert_and_key("operator").cert)
    other = revoke(pki.directory, pki.cert_and_key("sidecar", "sidecar-2").cert)
    der = tmp_path / "other.crl"
    der.write_bytes(read_crl(other.crl.path).public_bytes(serialization.Encoding.DER))
    both = RevocationList.load([fresh_pki.directory / CRL_FILE, der], [_ca(fresh_pki), _ca(pki)])
    assert len(both) >= 2
    assert both.is_revoked(_cert(fresh_pki, "operator"))
    assert both.is_revoked(_cert(pki, "sidecar", "sidecar-2"))
    assert not both.is_revoked(_cert(pki, "operator"))


# --- following the files --------------------------------------------------------------------


class Clocks:
    """Settable clocks for a watcher (monotonic seconds, wall time)."""

    def __init__(self) -> None:
        self.tick = 0.0
        self.wall = NOW

    def monotonic(self) -> float:
        return self.tick

    def now(self) -> dt.datetime:
        return self.wall


def _watcher(layout: PkiLayout, clocks: Clocks) -> CrlWatcher:
    return CrlWatcher(
        crl_files=[layout.directory / CRL_FILE],
        ca_certs=[_ca(layout)],
        check_interval=1.0,
        monotonic=clocks.monotonic,
        clock=clocks.now,
    )


def test_the_watcher_reloads_a_changed_crl_at_most_once_per_interval(
    fresh_pki: PkiLayout,
) -> None:
    refresh(fresh_pki.directory, now=NOW)
    clocks = Clocks()
    watcher = _watcher(fresh_pki, clocks)
    sidecar = _der(_cert(fresh_pki, "sidecar", "sidecar-1"))
    watcher.check_der(sidecar)
    revoke(fresh_pki.directory, fresh_pki.cert_and_key("sidecar", "sidecar-1").cert, now=NOW)
    clocks.tick = 0.5
    watcher.check_der(sidecar)  # within the interval: the files are not looked at
    clocks.tick = 1.0
    with pytest.raises(CertificateRevokedError):
        watcher.check_der(sidecar)
    watcher.check_der(_der(_cert(fresh_pki, "operator")))
    assert len(watcher.current) == 1 and watcher.problem is None


def test_the_watcher_fails_closed_on_a_bad_or_missing_file_and_recovers(
    fresh_pki: PkiLayout, pki: PkiLayout
) -> None:
    refresh(fresh_pki.directory, now=NOW)
    good = (fresh_pki.directory / CRL_FILE).read_bytes()
    clocks = Clocks()
    watcher = _watcher(fresh_pki, clocks)
    operator = _der(_cert(fresh_pki, "operator"))

    refresh(pki.directory)
    (fresh_pki.directory / CRL_FILE).write_bytes((pki.directory / CRL_FILE).read_bytes())
    clocks.tick = 1.0
    for _ in range(2):
        with pytest.raises(CrlSignatureError):
            watcher.check_der(operator)
    assert isinstance(watcher.problem, CrlSignatureError)

    (fresh_pki.directory / CRL_FILE).unlink()
    clocks.tick = 2.0
    with pytest.raises(CrlFileError):
        watcher.check_der(operator)

    (fresh_pki.directory / CRL_FILE).write_bytes(good)
    clocks.tick = 3.0
    watcher.check_der(operator)
    assert watcher.problem is None


def test_the_watcher_fails_closed_once_the_crl_is_stale_until_it_is_refreshed(
    fresh_pki: PkiLayout,
) -> None:
    refresh(fresh_pki.directory, days=1, now=NOW)
    clocks = Clocks()
    watcher = _watcher(fresh_pki, clocks)
    operator = _der(_cert(fresh_pki, "operator"))
    clocks.wall = NOW + dt.timedelta(days=1, seconds=1)
    watcher.check_der(operator)  # the stale list is noticed at the next poll, not before
    clocks.tick = 1.0
    with pytest.raises(CrlExpiredError, match="stale"):
        watcher.check_der(operator)
    refresh(fresh_pki.directory, days=1, now=clocks.wall)
    clocks.tick = 2.0
    watcher.check_der(operator)


def test_the_watcher_refuses_to_start_with_an_unusable_crl(
    fresh_pki: PkiLayout, pki: PkiLayout
) -> None:
    with pytest.raises(CrlFileError):
        CrlWatcher.from_files(crl_files=[fresh_pki.directory / CRL_FILE], ca_file=pki.ca_cert)
    refresh(fresh_pki.directory)
    with pytest.raises(CrlSignatureError):
        CrlWatcher.from_files(crl_files=[fresh_pki.directory / CRL_FILE], ca_file=pki.ca_cert)
    CrlWatcher.from_files(crl_files=[fresh_pki.directory / CRL_FILE], ca_file=fresh_pki.ca_cert)


# --- the CLI --------------------------------------------------------------------------------


def test_cli_revoke_and_crl_print_one_line(
    fresh_pki: PkiLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(fresh_pki.directory)
    assert main(["pki", "crl", "--dir", d, "--days", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"wrote {fresh_pki.directory / CRL_FILE}")
    cert = fresh_pki.cert_and_key("party", "advertiser").cert
    assert main(["pki", "revoke", "--dir", d, str(cert), "--reason", "key-compromise"]) == 0
    out = capsys.readouterr().out.splitlines()
    serial = _cert(fresh_pki, "party", "advertiser").serial_number
    assert len(out) == 1 and out[0].startswith(f"revoked: serial {serial:x}")
    assert main(["pki", "revoke", "--dir", d, str(cert)]) == 0
    assert capsys.readouterr().out.startswith("already revoked:")
    assert main(["pki", "revoke", "--dir", d, str(fresh_pki.ca_cert)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CA certificate" in err[0]


def test_cli_reasons_match_the_library() -> None:
    assert tuple(REASONS) == pki_cli._REASONS
