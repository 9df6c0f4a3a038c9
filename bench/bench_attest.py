"""Broker attestation throughput under load: full attestations from concurrent sidecars.

A real broker (``cleanroom broker serve``, mTLS, SQLite or PostgreSQL, JSON access log) is set up
the way an operator and two parties set one up: the operator enrolls one AK per sidecar directly
(the TPM2B_PUBLIC of a software-held key with tpm2_createak's attributes, see
:mod:`bench._loadgen`) and adds two parties; each party registers a data key sealed to the
broker's registration key and approves the workload (sha1 + sha256 digests of three files) for
it. A load generator in another process then runs ``--clients`` sidecars, each with its own TLS
certificate and AK, each looping over a full attestation: a challenge, a quote of the fresh
nonce signed in software, the evidence with the event log, and the check that both keys were
released. By default each attestation is one ``AttestStream`` call, as the sidecar makes it
when it has no challenge in hand; ``--attest-call unary`` makes it the two unary calls,
``GetChallenge`` then ``Attest``.

Baselines measured in the same run, on the same machine:

* echo: ``AdminService.GetBrokerInfo``, a trivial unary call through the same server stack (mTLS,
  identity, authorization table, parsing, metrics, access log) at the same concurrency;
* ``tpm2_checkquote`` run once per quote on this benchmark's evidence, as the manual recipe
  does (one process per quote).

Phases, each measured for ``--duration`` seconds after ``--warmup``: echo, then attestations
with every client back to back (closed loop: the throughput at saturation), then attestations
with the clients paced at ``--paced`` (0.5) times that throughput (open loop: the latency below
saturation, counted from when each attestation was due).

Latency is the client's: from sending GetChallenge to receiving Attest's response, including the
software signature (so it is an upper bound on what the broker adds). The CPU time of the broker
(and of PostgreSQL, when this run started it) per call is read from /proc across the window;
unlike rates, it hardly depends on what else the machine is running.

    python -m bench.bench_attest [--duration 10] [--clients 64] [--database sqlite|postgres]
        [--server-processes N] [--ak rsa|ecc] [--attest-call stream|unary] [--breakdown N]
        [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tpm2_pytss import TPM2B_DIGEST, TPML_DIGEST
from tpm2_pytss.utils import ffi

from bench._attest_setup import PARTIES, WORKLOAD
from bench._loadgen import CHANNEL_OPTIONS, events_to_json, proc_cpu_seconds
from broker.keyseal import seal_for_registration
from cleanroom.app.emulators.softak import QUOTED_BANKS, QuoteMaker, SoftAk, pcr_selection
from cleanroom.loopback import free_port
from cleanroom.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from evidence.binding import qualifying_data
from pki.ca import PkiLayout, init_pki
from pki.tls import channel_credentials
from sealing.keys import RecipientPublicKey, generate_recipient_key
from tests.harness.launch import approved_manifest, measure_workload

_REPO = Path(__file__).resolve().parents[1]
CLEANROOM = Path(sys.executable).parent / "cleanroom"
TRUST_DOMAIN = "cleanroom.local"
TIMEOUT = 30.0
TARGET_RATE = 1000.0
TARGET_P99_MS = 25.0


# --- the broker process -----------------------------------------------------------------------


@dataclass
class Broker:
    """The broker's processes (one, unless several share the port) and how to reach them."""

    procs: list[subprocess.Popen[bytes]]
    address: str
    pki: PkiLayout
    logs: list[Path]

    @property
    def pids(self) -> list[int]:
        """Every broker process: those started here and, with ``--processes``, their
        children (whose CPU /proc does not add to the parent's until they exit)."""
        pids = [p.pid for p in self.procs]
        return pids + [c for p in pids for c in _children(p)]

    def channel(self, kind: str, name: str = "") -> grpc.Channel:
        cert, key = self.pki.cert_and_key(kind, name)
        creds = channel_credentials(cert_file=cert, key_file=key, ca_file=self.pki.ca_cert)
        return grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)

    def admin(self, kind: str, name: str = "") -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel(kind, name))


def _children(parent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.append(int(stat.parent.name))
    return out


def _write_config(
    path: Path,
    work: Path,
    pki: PkiLayout,
    database_url: str,
    *,
    challenge_rate: float | None,
    listen: str = "127.0.0.1:0",
) -> None:
    cert, key = pki.cert_and_key("broker")
    limits = []
    if challenge_rate is not None:
        limits = [
            f"challenge_rate_per_ak = {challenge_rate!r}",
            f"challenge_rate_per_peer = {challenge_rate!r}",
        ]
    path.write_text(
        "\n".join(
            [
                "[broker]",
                f'database_url = "{database_url}"',
                f'state_dir = "{work / "state"}"',
                f'trust_domain = "{TRUST_DOMAIN}"',
                *limits,
                "[broker.tls]",
                f'listen = "{listen}"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
                f'ca_file = "{pki.ca_cert}"',
                "[broker.metrics]",
                'listen = "127.0.0.1:0"',
                "",
            ]
        )
    )


def _start_one(cmd: list[str], log: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Starts one broker process and waits for the address it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=work)
    assert proc.stdout is not None
    address, buffered, deadline = "", b"", time.monotonic() + 60
    while not address:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the broker did not start:\n{log.read_text()[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            buffered += os.read(proc.stdout.fileno(), 4096)
            for line in buffered.decode().splitlines():
                if line.startswith("broker listening on "):
                    address = line.split()[3]
    return proc, address


@contextmanager
def _broker(
    config: Path, pki: PkiLayout, work: Path, *, processes: int, max_workers: int | None
) -> Iterator[Broker]:
    """``cleanroom broker init``, then ``cleanroom broker serve --log-json [--processes N]``
    (or, for another worker-pool size, :mod:`bench._serve`, which is the same thing), its JSON
    log (all processes') in a file, stopped with SIGTERM on exit."""
    if max_workers is None:
        cmd = [str(CLEANROOM), "broker", "serve", "--config", str(config), "--log-json"]
    else:
        cmd = [sys.executable, "-m", "bench._serve", "--config", str(config)]
        cmd += ["--max-workers", str(max_workers)]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [work / "broker.log"]
    # The broker's state is made once by `broker init`, as an operator does; serve creates
    # nothing.
    subprocess.run(
        [str(CLEANROOM), "broker", "init", "--config", str(config)],
        check=True,
        capture_output=True,
        cwd=work,
    )
    try:
        env_cwd = _REPO if cmd[0] == sys.executable else work
        proc, address = _start_one(cmd, logs[0], env_cwd)
        procs.append(proc)
        yield Broker(procs, address, pki, logs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Database:
    url: str
    #: The server's data directory when this run started it (its processes' CPU is counted).
    datadir: Path | None = None

    def pids(self) -> list[int]:
        """The PostgreSQL postmaster and its children (backends, writers), if any."""
        if self.datadir is None:
            return []
        try:
            postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        pids = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.parent.name))
        return pids


@contextmanager
def _database(kind: str, work: Path) -> Iterator[Database]:
    if kind == "sqlite":
        yield Database(f"sqlite:///{work / 'broker.db'}")
        return
    from tests.harness.postgres import start_postgres

    pg = start_postgres()
    try:
        yield Database(pg.url, getattr(pg, "_datadir", None))
    finally:
        pg.stop()


# --- what the operator and the parties do -----------------------------------------------------


@dataclass(frozen=True)
class Setup:
    aks: list[SoftAk]
    events_json: list[dict[str, Any]]
    pcr23: dict[str, bytes]
    data_keys: dict[str, bytes]


def _provision(broker: Broker, aks: Sequence[SoftAk], work: Path) -> Setup:
    measured = measure_workload(work / "workload", WORKLOAD)

    operator = broker.admin("operator")
    for name in PARTIES:
        party = admin_pb2.Party(name=name)
        party.recipient_key.kem = common_pb2.KEM_ALGORITHM_X25519
        party.recipient_key.public_key = generate_recipient_key().public_key().raw
        operator.AddParty(admin_pb2.AddPartyRequest(party=party), timeout=TIMEOUT)
    for ak in aks:
        enrolled = operator.EnrollAk(
            admin_pb2.EnrollAkRequest(ak_public=ak.tpm2b_public), timeout=TIMEOUT
        )
        if enrolled.ak.ak_name != ak.name_hex:
            raise RuntimeError("the broker named the AK differently")

    manifest = approved_manifest("join-and-train", measured)
    data_keys: dict[str, bytes] = {}
    for name in PARTIES:
        stub = broker.admin("party", name)
        info = stub.GetBrokerInfo(admin_pb2.GetBrokerInfoRequest(), timeout=TIMEOUT)
        broker_key = RecipientPublicKey(
            kem=info.registration_key.kem, raw=bytes(info.registration_key.public_key)
        )
        key_id = f"{name}-data"
        data_keys[key_id] = secrets.token_bytes(32)
        sealed = seal_for_registration(broker_key, data_keys[key_id], key_id=key_id, owner=name)
        stub.RegisterDataKey(
            admin_pb2.RegisterDataKeyRequest(key_id=key_id, sealed_data_key=sealed),
            timeout=TIMEOUT,
        )
        stub.ApproveWorkload(
            admin_pb2.ApproveWorkloadRequest(
                manifest=manifest, key_ids=[key_id], output_recipients=list(PARTIES)
            ),
            timeout=TIMEOUT,
        )
    return Setup(
        aks=list(aks),
        events_json=events_to_json(measured.events),
        pcr23=dict(measured.pcrs),
        data_keys=data_keys,
    )


# --- the load generator -----------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseResult:
    mode: str
    clients: int
    duration: float
    latencies_us: list[int]
    errors: dict[str, int]
    opened: int
    loadgen_cpu: float
    server_cpu: float
    server_sys: float
    database_cpu: float

    @property
    def rate(self) -> float:
        return len(self.latencies_us) / self.duration

    def percentile_ms(self, p: float) -> float:
        xs = sorted(self.latencies_us)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] / 1000

    @property
    def server_cpu_us(self) -> float:
        """Broker CPU per completed call (microseconds)."""
        return self.server_cpu / max(1, len(self.latencies_us)) * 1e6

    @property
    def database_cpu_us(self) -> float:
        """CPU of a PostgreSQL server per completed call (microseconds; 0 for SQLite)."""
        return self.database_cpu / max(1, len(self.latencies_us)) * 1e6


def _client_specs(mode: str, broker: Broker, setup: Setup, clients: int) -> list[dict[str, Any]]:
    out = []
    for n in range(clients):
        if mode == "attest":
            cert, key = broker.pki.cert_and_key("sidecar", f"bench-{n:03d}")
            ak = setup.aks[n]
            out.append(
                {
                    "cert": str(cert),
                    "key": str(key),
                    "ak_key_pem": ak.private_pem().decode(),
                    "ak_name": ak.name_hex,
                }
            )
        else:
            cert, key = broker.pki.cert_and_key("operator")
            out.append({"cert": str(cert), "key": str(key)})
    return out


def _run_phase(
    mode: str,
    broker: Broker,
    setup: Setup,
    *,
    database: Database,
    clients: int,
    processes: int,
    duration: float,
    warmup: float,
    open_every: int,
    profile: Path | None = None,
    rate: float | None = None,
    attest_call: str = "stream",
) -> PhaseResult:
    specs = _client_specs(mode, broker, setup, clients)
    common = {
        "mode": mode,
        "address": broker.address,
        "ca_file": str(broker.pki.ca_cert),
        "key_ids": sorted(setup.data_keys),
        "expected_keys": {k: v.hex() for k, v in setup.data_keys.items()},
        "event_log": setup.events_json,
        "pcr23": {b: v.hex() for b, v in setup.pcr23.items()},
        "open_every": open_every,
        "ephemeral_pool": 512,
        "attest_call": attest_call,
    }
    procs: list[subprocess.Popen[str]] = []
    try:
        for p in range(processes):
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench._loadgen"],
                cwd=_REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            mine = specs[p::processes]
            paced = rate * len(mine) / clients if rate else 0.0
            proc.stdin.write(json.dumps({**common, "clients": mine, "rate": paced}) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"a load generator failed to start ({mode})")
        start = time.time() + warmup
        end = start + duration
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"start": start, "end": end}) + "\n")
            proc.stdin.flush()
        time.sleep(max(0.0, start - time.time()))
        db_pids = database.pids()
        cpu0 = [proc_cpu_seconds(pid) for pid in broker.pids]
        db0 = [proc_cpu_seconds(pid) for pid in db_pids]
        tag = f"{mode}-paced" if rate else mode
        spies = [
            _start_profiler(broker.pids[0], profile, f"broker-{tag}", duration),
            _start_profiler(procs[0].pid, profile, f"loadgen-{tag}", duration),
        ]
        time.sleep(max(0.0, end - time.time()))
        cpu1 = [proc_cpu_seconds(pid) for pid in broker.pids]
        db1 = [proc_cpu_seconds(pid) for pid in db_pids]
        for spy in spies:
            if spy is not None:
                spy.wait()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a load generator died ({mode})")
            results.append(json.loads(line))
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return PhaseResult(
        mode=mode,
        clients=clients,
        duration=duration,
        latencies_us=[x for r in results for x in r["latencies_us"]],
        errors=errors,
        opened=sum(int(r["opened"]) for r in results),
        loadgen_cpu=sum(float(r["loadgen_cpu"]) for r in results),
        server_cpu=sum(u + k for u, k in cpu1) - sum(u + k for u, k in cpu0),
        server_sys=sum(k for _, k in cpu1) - sum(k for _, k in cpu0),
        database_cpu=sum(u + k for u, k in db1) - sum(u + k for u, k in db0),
    )


def _start_profiler(
    pid: int, profile: Path | None, name: str, duration: float
) -> subprocess.Popen[bytes] | None:
    """py-spy (when asked for, and installed) sampling the thread that holds the GIL of a
    process during the window, as collapsed stacks in ``<profile>/<name>.txt``. Sampling slows
    the process down: figures from a profiled run are not comparable with others."""
    if profile is None:
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    profile.mkdir(parents=True, exist_ok=True)
    out = profile / f"{name}.txt"
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(int(duration)),
         "--format", "raw", "--gil", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


# --- the tpm2_checkquote baseline -------------------------------------------------------------


def _tools_pcr_file(pcr23: dict[str, bytes]) -> bytes:
    """The PCR file ``tpm2_quote --pcr`` writes (tpm2-tools' "serialized" format: the C image
    of TPML_PCR_SELECTION, a UINT32 count and that many TPML_DIGEST), built from tpm2-pytss's
    structures."""
    selection = pcr_selection()
    digests = TPML_DIGEST([TPM2B_DIGEST(pcr23[bank]) for bank in QUOTED_BANKS])
    count = ffi.new("UINT32 *", 1)
    return bytes(
        ffi.buffer(selection._cdata)[:] + ffi.buffer(count)[:] + ffi.buffer(digests._cdata)[:]
    )


def _checkquote_rate(setup: Setup, work: Path, pki: PkiLayout, runs: int) -> float | None:
    exe = shutil.which("tpm2_checkquote")
    if exe is None or runs <= 0:
        return None
    ak = setup.aks[0]
    ephemeral = generate_recipient_key().public_key()
    cert, _ = pki.cert_and_key("sidecar", "bench-000")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    qualifying = qualifying_data(
        nonce=secrets.token_bytes(32),
        kem=ephemeral.kem,
        ephemeral_public_key=ephemeral.raw,
        tls_certificate_der=der,
    )
    attest, signature = QuoteMaker(ak, setup.pcr23).quote(qualifying)
    d = work / "checkquote"
    d.mkdir(exist_ok=True)
    files = {
        "ak.pub": ak.tpm2b_public,
        "quote.msg": attest,
        "quote.sig": signature,
        "quote.pcrs": _tools_pcr_file(setup.pcr23),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    cmd = [exe, "-u", str(d / "ak.pub"), "-m", str(d / "quote.msg"), "-s", str(d / "quote.sig")]
    cmd += ["-f", str(d / "quote.pcrs"), "-g", "sha256", "-q", qualifying.hex()]
    subprocess.run(cmd, check=True, capture_output=True)  # the evidence must verify
    start = time.perf_counter()
    for _ in range(runs):
        subprocess.run(cmd, check=True, capture_output=True)
    return runs / (time.perf_counter() - start)


# --- report -----------------------------------------------------------------------------------


def _row(r: PhaseResult, what: str) -> str:
    return (
        f"  {what:<28} {r.rate:>8,.0f} /s   p50 {r.percentile_ms(50):6.2f} ms   "
        f"p99 {r.percentile_ms(99):6.2f} ms   server CPU {r.server_cpu_us:6.0f} us/call "
        f"({r.server_sys / max(r.server_cpu, 1e-9):.0%} sys)"
        + (f" + PostgreSQL {r.database_cpu_us:5.0f} us" if r.database_cpu else "")
        + "   "
        f"load-generator CPU {r.loadgen_cpu / max(1, len(r.latencies_us)) * 1e6:5.0f} us/call"
    )


def _report(
    args: argparse.Namespace,
    echo: PhaseResult,
    attest: PhaseResult,
    paced: PhaseResult | None,
    checkquote: float | None,
) -> None:
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"setup: {args.clients} clients in {args.loadgen_processes} load-generator process(es), "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up, database {args.database}, "
        f"{args.ak} AKs, {args.server_processes} broker process(es)"
    )
    print(_row(echo, "echo (GetBrokerInfo)"))
    print(_row(attest, "attestation (2 keys)"))
    if paced is not None:
        offered = args.paced * attest.rate
        print(_row(paced, f"  paced at {offered:,.0f}/s offered"))
    ratio = attest.rate / echo.rate if echo.rate else float("nan")
    calls = "1 AttestStream call" if args.attest_call == "stream" else "2 RPCs"
    print(f"  attestations per echo call:  {ratio:.3f}  (an attestation is {calls})")
    if checkquote is None:
        print("  tpm2_checkquote: skipped (not installed, or --checkquote-runs 0)")
    else:
        print(
            f"  tpm2_checkquote, 1 process/quote {checkquote:>6,.0f} /s  "
            f"({args.checkquote_runs} runs); attestations are {attest.rate / checkquote:.1f}x"
        )
    for r in (echo, attest, *([paced] if paced else [])):
        if r.errors:
            print(f"  {r.mode} errors: {json.dumps(r.errors)}")
    opened = attest.opened + (paced.opened if paced else 0)
    print(f"  released keys opened and compared with the registered ones: {opened}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    print(
        f"  target >= {TARGET_RATE:,.0f} attestations/s: "
        f"{verdict(attest.rate >= TARGET_RATE)} ({attest.rate:,.0f}/s)"
    )
    # With every client always waiting on a call, Little's law fixes the mean latency at
    # clients / rate: the closed loop shows saturation, the paced run the latency below it.
    line = (
        f"  target p99 <= {TARGET_P99_MS:g} ms: closed loop "
        f"{verdict(attest.percentile_ms(99) <= TARGET_P99_MS)} "
        f"(mean latency there is {args.clients} clients / rate = "
        f"{args.clients / max(attest.rate, 1e-9) * 1000:,.0f} ms)"
    )
    if paced is not None:
        line += (
            f"; paced at {paced.rate:,.0f}/s {verdict(paced.percentile_ms(99) <= TARGET_P99_MS)}"
        )
    print(line)


def main(argv: list[str]) -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="bench_attest", description=doc.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, default=64, help="concurrent sidecars")
    parser.add_argument(
        "--loadgen-processes", type=int, default=1, help="processes the clients are spread over"
    )
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--server-processes",
        type=int,
        default=1,
        help="broker processes sharing the port with SO_REUSEPORT: `cleanroom broker serve "
        "--processes N` (default 1)",
    )
    parser.add_argument(
        "--server-workers", type=int, help="the broker's worker threads per process (default 64)"
    )
    parser.add_argument("--ak", choices=("rsa", "ecc"), default="rsa", help="AK: RSA-2048 or P-256")
    parser.add_argument(
        "--paced",
        type=float,
        default=0.5,
        help="then run the clients paced at this fraction of the attestation rate measured, "
        "for latency below saturation (0: skip)",
    )
    parser.add_argument("--checkquote-runs", type=int, default=30)
    parser.add_argument(
        "--attest-call",
        choices=("stream", "unary"),
        default="stream",
        help="how each sidecar attests: one AttestStream call, as the sidecar does when it "
        "has no challenge in hand (default), or the unary GetChallenge then Attest",
    )
    parser.add_argument(
        "--challenge-rate",
        type=float,
        help="per-AK and per-peer challenge rate limit (default: the broker's, 20/s per AK "
        "and 50/s per peer, which 64 clients with an AK each never reach below 1,280/s)",
    )
    parser.add_argument(
        "--open-every", type=int, default=10, help="open a released key every N attestations"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--profile", type=Path, help="sample the broker with py-spy into this directory"
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        metavar="N",
        help="instead of the load test, time the broker's own work per component over N "
        "attestations in this process (no gRPC, no TLS; see bench/_breakdown.py)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.loadgen_processes < 1 or args.server_processes < 1:
        parser.error("--clients, --loadgen-processes and --server-processes must be positive")
    if args.breakdown:
        from bench._breakdown import run_breakdown

        with tempfile.TemporaryDirectory(prefix="bench-attest-") as tmp:
            with _database(args.database, Path(tmp)) as db:
                run_breakdown(
                    database_url=None if args.database == "sqlite" else db.url,
                    attestations=args.breakdown,
                    ak_alg=args.ak,
                )
        return

    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-attest-"))
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        sidecars = [f"bench-{n:03d}" for n in range(args.clients)]
        pki = init_pki(work / "pki", parties=PARTIES, sidecars=sidecars)
        # Key generation (RSA-2048 takes ~0.2 s a key) is spread over threads; OpenSSL releases
        # the GIL while it searches for primes.
        with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            aks = list(pool.map(lambda _: SoftAk.generate(args.ak), range(args.clients)))
        database = stack.enter_context(_database(args.database, work))
        config = work / "broker.toml"
        # Several processes share one port, so it is chosen here rather than by the kernel.
        listen = f"127.0.0.1:{free_port()}" if args.server_processes > 1 else "127.0.0.1:0"
        _write_config(
            config, work, pki, database.url, challenge_rate=args.challenge_rate, listen=listen
        )
        broker = stack.enter_context(
            _broker(
                config,
                pki,
                work,
                processes=args.server_processes,
                max_workers=args.server_workers,
            )
        )
        setup = _provision(broker, aks, work)
        checkquote = _checkquote_rate(setup, work, pki, args.checkquote_runs)
        phase = {
            "clients": args.clients,
            "processes": args.loadgen_processes,
            "duration": args.duration,
            "warmup": args.warmup,
            "open_every": args.open_every,
            "profile": args.profile,
            "database": database,
            "attest_call": args.attest_call,
        }
        echo = _run_phase("echo", broker, setup, **phase)
        attest = _run_phase("attest", broker, setup, **phase)
        paced = None
        if args.paced > 0 and attest.rate > 0:
            paced = _run_phase("attest", broker, setup, **phase, rate=args.paced * attest.rate)
        _report(args, echo, attest, paced, checkquote)
        if args.keep:
            print(f"work directory kept: {work}")


if __name__ == "__main__":
    main(sys.argv[1:])
