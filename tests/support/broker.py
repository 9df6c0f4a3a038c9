"""The one launcher of real broker processes: ``cleanroom broker init`` then ``serve``.

Every test that runs ``cleanroom broker serve`` starts it here, so that the start-up sequence an
operator follows (init once, then serve) is the one the tests follow too.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.keyseal import open_release, seal_for_registration
from cleanroom.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
)
from pki.ca import (
    PkiLayout,
)
from pki.tls import channel_credentials
from sealing.keys import RecipientPrivateKey, RecipientPublicKey, generate_recipient_key
from tests.harness.swtpm import SWTPM_LOCALCA_DIR

#: The ``cleanroom`` command of the interpreter running the tests (this worktree's code).
CLEANROOM = Path(sys.executable).parent / "cleanroom"


def clean_env() -> dict[str, str]:
    """The environment without ``CLEANROOM_*`` overrides (the config file decides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}


def init_broker(config: Path) -> str:
    """Runs ``cleanroom broker init --config CONFIG`` and returns what it printed.

    Raises:
        AssertionError: the command failed (its output is in the message).
    """
    proc = subprocess.run(
        [str(CLEANROOM), "broker", "init", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"broker init failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@dataclass
class Spawned:
    """A ``cleanroom broker serve`` process (the parent, with ``--processes N``)."""

    proc: subprocess.Popen[bytes]
    grpc_address: str
    stderr_path: Path
    #: Every metrics address printed, process 0's first.
    metrics: list[str] = field(default_factory=list)
    #: Everything the process printed on stdout until it was ready.
    stdout: str = ""

    def kill_all(self) -> None:
        """SIGKILL to the whole process group (the parent and every worker), then reaps."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def spawn_broker(
    config: Path,
    workdir: Path,
    *,
    processes: int = 1,
    log_json: bool = True,
    init: bool = True,
    timeout: float = 30.0,
    stderr_name: str = "broker.stderr",
) -> Spawned:
    """Initializes the broker's state (unless ``init`` is false: it exists already) and
    starts ``cleanroom broker serve`` in a process group of its own; waits until it prints
    its gRPC address and every metrics address (when the configuration enables metrics).

    Raises:
        AssertionError: it did not start (its stderr is in the message).
    """
    if init:
        init_broker(config)
    stderr_path = workdir / stderr_name
    command = [str(CLEANROOM), "broker", "serve", "--config", str(config)]
    if log_json:
        command.append("--log-json")
    if processes != 1:
        command += ["--processes", str(processes)]
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, env=clean_env(), start_new_session=True
        )
    assert proc.stdout is not None
    grpc_address, buffered = "", b""
    metrics: list[str] = []
    deadline = time.monotonic() + timeout
    with open(config, "rb") as f:
        metrics_enabled = (
            tomllib.load(f).get("broker", {}).get("metrics", {}).get("enabled", True) is not False
        )
    while not (grpc_address and len(metrics) >= (processes if metrics_enabled else 0)):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            Spawned(proc, "", stderr_path).kill_all()
            raise AssertionError(f"broker did not start:\n{stderr_path.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        buffered += os.read(proc.stdout.fileno(), 4096)
        lines = buffered.decode().splitlines()
        grpc_address = next(
            (ln.split()[3] for ln in lines if ln.startswith("broker listening on ")), ""
        )
        metrics = [ln.split("http://")[1].split("/")[0] for ln in lines if "/metrics" in ln]
    return Spawned(proc, grpc_address, stderr_path, metrics, buffered.decode())


TD = "cleanroom.local"


TIMEOUT = 10.0


@dataclass
class BrokerProcess:
    """A running ``cleanroom broker serve`` and what is needed to talk to it."""

    proc: subprocess.Popen[bytes]
    grpc_address: str
    metrics_address: str
    pki: PkiLayout
    stderr_path: Path

    def channel(self, kind: str, name: str = "") -> grpc.Channel:
        cert, key = self.pki.cert_and_key(kind, name)
        creds = channel_credentials(cert_file=cert, key_file=key, ca_file=self.pki.ca_cert)
        return grpc.secure_channel(self.grpc_address, creds)

    def admin(self, kind: str, name: str = "") -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel(kind, name))

    def attestation(self, kind: str, name: str = "") -> attestation_pb2_grpc.AttestationServiceStub:
        return attestation_pb2_grpc.AttestationServiceStub(self.channel(kind, name))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def write_config(
    path: Path, workdir: Path, pki: PkiLayout, *, ca_file: Path | None = None, **extra: Any
) -> Path:
    lines = [
        "[broker]",
        f'database_url = "sqlite:///{workdir / "broker.db"}"',
        f'state_dir = "{workdir / "state"}"',
        f'trust_domain = "{TD}"',
    ]
    for setting, value in extra.items():
        text = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"{setting} = {text}")
    cert, key = pki.cert_and_key("broker")
    lines += [
        "[broker.tls]",
        'listen = "127.0.0.1:0"',
        f'cert_file = "{cert}"',
        f'key_file = "{key}"',
        f'ca_file = "{ca_file or pki.ca_cert}"',
        "[broker.metrics]",
        'listen = "127.0.0.1:0"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_broker(config: Path, pki: PkiLayout, workdir: Path) -> BrokerProcess:
    """Runs ``cleanroom broker init`` and starts ``cleanroom broker serve`` (the launcher of
    tests/support), waiting for the addresses it prints."""
    spawned = spawn_broker(config, workdir)
    metrics = spawned.metrics[0] if spawned.metrics else ""
    return BrokerProcess(spawned.proc, spawned.grpc_address, metrics, pki, spawned.stderr_path)


#: swtpm-tools' local CA, root first: what a broker trusts to accept the swtpm's EK certificates.
SWTPM_EK_CA_FILES = [
    str(SWTPM_LOCALCA_DIR / "swtpm-localca-rootca-cert.pem"),
    str(SWTPM_LOCALCA_DIR / "issuercert.pem"),
]


@contextmanager
def running_swtpm_broker(workdir: Path, pki: PkiLayout) -> Iterator[BrokerProcess]:
    """A broker in ``workdir`` that trusts the swtpm's EK CA; it must stop cleanly (exit 0)."""
    config = write_config(
        workdir / "broker.toml", workdir, pki, trusted_ek_ca_files=SWTPM_EK_CA_FILES
    )
    process = start_broker(config, pki, workdir)
    try:
        yield process
    finally:
        assert process.stop() == 0, process.stderr()


def code_of(call: Any, request: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code of a call that is expected to fail."""
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=TIMEOUT, **kwargs)
    code = e.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=TIMEOUT)
    return e.value


def add_parties(b: BrokerProcess, *names: str) -> None:
    operator = b.admin("operator")
    for name in names:
        party = admin_pb2.Party(name=name)
        party.recipient_key.kem = common_pb2.KEM_ALGORITHM_X25519
        party.recipient_key.public_key = generate_recipient_key().public_key().raw
        operator.AddParty(admin_pb2.AddPartyRequest(party=party), timeout=TIMEOUT)


def approve_with_keys(
    b: BrokerProcess, parties: Sequence[str], manifest: common_pb2.WorkloadManifest
) -> dict[str, bytes]:
    """Each party registers a fresh data key ``<party>-data`` and approves ``manifest`` for it,
    with every party an output recipient; returns the data keys by key id."""
    data_keys: dict[str, bytes] = {}
    for party in parties:
        key_id = f"{party}-data"
        data_keys[key_id] = secrets.token_bytes(32)
        register_key(b, party, key_id, data_keys[key_id])
        b.admin("party", party).ApproveWorkload(
            admin_pb2.ApproveWorkloadRequest(
                manifest=manifest, key_ids=[key_id], output_recipients=list(parties)
            ),
            timeout=TIMEOUT,
        )
    return data_keys


def open_released(
    ephemeral: RecipientPrivateKey,
    response: attestation_pb2.AttestResponse,
    key: common_pb2.SealedDataKey,
) -> bytes:
    """The data key of one of ``response``'s released keys, opened with the attestation's
    ephemeral key."""
    return open_release(
        ephemeral,
        bytes(key.sealed_key),
        session_id=response.session_id,
        key_id=key.key_id,
        owner=key.owner_party,
    )


def register_key(
    b: BrokerProcess, party: str, key_id: str, data_key: bytes, *, owner: str | None = None
) -> admin_pb2.RegisterDataKeyResponse:
    stub = b.admin("party", party)
    info = stub.GetBrokerInfo(admin_pb2.GetBrokerInfoRequest(), timeout=TIMEOUT)
    broker_key = RecipientPublicKey(
        kem=info.registration_key.kem, raw=bytes(info.registration_key.public_key)
    )
    sealed = seal_for_registration(broker_key, data_key, key_id=key_id, owner=owner or party)
    response: admin_pb2.RegisterDataKeyResponse = stub.RegisterDataKey(
        admin_pb2.RegisterDataKeyRequest(key_id=key_id, sealed_data_key=sealed), timeout=TIMEOUT
    )
    return response
