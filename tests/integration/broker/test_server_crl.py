"""Client-certificate revocation on the real broker: ``cleanroom broker serve`` over mTLS with
``[tls] crl_files``, and ``cleanroom pki revoke``/``crl`` as the operator runs them.

The broker re-reads its CRLs when they change (looking about once per second), so a revocation
takes effect without a restart, also on connections opened before it. It fails closed: while a
CRL is stale or unusable, every call is refused (see docs/pki.md, "Revocation").
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleanroom.v1 import admin_pb2, attestation_pb2, attestation_pb2_grpc
from pki.ca import PkiLayout, init_pki
from pki.crl import CRL_FILE, refresh
from pki.tls import load_certificates
from tests.support.broker import (
    CLEANROOM,
    TD,
    TIMEOUT,
    BrokerProcess,
    code_of,
    rpc_error,
    start_broker,
    write_config,
)

#: The broker looks at its CRL files about once per second; allow for a slow machine.
RELOAD_WAIT = 10.0
#: Seconds from signing to nextUpdate of the CRL that goes stale while the broker runs: long
#: enough for the broker to start and answer a first call on a busy machine.
STALE_AFTER = 12.0
UNKNOWN_AK = attestation_pb2.GetChallengeRequest(ak_name="000b" + "ab" * 32)


def _pki(directory: Path) -> PkiLayout:
    return init_pki(directory, parties=("advertiser",), sidecars=("sidecar-1", "sidecar-2"))


def _config(workdir: Path, pki: PkiLayout, crl_files: list[Path]) -> Path:
    config = write_config(workdir / "broker.toml", workdir, pki)
    # write_config knows no [broker.tls] extras: add the setting to that table.
    text = config.read_text()
    listed = ", ".join(f'"{p}"' for p in crl_files)
    config.write_text(text.replace("[broker.metrics]", f"crl_files = [{listed}]\n[broker.metrics]"))
    return config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    return subprocess.run(
        [str(CLEANROOM), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _eventually(probe: Callable[[], bool], what: str, wait: float = RELOAD_WAIT) -> None:
    deadline = time.monotonic() + wait
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker did not {what} within {wait} s")
        time.sleep(0.1)


def _challenge_code(
    b: BrokerProcess,
    stub: attestation_pb2_grpc.AttestationServiceStub | None = None,
    name: str = "sidecar-1",
) -> str:
    sidecar = stub if stub is not None else b.attestation("sidecar", name)
    return code_of(sidecar.GetChallenge, UNKNOWN_AK).name


def _denials(b: BrokerProcess) -> float:
    key = (
        "cleanroom_broker_authz_denials_total",
        (("kind", "unauthenticated"), ("method", "cleanroom.v1.AttestationService/GetChallenge")),
    )
    return b.metrics().get(key, 0.0)


def _audit_denials(b: BrokerProcess, after: int = 0) -> list[admin_pb2.AuditRecord]:
    records = (
        b.admin("operator")
        .ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(after_sequence=after, limit=1000), timeout=TIMEOUT
        )
        .records
    )
    return [r for r in records if r.action == "authz" and r.decision == "deny"]


def _last_sequence(b: BrokerProcess) -> int:
    records = (
        b.admin("operator")
        .ListAuditRecords(admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT)
        .records
    )
    return max((r.sequence for r in records), default=0)


# --- a broker with a CRL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def crl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    workdir = tmp_path_factory.mktemp("broker-crl")
    pki = _pki(workdir / "pki")
    made = _cli("pki", "crl", "--dir", str(pki.directory))
    assert made.returncode == 0, made.stderr
    process = start_broker(_config(workdir, pki, [pki.directory / CRL_FILE]), pki, workdir)
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.stderr()


def test_a_certificate_revoked_while_the_broker_runs_is_refused_on_its_next_call(
    crl_broker: BrokerProcess,
) -> None:
    b = crl_broker
    # An authenticated sidecar gets past the guard: its unknown AK is the service's refusal.
    open_channel = b.attestation("sidecar", "sidecar-1")
    assert _challenge_code(b, open_channel) == "FAILED_PRECONDITION"
    before = _denials(b)
    sequence = _last_sequence(b)

    cert = b.pki.cert_and_key("sidecar", "sidecar-1").cert
    done = _cli(
        "pki", "revoke", "--dir", str(b.pki.directory), str(cert), "--reason", "key-compromise"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("revoked: serial ") and len(done.stdout.splitlines()) == 1

    # The connection opened before the revocation is refused too: the check is per call.
    _eventually(lambda: _challenge_code(b, open_channel) == "UNAUTHENTICATED", "apply the CRL")
    error = rpc_error(b.attestation("sidecar", "sidecar-1").GetChallenge, UNKNOWN_AK)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "client certificate revoked",
    )
    health = health_pb2_grpc.HealthStub(b.channel("sidecar", "sidecar-1"))
    assert code_of(health.Check, health_pb2.HealthCheckRequest()) == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    # Audited with the exact reason (identity, serial, reason code) and counted.
    serial = load_certificates(cert)[0].serial_number
    denials = _audit_denials(b, after=sequence)
    assert denials, "the refusal is not in the audit log"
    last = denials[-1]
    assert last.actor == "unauthenticated"
    assert last.reason.startswith(f"client certificate revoked: spiffe://{TD}/sidecar/sidecar-1")
    assert f"{serial:#x}" in last.reason and "keyCompromise" in last.reason
    assert _denials(b) >= before + 2

    # Every other identity still works.
    assert _challenge_code(b, name="sidecar-2") == "FAILED_PRECONDITION"
    b.admin("operator").ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT)
    b.admin("party", "advertiser").GetBrokerInfo(admin_pb2.GetBrokerInfoRequest(), timeout=TIMEOUT)


# --- refused at start -----------------------------------------------------------------------


def _serve_fails(config: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    proc = subprocess.run(
        [str(CLEANROOM), "broker", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_crl_signed_by_a_foreign_ca_is_refused_at_start(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    # Same trust domain, so the same CA name: only the signature tells the CAs apart.
    foreign = _pki(tmp_path / "foreign")
    refresh(foreign.directory)
    line = _serve_fails(_config(tmp_path, pki, [foreign.directory / CRL_FILE]))
    assert "tls.crl_files" in line and "not signed by a CA of the trust bundle" in line


def test_an_unreadable_or_stale_crl_is_refused_at_start(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    line = _serve_fails(_config(tmp_path, pki, [pki.directory / CRL_FILE]))
    assert "tls.crl_files" in line and "does not exist" in line
    refresh(pki.directory, days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    line = _serve_fails(_config(tmp_path, pki, [pki.directory / CRL_FILE]))
    assert "tls.crl_files" in line and "stale" in line


# --- fail closed at run time ----------------------------------------------------------------


def test_a_crl_that_goes_stale_or_bad_refuses_everyone_until_it_is_fixed(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    # A CRL whose nextUpdate is a few seconds away (enough for the broker to start).
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=STALE_AFTER)
    refresh(pki.directory, days=1, now=soon - dt.timedelta(days=1))
    b = start_broker(_config(tmp_path, pki, [pki.directory / CRL_FILE]), pki, tmp_path)
    try:
        operator = b.admin("operator")
        operator.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT)
        sequence = _last_sequence(b)

        def operator_refused() -> bool:
            try:
                operator.ListEks(admin_pb2.ListEksRequest(), timeout=TIMEOUT)
            except grpc.RpcError as e:
                assert (e.code(), e.details()) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "client certificate revocation status unknown",
                )
                return True
            return False

        _eventually(operator_refused, "refuse calls once the CRL is stale", STALE_AFTER + 10)
        assert _challenge_code(b, name="sidecar-2") == "UNAUTHENTICATED"
        assert "stale" in b.stderr()

        # Re-signing the CRL is enough: no restart.
        refreshed = _cli("pki", "crl", "--dir", str(pki.directory))
        assert refreshed.returncode == 0, refreshed.stderr
        _eventually(lambda: not operator_refused(), "accept calls after `pki crl`")
        denials = _audit_denials(b, after=sequence)
        assert any("cannot be checked" in r.reason and "stale" in r.reason for r in denials), (
            denials
        )
        assert _challenge_code(b, name="sidecar-2") == "FAILED_PRECONDITION"

        # A CRL replaced by one this broker cannot trust: refused until a good one is back.
        good = (pki.directory / CRL_FILE).read_bytes()
        foreign = _pki(tmp_path / "foreign")
        refresh(foreign.directory)
        (pki.directory / CRL_FILE).write_bytes((foreign.directory / CRL_FILE).read_bytes())
        _eventually(operator_refused, "refuse calls while the CRL is unsigned")
        (pki.directory / CRL_FILE).write_bytes(good)
        _eventually(lambda: not operator_refused(), "accept calls with the good CRL back")
    finally:
        code = b.stop()
        assert code == 0, b.stderr()
