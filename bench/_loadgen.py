"""The load generator of ``bench.bench_attest``: many concurrent sidecars in a process of their own.

It plays each sidecar's part of a full attestation with a *software* AK: an RSA-2048 (or ECC
P-256) key held in ``cryptography``, enrolled by the operator as a TPM2B_PUBLIC with the
attributes of ``tpm2_createak`` (restricted signing key, fixedTPM, fixedParent,
sensitiveDataOrigin, RSASSA/ECDSA with SHA-256). Per attestation it asks for a nonce, builds the
TPMS_ATTEST a TPM2_Quote produces (TPM_GENERATED_VALUE, ATTEST_QUOTE, the AK's name as
qualifiedSigner, the binding of nonce, ephemeral key and its own TLS certificate as extraData,
clock info, PCR 23 of sha1 and sha256 selected, their SHA-256 digest) with tpm2-pytss, signs it
and marshals the TPMT_SIGNATURE, and sends the evidence with the event log (the challenge and
the evidence on one ``AttestStream`` call, or with ``"attest_call": "unary"`` in the spec the
unary ``GetChallenge`` and ``Attest``). It then checks that both data keys were released, and
every ``open_every`` attestations it opens one with
:func:`broker.keyseal.open_release` and compares it with the registered key. The broker runs
every one of its checks on this evidence; nothing is relaxed on its side.

Ephemeral X25519 keys come from a pool of 512 generated before the measurement and reused round
robin: generating one per attestation (about 0.1 ms here) would only add load-generator CPU on
the cores the broker runs on. The broker keeps no state about ephemeral keys, so it does the
same work for a reused one (parse, validate, bind into the qualifying data, seal to it).

Protocol (JSON lines): the parent writes a spec on stdin; this process connects every client,
runs one untimed call per client, prints ``{"ready": true}``; the parent writes
``{"start": t0, "end": t1}`` (``time.time()`` values); the clients run until ``t1`` and count
the calls that complete inside ``[t0, t1]``; this process prints the result object and exits.

    python -m bench._loadgen  < spec.json
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives import serialization

from broker.keyseal import open_release
from cleanroom.app.emulators.softak import (
    QUOTED_BANKS,
    QuoteMaker,
    SoftAk,
)
from cleanroom.v1 import admin_pb2, admin_pb2_grpc, attestation_pb2, attestation_pb2_grpc
from evidence.binding import qualifying_data
from evidence.pcr import WORKLOAD_PCR, MeasurementEvent
from evidence.proto import bank_to_pb, event_log_to_pb
from pki.tls import load_pem
from sealing.keys import RecipientPrivateKey, generate_recipient_key

CALL_TIMEOUT: Final = 30.0
#: Every channel gets its own connection, as separate sidecars would.
CHANNEL_OPTIONS: Final = (("grpc.use_local_subchannel_pool", 1),)


# --- the software AK ------------------------------------------------------------------------


# --- the spec ---------------------------------------------------------------------------------


def events_to_json(events: Sequence[MeasurementEvent]) -> list[dict[str, Any]]:
    """The events in the protobuf JSON mapping (launch events included), for a subprocess."""
    from google.protobuf import json_format

    doc = json_format.MessageToDict(event_log_to_pb(events))
    return list(doc.get("events", []))


def events_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[MeasurementEvent, ...]:
    from google.protobuf import json_format

    from cleanroom.v1 import common_pb2
    from evidence.proto import event_log_from_pb

    log = json_format.ParseDict({"events": list(items)}, common_pb2.EventLog())
    return event_log_from_pb(log)


def _cert_der(cert_file: str) -> bytes:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(load_pem(cert_file))
    return cert.public_bytes(serialization.Encoding.DER)


def _channel(address: str, cert: str, key: str, ca: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=load_pem(ca), private_key=load_pem(key), certificate_chain=load_pem(cert)
    )
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)


# --- clients ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one client saw inside the measurement window."""

    latencies_us: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    opened: int = 0
    outside: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Window:
    """The measurement window, set once every client is connected and warm, and the pace."""

    def __init__(self) -> None:
        self.start = float("inf")
        self.end = float("inf")
        #: Seconds between one client's calls when paced (open loop); 0 for back to back.
        self.interval = 0.0
        self.go = threading.Event()


class CheckFailed(Exception):
    """A response was well-formed but wrong (a key missing or not the registered one)."""


class AttestClient:
    """One sidecar: its channel, its AK and its certificate's DER."""

    def __init__(
        self,
        *,
        spec: Mapping[str, Any],
        client: Mapping[str, Any],
        pool: Sequence[RecipientPrivateKey],
        pool_offset: int,
        event_log: Any,
        expected_keys: Mapping[str, bytes],
    ) -> None:
        self.channel = _channel(spec["address"], client["cert"], client["key"], spec["ca_file"])
        self.stub = attestation_pb2_grpc.AttestationServiceStub(self.channel)
        self.ak = SoftAk.from_pem(client["ak_key_pem"].encode())
        self.ak_name = self.ak.name_hex
        if self.ak_name != client["ak_name"]:
            raise ValueError("the AK's name is not the enrolled one")
        self.maker = QuoteMaker(self.ak, {b: bytes.fromhex(v) for b, v in spec["pcr23"].items()})
        self.cert_der = _cert_der(client["cert"])
        self.pool = pool
        self.next_key = pool_offset
        self.event_log = event_log
        self.key_ids = list(spec["key_ids"])
        self.expected_keys = expected_keys
        self.open_every = int(spec.get("open_every", 0))
        self.done = 0
        #: "stream": one AttestStream call per attestation; "unary": GetChallenge, then Attest.
        self.stream = spec.get("attest_call", "stream") == "stream"
        values = {b: bytes.fromhex(v) for b, v in spec["pcr23"].items()}
        self.pcr_values = [(WORKLOAD_PCR, bank_to_pb(bank), values[bank]) for bank in QUOTED_BANKS]

    def once(self, tally: Tally, check_open: bool = False) -> None:
        """One full attestation: challenge, quote, attest, and the check of the release."""
        if not self.stream:
            challenge = self.stub.GetChallenge(
                attestation_pb2.GetChallengeRequest(ak_name=self.ak_name), timeout=CALL_TIMEOUT
            )
            response = self.stub.Attest(self._evidence(challenge), timeout=CALL_TIMEOUT)
            self._check(tally, response, check_open)
            return
        evidence: queue.SimpleQueue[attestation_pb2.AttestStreamRequest | None]
        evidence = queue.SimpleQueue()

        def requests() -> Iterator[attestation_pb2.AttestStreamRequest]:
            yield attestation_pb2.AttestStreamRequest(
                challenge=attestation_pb2.GetChallengeRequest(ak_name=self.ak_name)
            )
            step = evidence.get()
            if step is not None:
                yield step

        responses: Any = self.stub.AttestStream(requests(), timeout=CALL_TIMEOUT)
        try:
            first = next(responses)
            step = attestation_pb2.AttestStreamRequest(attest=self._evidence(first.challenge))
            evidence.put(step)
            second = next(responses)
        finally:
            evidence.put(None)
        self._check(tally, second.attest, check_open)

    def _evidence(
        self, challenge: attestation_pb2.GetChallengeResponse
    ) -> attestation_pb2.AttestRequest:
        """The quote of the challenge's nonce and the rest of the evidence."""
        ephemeral = self.pool[self.next_key % len(self.pool)]
        self.next_key += 1
        public = ephemeral.public_key()
        nonce = bytes(challenge.nonce)
        binding = qualifying_data(
            nonce=nonce,
            kem=public.kem,
            ephemeral_public_key=public.raw,
            tls_certificate_der=self.cert_der,
        )
        attest, signature = self.maker.quote(binding)
        request = attestation_pb2.AttestRequest(
            ak_name=self.ak_name,
            nonce=nonce,
            event_log=self.event_log,
            key_ids=self.key_ids,
        )
        request.quote.attest = attest
        request.quote.signature = signature
        for index, bank, value in self.pcr_values:
            request.quote.pcr_values.add(index=index, bank=bank, value=value)
        request.ephemeral_key.kem = public.kem  # type: ignore[assignment]
        request.ephemeral_key.public_key = public.raw
        self._ephemeral = ephemeral
        return request

    def _check(
        self, tally: Tally, response: attestation_pb2.AttestResponse, check_open: bool
    ) -> None:
        """Both keys released; every ``open_every`` attestations one opened and compared."""
        ephemeral = self._ephemeral
        released = sorted(k.key_id for k in response.released_keys)
        if released != sorted(self.expected_keys):
            raise CheckFailed(f"released {released}, expected {sorted(self.expected_keys)}")
        self.done += 1
        if check_open or (self.open_every and self.done % self.open_every == 0):
            key = response.released_keys[self.done % len(response.released_keys)]
            opened = open_release(
                ephemeral,
                bytes(key.sealed_key),
                session_id=response.session_id,
                key_id=key.key_id,
                owner=key.owner_party,
            )
            if opened != self.expected_keys[key.key_id]:
                raise CheckFailed(f"released key {key.key_id} is not the registered one")
            tally.opened += 1

    def close(self) -> None:
        self.channel.close()


class EchoClient:
    """The baseline: a trivial unary call (AdminService.GetBrokerInfo) through the same server
    pipeline (mTLS, identity, authorization, parsing, metrics, access log)."""

    def __init__(self, *, spec: Mapping[str, Any], client: Mapping[str, Any]) -> None:
        self.channel = _channel(spec["address"], client["cert"], client["key"], spec["ca_file"])
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.request = admin_pb2.GetBrokerInfoRequest()

    def once(self, tally: Tally, check_open: bool = False) -> None:
        response = self.stub.GetBrokerInfo(self.request, timeout=CALL_TIMEOUT)
        if not response.registration_key.public_key:
            raise CheckFailed("GetBrokerInfo returned no registration key")

    def close(self) -> None:
        self.channel.close()


Client = AttestClient | EchoClient


def _run_client(client: Client, window: Window, tally: Tally, phase: float) -> None:
    window.go.wait()
    # Paced clients start at staggered offsets and keep a fixed schedule; a late call's
    # latency counts from when it was due, so a stall is not hidden by the calls it delayed.
    due = time.time() + phase * window.interval
    while True:
        now = time.time()
        if window.interval:
            if due >= window.end:
                return
            if due > now:
                time.sleep(due - now)
            t0 = due
            due += window.interval
        else:
            if now >= window.end:
                return
            t0 = now
        try:
            client.once(tally)
        except grpc.RpcError as e:
            code = e.code()
            tally.error(code.name if isinstance(code, grpc.StatusCode) else "rpc")
            time.sleep(0.001)  # an erroring server is not hammered in a tight loop
            continue
        except CheckFailed as e:
            tally.error(f"check: {e}")
            continue
        t1 = time.time()
        if window.start <= t1 <= window.end:
            tally.latencies_us.append(int((t1 - t0) * 1e6))
        else:
            tally.outside += 1


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far (Linux /proc); zeros if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields 14 and 15 of stat (utime, stime); the split starts at field 3 (state).
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def run(spec: Mapping[str, Any], *, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs the clients the spec describes; see the module docstring for the protocol."""
    mode = spec["mode"]
    clients: list[Client] = []
    if mode == "attest":
        pool = [generate_recipient_key() for _ in range(int(spec["ephemeral_pool"]))]
        events = events_from_json(spec["event_log"])
        log = event_log_to_pb(events)
        expected = {k: bytes.fromhex(v) for k, v in spec["expected_keys"].items()}
        for n, c in enumerate(spec["clients"]):
            clients.append(
                AttestClient(
                    spec=spec,
                    client=c,
                    pool=pool,
                    # Clients start at different places in the pool.
                    pool_offset=n * len(pool) // len(spec["clients"]),
                    event_log=log,
                    expected_keys=expected,
                )
            )
    elif mode == "echo":
        clients = [EchoClient(spec=spec, client=c) for c in spec["clients"]]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    try:
        # One untimed call per client: TLS handshakes, HTTP/2 setup and the server's caches
        # are out of the measurement; each attest client opens one released key here.
        warm = Tally()
        for c in clients:
            c.once(warm, check_open=True)
        window = Window()
        tallies = [Tally() for _ in clients]
        threads = [
            threading.Thread(target=_run_client, args=(c, window, t, n / len(clients)), daemon=True)
            for n, (c, t) in enumerate(zip(clients, tallies, strict=True))
        ]
        for t in threads:
            t.start()
        emit({"ready": True, "warm_opened": warm.opened})
        go = json.loads(sys.stdin.readline())
        window.start, window.end = float(go["start"]), float(go["end"])
        rate = float(spec.get("rate") or 0.0)  # calls per second of this process, 0: unpaced
        window.interval = len(clients) / rate if rate > 0 else 0.0
        window.go.set()
        # This process's CPU across the window (the parent reads the server's).
        while time.time() < window.start:
            time.sleep(0.0005)
        cpu0 = time.process_time()
        while time.time() < window.end:
            time.sleep(0.005)
        cpu1 = time.process_time()
        for t in threads:
            t.join(timeout=CALL_TIMEOUT + 5)
    finally:
        for c in clients:
            c.close()
    errors: dict[str, int] = {}
    for tally in tallies:
        for k, v in tally.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "mode": mode,
        "duration": window.end - window.start,
        "latencies_us": [x for tally in tallies for x in tally.latencies_us],
        "errors": errors,
        "opened": warm.opened + sum(tally.opened for tally in tallies),
        "loadgen_cpu": cpu1 - cpu0,
    }


def main() -> int:
    spec = json.loads(sys.stdin.readline())

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    emit(run(spec, emit=emit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
