"""``kill -9`` of a real broker under mixed load loses nothing and audits everything.

A real ``cleanroom broker serve`` (mTLS on a fixed loopback port) serves concurrent clients:
sidecars attesting with a software AK (``bench._loadgen.SoftAk``: real TPM2_Quote structures,
every check of the broker runs on them), an operator enrolling and revoking AKs, parties
registering data keys, approving the workload for them and revoking approvals. Every few
hundred milliseconds the broker is killed with SIGKILL (its whole process group) and started
again on the same database and state. Then, reading the database directly:

* the audit chain verifies;
* every stored AK, data key, approval, revocation and session has its audit record;
* everything a client was told succeeded is stored (an acknowledged enrollment, registration,
  approval, revocation or release);
* no release record cites an approval after that approval's revocation record.

SQLite with one process, and PostgreSQL with ``--processes 2`` (two processes deciding at once,
which is where a release in flight can race a revocation).
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.audit import AuditLog
from broker.keyseal import seal_for_registration
from broker.model import AuditRecord
from broker.storage import Store
from broker.storage.schema import sessions
from cleanroom.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
)
from evidence.binding import qualifying_data
from evidence.pcr import WORKLOAD_PCR, Measurement
from evidence.proto import bank_to_pb, event_log_to_pb
from pki.ca import PkiLayout, init_pki
from pki.tls import channel_credentials
from sealing.keys import RecipientPublicKey, generate_recipient_key
from tests.harness.launch import approved_manifest, measure_workload
from tests.harness.net import free_port
from tests.support.broker import Spawned, spawn_broker
from tests.support.softtpm import QUOTED_BANKS, QuoteMaker, SoftAk

TD = "cleanroom.local"
PARTIES = ("advertiser", "publisher")
WORKLOAD = (("run.py", b"print('join')\n"), ("model.py", b"def train(df):\n    return df\n"))
#: Kill cycles per backend, and how long the load runs before each kill (seconds). Enough
#: cycles that a broker writing a state change and its record in two transactions is caught
#: between them (see the module docstring of broker.storage.unit).
CYCLES = {"sqlite": 7, "postgresql": 6}
LOAD_SECONDS = (0.6, 1.4)
#: Approvals the load creates at most (each attestation seals every approved key).
MAX_APPROVALS = 24
CALL_TIMEOUT = 5.0


@dataclass
class Ledger:
    """What clients were told succeeded (and what they asked to revoke)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    aks: list[str] = field(default_factory=list)
    keys: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PARTIES})
    approvals: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PARTIES})
    revoked_approvals: set[str] = field(default_factory=set)
    revoked_aks: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    calls: int = 0

    def add(self, what: Callable[[], None]) -> None:
        """Runs ``what`` (an update of this ledger) under the lock and counts the change."""
        with self.lock:
            what()
            self.calls += 1


@dataclass
class Room:
    pki: PkiLayout
    address: str
    ak: SoftAk
    maker: QuoteMaker
    measured: Measurement
    manifest: common_pb2.WorkloadManifest
    registration_key: RecipientPublicKey
    sidecar_cert_der: bytes
    ledger: Ledger

    def channel(self, kind: str, name: str = "") -> grpc.Channel:
        return _channel(self.pki, self.address, kind, name)


def _channel(pki: PkiLayout, address: str, kind: str, name: str = "") -> grpc.Channel:
    """A channel with a connection of its own (so that the load spreads over processes)."""
    cert, key = pki.cert_and_key(kind, name)
    creds = channel_credentials(cert_file=cert, key_file=key, ca_file=pki.ca_cert)
    return grpc.secure_channel(address, creds, options=(("grpc.use_local_subchannel_pool", 1),))


def _write_config(workdir: Path, pki: PkiLayout, database_url: str, port: int) -> Path:
    cert, key = pki.cert_and_key("broker")
    path = workdir / "broker.toml"
    path.write_text(
        "\n".join(
            [
                "[broker]",
                f'database_url = "{database_url}"',
                f'state_dir = "{workdir / "state"}"',
                f'trust_domain = "{TD}"',
                # The load asks for many nonces per AK; the limit is not what is tested here.
                "challenge_rate_per_ak = 100000.0",
                "challenge_rate_per_peer = 100000.0",
                "[broker.tls]",
                f'listen = "127.0.0.1:{port}"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
                f'ca_file = "{pki.ca_cert}"',
                "[broker.metrics]",
                "enabled = false",
                "",
            ]
        )
    )
    return path


def _provision(room_pki: PkiLayout, address: str, workdir: Path) -> Room:
    measured = measure_workload(workdir / "workload", WORKLOAD)
    manifest = approved_manifest("join", measured)
    ak = SoftAk.generate("ecc")
    operator = admin_pb2_grpc.AdminServiceStub(_channel(room_pki, address, "operator"))
    info = operator.GetBrokerInfo(admin_pb2.GetBrokerInfoRequest(), timeout=CALL_TIMEOUT)
    room = Room(
        pki=room_pki,
        address=address,
        ak=ak,
        maker=QuoteMaker(ak, measured.pcrs),
        measured=measured,
        manifest=manifest,
        registration_key=RecipientPublicKey(
            kem=info.registration_key.kem, raw=bytes(info.registration_key.public_key)
        ),
        sidecar_cert_der=x509.load_pem_x509_certificate(
            Path(room_pki.cert_and_key("sidecar", "sidecar-1")[0]).read_bytes()
        ).public_bytes(serialization.Encoding.DER),
        ledger=Ledger(),
    )
    for name in PARTIES:
        party = admin_pb2.Party(name=name)
        party.recipient_key.kem = common_pb2.KEM_ALGORITHM_X25519
        party.recipient_key.public_key = generate_recipient_key().public_key().raw
        operator.AddParty(admin_pb2.AddPartyRequest(party=party), timeout=CALL_TIMEOUT)
    operator.EnrollAk(admin_pb2.EnrollAkRequest(ak_public=ak.tpm2b_public), timeout=CALL_TIMEOUT)
    for name in PARTIES:
        stub = admin_pb2_grpc.AdminServiceStub(room.channel("party", name))
        key_id = _register(room, stub, name)
        _approve(room, stub, name, key_id)
    return room


# --- the clients' operations (each records what it was told succeeded) ----------------------


def _register(room: Room, stub: admin_pb2_grpc.AdminServiceStub, party: str) -> str:
    key_id = f"{party}-{secrets.token_hex(6)}"
    sealed = seal_for_registration(
        room.registration_key, secrets.token_bytes(32), key_id=key_id, owner=party
    )
    stub.RegisterDataKey(
        admin_pb2.RegisterDataKeyRequest(key_id=key_id, sealed_data_key=sealed),
        timeout=CALL_TIMEOUT,
    )
    room.ledger.add(lambda: room.ledger.keys[party].append(key_id))
    return key_id


def _approve(room: Room, stub: admin_pb2_grpc.AdminServiceStub, party: str, key_id: str) -> None:
    response = stub.ApproveWorkload(
        admin_pb2.ApproveWorkloadRequest(
            manifest=room.manifest, key_ids=[key_id], output_recipients=list(PARTIES)
        ),
        timeout=CALL_TIMEOUT,
    )
    approval_id = response.approval.approval_id
    room.ledger.add(lambda: room.ledger.approvals[party].append(approval_id))


def _attest(room: Room, stub: attestation_pb2_grpc.AttestationServiceStub) -> None:
    challenge = stub.GetChallenge(
        attestation_pb2.GetChallengeRequest(ak_name=room.ak.name_hex), timeout=CALL_TIMEOUT
    )
    ephemeral = generate_recipient_key().public_key()
    binding = qualifying_data(
        nonce=challenge.nonce,
        kem=ephemeral.kem,
        ephemeral_public_key=ephemeral.raw,
        tls_certificate_der=room.sidecar_cert_der,
    )
    attest, signature = room.maker.quote(binding)
    request = attestation_pb2.AttestRequest(ak_name=room.ak.name_hex, nonce=challenge.nonce)
    request.quote.attest = attest
    request.quote.signature = signature
    for bank in QUOTED_BANKS:
        request.quote.pcr_values.add(
            index=WORKLOAD_PCR, bank=bank_to_pb(bank), value=room.measured.pcrs[bank]
        )
    request.event_log.CopyFrom(event_log_to_pb(room.measured.events))
    request.ephemeral_key.kem = common_pb2.KEM_ALGORITHM_X25519
    request.ephemeral_key.public_key = ephemeral.raw
    response = stub.Attest(request, timeout=CALL_TIMEOUT)
    if response.released_keys:
        room.ledger.add(lambda: room.ledger.sessions.add(response.session_id))


def _worker(room: Room, stop: threading.Event, kind: str, seed: int) -> None:
    rng = random.Random(seed)
    ledger = room.ledger
    party = PARTIES[seed % len(PARTIES)]
    channel = room.channel(
        "sidecar" if kind == "attest" else "operator" if kind == "operator" else "party",
        "sidecar-1" if kind == "attest" else "" if kind == "operator" else party,
    )
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    attestation = attestation_pb2_grpc.AttestationServiceStub(channel)
    try:
        while not stop.is_set():
            try:
                if kind == "attest":
                    _attest(room, attestation)
                elif kind == "operator":
                    if rng.random() < 0.75 or not ledger.aks:
                        ak = SoftAk.generate("ecc")
                        admin.EnrollAk(
                            admin_pb2.EnrollAkRequest(ak_public=ak.tpm2b_public),
                            timeout=CALL_TIMEOUT,
                        )
                        ledger.add(partial(ledger.aks.append, ak.name_hex))
                    else:
                        name = rng.choice(ledger.aks)
                        admin.RevokeAk(
                            admin_pb2.RevokeAkRequest(ak_name=name, reason="crash test"),
                            timeout=CALL_TIMEOUT,
                        )
                        ledger.add(partial(ledger.revoked_aks.add, name))
                else:
                    roll = rng.random()
                    with ledger.lock:
                        keys = list(ledger.keys[party])
                        # The first approval of each party stays: attestations keep releasing.
                        revocable = ledger.approvals[party][1:]
                        approvals = sum(len(a) for a in ledger.approvals.values())
                    if roll < 0.4:
                        _register(room, admin, party)
                    elif roll < 0.75 and approvals < MAX_APPROVALS:
                        _approve(room, admin, party, rng.choice(keys))
                    elif revocable:
                        approval_id = rng.choice(revocable)
                        admin.RevokeApproval(
                            admin_pb2.RevokeApprovalRequest(approval_id=approval_id),
                            timeout=CALL_TIMEOUT,
                        )
                        ledger.add(partial(ledger.revoked_approvals.add, approval_id))
            except grpc.RpcError:
                # The broker is down (killed) or refused: nothing to record. Retry shortly.
                time.sleep(0.02)
    finally:
        channel.close()


@dataclass
class Found:
    """What the database holds after the crashes, and the violations found."""

    objects: int = 0
    violations: list[str] = field(default_factory=list)


def _check(database_url: str, ledger: Ledger) -> Found:
    found = Found()
    with Store.open(database_url, migrate=False) as store:
        audit = AuditLog(store)
        report = audit.verify_chain()
        if not report.valid:
            found.violations.append(
                f"audit verify: {report.problem} at {report.first_bad_sequence}"
            )
        records: list[AuditRecord] = []
        while True:
            batch = audit.list_records(
                after_sequence=records[-1].sequence if records else 0, limit=1000
            )
            if not batch:
                break
            records.extend(batch)
        allowed: dict[tuple[str, str], int] = {}
        for r in records:
            if r.decision == "allow":
                allowed.setdefault((r.action, r.subject), r.sequence)

        def need(what: str, *keys: tuple[str, str]) -> None:
            found.objects += 1
            if not any(k in allowed for k in keys):
                found.violations.append(f"{what} has no audit record")

        stored_aks = {a.ak_name: a for a in store.list_aks()}
        for name, ak in stored_aks.items():
            need(f"AK {name}", ("ak.enroll", name), ("ak.activate", name))
            if ak.revoked:
                need(f"revocation of AK {name}", ("ak.revoke", name))
        stored_keys = {k.key_id for k in store.list_data_keys()}
        for key_id in stored_keys:
            need(f"data key {key_id}", ("key.register", key_id))
        stored_approvals = {a.approval_id: a for a in store.list_approvals()}
        for approval_id, approval in stored_approvals.items():
            need(f"approval {approval_id}", ("workload.approve", approval_id))
            if approval.revoked:
                need(f"revocation of approval {approval_id}", ("workload.revoke", approval_id))
        released = {
            r.reason.split(",")[0].removeprefix("session "): r
            for r in records
            if r.action == "key.release" and r.decision == "allow"
        }
        with store.engine.connect() as conn:
            stored_sessions = set(conn.execute(sa.select(sessions.c.session_id)).scalars())
        for session_id in stored_sessions:
            found.objects += 1
            if session_id not in released:
                found.violations.append(f"session {session_id} has no release record")
        # A release never cites an approval after that approval's revocation record.
        for r in records:
            if r.action == "key.release" and r.decision == "allow":
                cited = r.reason.rsplit("approval ", 1)[-1]
                revoked_at = allowed.get(("workload.revoke", cited))
                if revoked_at is not None and revoked_at < r.sequence:
                    found.violations.append(
                        f"release record {r.sequence} cites approval {cited} revoked at "
                        f"record {revoked_at}"
                    )
        # Everything a client was told succeeded is stored.
        with ledger.lock:
            for name in ledger.aks:
                if name not in stored_aks:
                    found.violations.append(f"acknowledged AK {name} is not stored")
            for name in ledger.revoked_aks:
                if not stored_aks.get(name) or not stored_aks[name].revoked:
                    found.violations.append(f"acknowledged revocation of AK {name} is lost")
            for keys in ledger.keys.values():
                for key_id in keys:
                    if key_id not in stored_keys:
                        found.violations.append(f"acknowledged data key {key_id} is not stored")
            for approvals in ledger.approvals.values():
                for approval_id in approvals:
                    if approval_id not in stored_approvals:
                        found.violations.append(f"acknowledged approval {approval_id} is lost")
            for approval_id in ledger.revoked_approvals:
                a = stored_approvals.get(approval_id)
                if a is None or not a.revoked:
                    found.violations.append(f"acknowledged revocation of {approval_id} is lost")
            for session_id in ledger.sessions:
                if session_id not in stored_sessions:
                    found.violations.append(f"acknowledged release {session_id} is not stored")
    return found


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql-2-processes", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{tmp_path / 'broker.db'}", 1
    else:
        yield "postgresql", request.getfixturevalue("postgres_url"), 2


@pytest.mark.slow
def test_kill_9_under_mixed_load_loses_nothing_and_audits_everything(
    backend: tuple[str, str, int], tmp_path: Path
) -> None:
    name, database_url, processes = backend
    pki = init_pki(tmp_path / "pki", parties=PARTIES, sidecars=("sidecar-1",))
    config = _write_config(tmp_path, pki, database_url, free_port())
    broker: Spawned = spawn_broker(config, tmp_path, processes=processes)
    rng = random.Random(1234)
    kinds = ["attest", "attest", "operator", "party", "party", "party", "party"]
    try:
        room = _provision(pki, broker.grpc_address, tmp_path)
        for cycle in range(CYCLES[name]):
            stop = threading.Event()
            workers = [
                threading.Thread(target=_worker, args=(room, stop, kind, n), daemon=True)
                for n, kind in enumerate(kinds)
            ]
            for w in workers:
                w.start()
            # Kill while the load runs (not after it stopped): mid-decision is the point.
            time.sleep(rng.uniform(*LOAD_SECONDS))
            broker.kill_all()
            stop.set()
            for w in workers:
                w.join(timeout=30)
            if cycle < CYCLES[name] - 1:
                broker = spawn_broker(config, tmp_path, processes=processes, init=False)
    finally:
        broker.kill_all()
    found = _check(database_url, room.ledger)
    print(
        f"{name}: {CYCLES[name]} kill -9 cycles, {room.ledger.calls} acknowledged changes, "
        f"{found.objects} stored objects checked, {len(found.violations)} violations"
    )
    assert room.ledger.calls > 20 * CYCLES[name], "the load did too little to test anything"
    assert not found.violations, "\n".join(found.violations[:40])
