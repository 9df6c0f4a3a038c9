"""A real sidecar data path for tests: parties with data keys and recipient keys, sealed inputs,
and a running WorkloadServer on a Unix socket. Shared by the SDK's, the data path's unit tests
and the data path's integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sealing.envelope import OpenReader, SealWriter, new_data_key
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from sidecar.dataplane import (
    DataPlaneConfig,
    InputSpec,
    KeyRing,
    LocalDirectoryOutput,
    WorkloadServer,
)


@dataclass
class Party:
    """A data owner: its data key (registered under ``key_id``) and its recipient key pair."""

    name: str
    data_key: bytes = field(default_factory=new_data_key, repr=False)
    recipient: RecipientPrivateKey = field(default_factory=generate_recipient_key, repr=False)

    @property
    def key_id(self) -> str:
        return f"{self.name}-key"


def seal_to_file(path: Path, plaintext: bytes, party: Party, *, chunk_size: int = 1 << 16) -> Path:
    """Seals ``plaintext`` with the party's data key into ``path``."""
    with (
        open(path, "wb") as f,
        SealWriter(f, data_key=party.data_key, key_id=party.key_id, chunk_size=chunk_size) as w,
    ):
        w.write(plaintext)
    return path


def open_sealed(path: Path, key: RecipientPrivateKey) -> bytes:
    """Opens a sealed output with a recipient's private key (raises on any failure)."""
    with open(path, "rb") as f, OpenReader(f, private_key=key) as r:
        return r.read()


@dataclass
class Session:
    server: WorkloadServer
    keyring: KeyRing
    input_dir: Path
    output_dir: Path
    socket_dir: Path

    @property
    def socket(self) -> str:
        return os.fspath(self.server.socket_path)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.server.environment()}


@contextmanager
def short_tempdir(prefix: str = "dp-") -> Iterator[Path]:
    """A temporary directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_session(
    base: Path,
    *,
    inputs: Mapping[str, tuple[bytes, Party]],
    recipients: Sequence[Party],
    allowed_peer: Callable[[int, int], bool],
    keyring: KeyRing | None = None,
    config: DataPlaneConfig | None = None,
    chunk_size: int = 1 << 16,
) -> Iterator[Session]:
    """Seals ``inputs`` under ``base``, fills a key ring with their owners' keys and runs a
    WorkloadServer whose socket lives in a short private directory."""
    input_dir = base / "inputs"
    output_dir = base / "outputs"
    input_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    ring = keyring if keyring is not None else KeyRing(valid_until=None)
    for i, (name, (plaintext, party)) in enumerate(inputs.items()):
        path = seal_to_file(input_dir / f"input{i}.sealed", plaintext, party, chunk_size=chunk_size)
        specs.append(InputSpec(name, os.fspath(path), party.key_id, party.name))
        ring.add(party.key_id, party.data_key)
    with short_tempdir() as sock_parent:
        socket_dir = sock_parent / "s"
        server = WorkloadServer(
            socket_dir=socket_dir,
            inputs=specs,
            keyring=ring,
            outputs=LocalDirectoryOutput(output_dir),
            recipients=[(p.name, p.recipient.public_key()) for p in recipients],
            allowed_peer=allowed_peer,
            config=config,
        )
        with ring, server:
            yield Session(server, ring, input_dir, output_dir, socket_dir)


def settled_files(directory: Path, *, quiet: float = 0.3, timeout: float = 10.0) -> list[Path]:
    """The regular files under ``directory`` once the listing has not changed for ``quiet``
    seconds (or ``timeout`` passed): outputs are discarded asynchronously, when the sidecar
    sees a cancellation."""
    deadline = time.monotonic() + timeout
    last: list[Path] | None = None
    stable_since = time.monotonic()
    while True:
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        now = time.monotonic()
        if files != last:
            last, stable_since = files, now
        elif now - stable_since >= quiet or now >= deadline:
            return files
        time.sleep(0.02)


def only_this_process(pid: int, uid: int) -> bool:
    """An allowed-peer predicate for tests whose client is the test process itself."""
    return pid == os.getpid()


class LapsingClock:
    """Reads as "now" for the first ``lapse_after`` readings, then two minutes later: the
    attestation lapses after a known number of key-ring checks, whatever the transport buffers."""

    def __init__(self, lapse_after: int) -> None:
        self.start = datetime(2030, 1, 1, tzinfo=UTC)
        self.readings = 0
        self.lapse_after = lapse_after

    def __call__(self) -> datetime:
        self.readings += 1
        late = self.readings > self.lapse_after
        return self.start + (timedelta(minutes=2) if late else timedelta())


class FailingReattest:
    """A key ring's re-attestation that cannot reach the broker; counts its ``attempts``."""

    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self) -> datetime:
        self.attempts += 1
        raise ConnectionError("broker unreachable")


class LeavesAfter:
    """An allowed-peer predicate that says yes ``calls`` times, then no: the peer left the
    workload's tree while its stream was open."""

    def __init__(self, calls: int) -> None:
        self.left = calls

    def __call__(self, pid: int, uid: int) -> bool:
        self.left -= 1
        return self.left >= 0 and only_this_process(pid, uid)
