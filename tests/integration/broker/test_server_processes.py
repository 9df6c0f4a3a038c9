"""``cleanroom broker serve --processes 2``: two broker processes on one port, one database.

A real broker (mTLS on a fixed loopback port, SQLite) in two worker processes. Each channel is
one connection and stays with the process the kernel gave it; which one that is, is read from
the processes' own metrics endpoints (process *k* serves metrics on the configured port + *k*),
so the tests can pick a channel on each process. They show that both workers serve, that state a
decision depends on is shared through the database (a nonce issued by one process is honoured
once, and only once, by the other; nonces are unique across processes), and that SIGTERM to the
parent stops every process with exit code 0. A configuration without a fixed port is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cleanroom.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    attestation_pb2_grpc,
)
from evidence.binding import qualifying_data
from evidence.pcr import WORKLOAD_PCR, Measurement
from evidence.proto import bank_to_pb, event_log_to_pb
from pki.ca import PkiLayout
from pki.tls import channel_credentials
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from tests.harness.launch import approved_manifest, measure_workload
from tests.harness.net import free_port, port_is_free
from tests.support.broker import (
    CLEANROOM,
    TD,
    TIMEOUT,
    BrokerProcess,
    add_parties,
    approve_with_keys,
    open_released,
    spawn_broker,
)
from tests.support.pki import make_pki
from tests.support.softtpm import QUOTED_BANKS, QuoteMaker, SoftAk

PROCESSES = 2
PARTIES = ("advertiser", "publisher")
WORKLOAD = (("run.py", b"print('join')\n"), ("model.py", b"def train(df):\n    return df\n"))
#: Every channel gets a connection of its own (gRPC shares one between identical channels by
#: default, and a connection is what the kernel assigns to a process).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
RPC_COUNT = "cleanroom_broker_rpc_duration_seconds_count"


def write_config(
    path: Path, workdir: Path, pki: PkiLayout, *, port: int, metrics_port: int
) -> Path:
    cert, key = pki.cert_and_key("broker")
    path.write_text(
        "\n".join(
            [
                "[broker]",
                f'database_url = "sqlite:///{workdir / "broker.db"}"',
                f'state_dir = "{workdir / "state"}"',
                f'trust_domain = "{TD}"',
                "[broker.tls]",
                f'listen = "127.0.0.1:{port}"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
                f'ca_file = "{pki.ca_cert}"',
                "[broker.metrics]",
                f'listen = "127.0.0.1:{metrics_port}"',
                "",
            ]
        )
    )
    return path


def metrics_ports() -> int:
    """A port that is free, and whose successor is free too (process 1's metrics port)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and port_is_free(port + 1):
            return port
    raise AssertionError("no two consecutive free loopback ports")


def children(pid: int) -> dict[int, str]:
    """The live children of ``pid``: their pids and command lines."""
    out: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rpartition(")")[2].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            out[int(stat.parent.name)] = cmdline
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which only waits to be reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def rpc_count(metrics_address: str) -> float:
    """How many calls the process behind ``metrics_address`` has finished, all methods."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == RPC_COUNT
    )


@dataclass
class Sidecar:
    """One sidecar connection and the process it landed on."""

    channel: grpc.Channel
    process: int

    @property
    def stub(self) -> attestation_pb2_grpc.AttestationServiceStub:
        return attestation_pb2_grpc.AttestationServiceStub(self.channel)


@dataclass
class MultiBroker:
    broker: BrokerProcess
    workdir: Path
    metrics: list[str]
    ak: SoftAk
    measured: Measurement
    data_keys: dict[str, bytes]
    #: Sidecar channels (all with sidecar-1's certificate) by the process that serves them.
    sidecars: dict[int, list[Sidecar]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.broker.proc.pid

    def channel(self, kind: str, name: str = "") -> grpc.Channel:
        cert, key = self.broker.pki.cert_and_key(kind, name)
        creds = channel_credentials(cert_file=cert, key_file=key, ca_file=self.broker.pki.ca_cert)
        return grpc.secure_channel(self.broker.grpc_address, creds, options=OWN_CONNECTION)

    def counts(self) -> list[float]:
        return [rpc_count(m) for m in self.metrics]

    def which_process(self, call: Callable[..., Any], request: Message) -> tuple[int, Any]:
        """Makes the call and tells which process served it, with the response."""
        before = self.counts()
        response = call(request, timeout=TIMEOUT)
        # The access metrics are updated as the call ends, possibly just after the reply left.
        deadline = time.monotonic() + TIMEOUT
        while True:
            after = self.counts()
            moved = [n for n in range(PROCESSES) if after[n] > before[n]]
            if moved or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(moved) == 1, (before, after)
        return moved[0], response


def start_multi(config: Path, pki: PkiLayout, workdir: Path) -> tuple[BrokerProcess, list[str]]:
    """Runs ``cleanroom broker init`` and starts ``cleanroom broker serve --processes 2`` (the
    launcher of tests/support), waiting until every process serves (the parent prints the gRPC
    address and each process's metrics address then); returns the broker and the metrics
    addresses, process 0's first."""
    spawned = spawn_broker(config, workdir, processes=PROCESSES)
    metrics = spawned.metrics
    return BrokerProcess(
        spawned.proc, spawned.grpc_address, metrics[0], pki, spawned.stderr_path
    ), metrics


def provision(b: BrokerProcess, ak: SoftAk, workdir: Path) -> tuple[Measurement, dict[str, bytes]]:
    """Parties, their data keys and approvals of one workload, and the enrolled AK."""
    measured = measure_workload(workdir / "workload", WORKLOAD)
    add_parties(b, *PARTIES)
    manifest = approved_manifest("join", measured)
    data_keys = approve_with_keys(b, PARTIES, manifest)
    enrolled = b.admin("operator").EnrollAk(
        admin_pb2.EnrollAkRequest(ak_public=ak.tpm2b_public), timeout=TIMEOUT
    )
    assert enrolled.ak.ak_name == ak.name_hex
    return measured, data_keys


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiBroker]:
    workdir = tmp_path_factory.mktemp("broker-processes")
    pki = make_pki(workdir / "pki")
    metrics_port = metrics_ports()
    config = write_config(
        workdir / "broker.toml", workdir, pki, port=free_port(), metrics_port=metrics_port
    )
    b, metrics = start_multi(config, pki, workdir)
    try:
        # Process k serves its metrics on the configured port + k.
        assert metrics == [f"127.0.0.1:{metrics_port + n}" for n in range(PROCESSES)]
        ak = SoftAk.generate("ecc")
        measured, data_keys = provision(b, ak, workdir)
        m = MultiBroker(
            broker=b,
            workdir=workdir,
            metrics=metrics,
            ak=ak,
            measured=measured,
            data_keys=data_keys,
        )
        # New connections until each process serves at least two of them. The kernel hashes
        # each connection's addresses and ports, so a process gets half of them on average.
        for _ in range(64):
            if all(len(m.sidecars.get(n, [])) >= 2 for n in range(PROCESSES)):
                break
            channel = m.channel("sidecar", "sidecar-1")
            stub = attestation_pb2_grpc.AttestationServiceStub(channel)
            request = attestation_pb2.GetChallengeRequest(ak_name=ak.name_hex)
            process, _ = m.which_process(stub.GetChallenge, request)
            m.sidecars.setdefault(process, []).append(Sidecar(channel, process))
        assert all(len(m.sidecars.get(n, [])) >= 2 for n in range(PROCESSES)), {
            n: len(s) for n, s in m.sidecars.items()
        }
        yield m
    finally:
        # Only if a test failed before stopping it: nothing of it may outlive the module.
        left = children(b.proc.pid)
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait()
        for pid in left:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- serving ----------------------------------------------------------------------------------


def test_two_worker_processes_serve_calls_over_separate_channels(multi: MultiBroker) -> None:
    workers = {
        pid: cmd for pid, cmd in children(multi.pid).items() if "multiprocessing.spawn" in cmd
    }
    assert len(workers) == PROCESSES, children(multi.pid)
    assert multi.broker.proc.poll() is None
    # Operator calls over connections of their own, until each process has answered some.
    served = {n: 0 for n in range(PROCESSES)}
    for _ in range(64):
        if min(served.values()) >= 2:
            break
        channel = multi.channel("operator")
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        process, listed = multi.which_process(admin.ListAks, admin_pb2.ListAksRequest())
        served[process] += 1
        # Both processes read the one database: the AK enrolled at set-up is listed by each.
        assert [a.ak_name for a in listed.aks] == [multi.ak.name_hex]
        channel.close()
    assert min(served.values()) >= 2, served


def test_status_names_the_processes_and_the_one_that_answered(multi: MultiBroker) -> None:
    workers = {pid for pid, cmd in children(multi.pid).items() if "multiprocessing.spawn" in cmd}
    answered: dict[int, int] = {}
    for _ in range(64):
        if len(answered) == PROCESSES:
            break
        channel = multi.channel("operator")
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        process, status = multi.which_process(admin.GetStatus, admin_pb2.GetStatusRequest())
        channel.close()
        assert status.processes == PROCESSES and status.process_index == process
        assert status.counts.aks == 1 and status.pid in workers
        answered[process] = status.pid
    assert sorted(answered) == list(range(PROCESSES))
    assert len(set(answered.values())) == PROCESSES


def test_nonces_are_unique_across_processes(multi: MultiBroker) -> None:
    request = attestation_pb2.GetChallengeRequest(ak_name=multi.ak.name_hex)
    sidecars = [s for n in range(PROCESSES) for s in multi.sidecars[n]]

    def challenges(sidecar: Sidecar) -> list[bytes]:
        return [bytes(sidecar.stub.GetChallenge(request, timeout=TIMEOUT).nonce) for _ in range(10)]

    with futures.ThreadPoolExecutor(len(sidecars)) as pool:
        nonces = [n for batch in pool.map(challenges, sidecars) for n in batch]
    assert len(nonces) == 10 * len(sidecars)
    assert all(len(n) == 32 for n in nonces)
    assert len(set(nonces)) == len(nonces)


# --- one nonce, two processes -----------------------------------------------------------------


def _attest_request(
    multi: MultiBroker, nonce: bytes, ephemeral: RecipientPrivateKey
) -> attestation_pb2.AttestRequest:
    """What the sidecar sends: a quote over the workload's PCR 23 bound to ``nonce``."""
    cert_file, _ = multi.broker.pki.cert_and_key("sidecar", "sidecar-1")
    cert_der = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    public = ephemeral.public_key()
    binding = qualifying_data(
        nonce=nonce, kem=public.kem, ephemeral_public_key=public.raw, tls_certificate_der=cert_der
    )
    attest, signature = QuoteMaker(multi.ak, multi.measured.pcrs).quote(binding)
    request = attestation_pb2.AttestRequest(
        ak_name=multi.ak.name_hex,
        nonce=nonce,
        event_log=event_log_to_pb(multi.measured.events),
        key_ids=sorted(multi.data_keys),
    )
    request.quote.attest = attest
    request.quote.signature = signature
    for bank in QUOTED_BANKS:
        request.quote.pcr_values.add(
            index=WORKLOAD_PCR, bank=bank_to_pb(bank), value=multi.measured.pcrs[bank]
        )
    request.ephemeral_key.kem = public.kem  # type: ignore[assignment]
    request.ephemeral_key.public_key = public.raw
    return request


def _denied(call: grpc.Future[Any]) -> bool:
    try:
        call.result()
    except grpc.RpcError as e:
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, "attestation denied")
        return True
    return False


def test_a_nonce_issued_by_one_process_is_consumed_once_by_the_other(multi: MultiBroker) -> None:
    name = multi.ak.name_hex
    for issuer, consumer in ((0, 1), (1, 0)):
        issuing, consuming = multi.sidecars[issuer][0], multi.sidecars[consumer][0]
        nonce = bytes(
            issuing.stub.GetChallenge(
                attestation_pb2.GetChallengeRequest(ak_name=name), timeout=TIMEOUT
            ).nonce
        )
        ephemeral = generate_recipient_key()
        request = _attest_request(multi, nonce, ephemeral)
        response = consuming.stub.Attest(request, timeout=TIMEOUT)
        assert sorted(k.key_id for k in response.released_keys) == sorted(multi.data_keys)
        for key in response.released_keys:
            opened = open_released(ephemeral, response, key)
            assert opened == multi.data_keys[key.key_id]
        # The nonce is spent for both processes: the issuer refuses it as well.
        for again in (issuing, consuming):
            assert _denied(again.stub.Attest.future(request, timeout=TIMEOUT))


def test_one_nonce_sent_to_both_processes_at_once_is_honoured_once(multi: MultiBroker) -> None:
    name = multi.ak.name_hex
    for round_ in range(3):
        sidecars = [multi.sidecars[n][round_ % 2] for n in range(PROCESSES)]
        nonce = bytes(
            sidecars[round_ % 2]
            .stub.GetChallenge(attestation_pb2.GetChallengeRequest(ak_name=name), timeout=TIMEOUT)
            .nonce
        )
        request = _attest_request(multi, nonce, generate_recipient_key())
        calls = [s.stub.Attest.future(request, timeout=TIMEOUT) for s in sidecars]
        outcomes = [_denied(c) for c in calls]
        assert sorted(outcomes) == [False, True], outcomes
    # The audit chain, shared as well, names the replays' reason for the operator.
    records = multi.broker.admin("operator").ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    )
    denied = [r for r in records.records if r.decision == "deny" and "nonce" in r.reason]
    assert len(denied) >= 3


# --- stopping ---------------------------------------------------------------------------------


def test_sigterm_to_the_parent_stops_every_process(multi: MultiBroker) -> None:
    workers = children(multi.pid)
    assert len(workers) >= PROCESSES
    for sidecars in multi.sidecars.values():
        for s in sidecars:
            s.channel.close()
    assert multi.broker.stop(signal.SIGTERM) == 0, multi.broker.stderr()[-3000:]
    deadline = time.monotonic() + TIMEOUT
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], workers
    log = multi.broker.stderr()
    assert "SIGTERM" in log
    assert log.count('"broker stopped"') == PROCESSES
    assert "Traceback" not in log


# --- configuration ----------------------------------------------------------------------------


def test_several_processes_need_a_fixed_port(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = write_config(tmp_path / "broker.toml", tmp_path, pki, port=0, metrics_port=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    done = subprocess.run(
        [str(CLEANROOM), "broker", "serve", "--config", str(config), "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cleanroom: error: ")
    assert "fixed port" in lines[0] and "127.0.0.1:0" in lines[0]
