"""A whole clean room for the sidecar's end-to-end tests: a real broker, a PKI, parties with keys
and approvals, a workload, and ``cleanroom sidecar run`` started against them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.client import BrokerClient
from broker.manifests import manifest_from_files
from cleanroom.v1 import common_pb2
from evidence.launch import Launch, digest_executable
from evidence.proto import launch_to_pb, manifest_to_pb
from pki.ca import PkiLayout
from sealing.envelope import new_data_key, seal_bytes
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from tests.harness.swtpm import Swtpm
from tests.support.broker import SWTPM_EK_CA_FILES, BrokerProcess, start_broker, write_config
from tests.support.pki import make_pki

CLEANROOM = Path(sys.executable).parent / "cleanroom"


#: The workload's interpreter: this virtualenv's, where the workload SDK is installed.
PY = sys.executable


PARTIES = ("advertiser", "publisher")


OUTPUT_RECIPIENTS = ["advertiser", "publisher"]


#: The workload: one script and one helper module, both measured. The mode comes from argv,
#: which is measured too (the launch): :func:`start_sidecar` has both parties approve each
#: command a test runs, with the files, before the sidecar starts.
WORKLOAD_SCRIPT = """\
import os, sys, time
from pathlib import Path

from workload import create_output, list_inputs, open_input
from workload.errors import WorkloadError

import lib


def publish(path, text):
    # Written beside and renamed into place: the test waits for the file to exist, and must
    # never read it before its content is there.
    Path(path + ".tmp").write_text(text)
    os.replace(path + ".tmp", path)


def wait_for(path):
    while not Path(path).exists():
        time.sleep(0.01)


def read_all(name):
    with open_input(name) as f:
        return f.read()


def write(name, data):
    with create_output(name) as out:
        out.write(data)


def join_and_write():
    adv = read_all("advertiser").decode()
    pub = read_all("publisher").decode()
    rows = lib.join(adv, pub)
    write("joined.csv", "".join(r + "\\n" for r in rows).encode())
    write("insights/summary.txt", f"rows={len(rows)}\\n".encode())


def main(argv):
    mode = argv[1]
    if mode == "first-byte":
        source = open(argv[2], "rb") if len(argv) > 2 else open_input("advertiser")
        with source as f:
            first = f.read(1)
        print(f"first-byte {time.monotonic():.6f} cpu {time.process_time():.6f}", flush=True)
        return 0 if first else 1
    if mode == "touch":
        Path(argv[2]).write_text("the workload ran")
        join_and_write()
        return 0
    if mode == "join":
        join_and_write()
        return 0
    if mode == "env":
        prefixes = ("CLEANROOM_", "TPM2TOOLS_", "TSS2_")
        publish(argv[2], " ".join(sorted(k for k in os.environ if k.startswith(prefixes))))
        join_and_write()
        return 0
    if mode == "pause":
        adv, pub = read_all("advertiser"), read_all("publisher")
        publish(argv[2], str(os.getpid()))
        wait_for(argv[3])
        rows = lib.join(adv.decode(), pub.decode())
        write("joined.csv", "".join(r + "\\n" for r in rows).encode())
        return 0
    if mode == "exit":
        read_all("advertiser")
        return int(argv[2])
    if mode == "hang":
        out = create_output("partial.csv")
        out.write(b"id,segment\\n" * 1000)
        out.flush()
        publish(argv[2], str(os.getpid()))
        time.sleep(600)
        return 0
    if mode == "read":
        try:
            read_all(argv[2])
        except WorkloadError as e:
            print(f"workload: {type(e).__name__}: {e}", file=sys.stderr)
            return 4
        return 0
    if mode == "socket":
        # Publishes the socket's path for a process outside the workload's tree, waits until
        # that process has tried it, then uses the socket itself.
        publish(argv[2], os.environ["CLEANROOM_WORKLOAD_SOCKET"])
        wait_for(argv[3])
        names = sorted(i.name for i in list_inputs())
        print(f"workload served: {','.join(names)} {len(read_all('advertiser'))}", flush=True)
        return 0
    if mode == "reattest":
        read_all("advertiser")
        Path(argv[2]).touch()
        wait_for(argv[3])
        time.sleep(float(argv[6]))
        read_all("publisher")
        print("second read ok", flush=True)
        Path(argv[4]).touch()
        wait_for(argv[5])
        time.sleep(float(argv[6]))
        try:
            read_all("advertiser")
        except WorkloadError as e:
            print(f"workload: {type(e).__name__}: {e}", file=sys.stderr)
            return 5
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
"""


WORKLOAD_LIB = '''\
def join(adv, pub):
    """Joins two CSVs with an id column first."""
    left = dict(line.split(",", 1) for line in adv.splitlines()[1:] if line)
    out = []
    for line in pub.splitlines()[1:]:
        key, _, rest = line.partition(",")
        if key in left:
            out.append(f"{key},{left[key]},{rest}")
    return out
'''


WORKLOAD_FILES = ("run.py", "lib.py")


@dataclass
class CleanRoom:
    """A broker with two parties, their sealed inputs and an approved workload."""

    directory: Path
    broker: BrokerProcess
    party_keys: dict[str, RecipientPrivateKey]
    plaintexts: dict[str, bytes]
    marker: str
    workload_root: Path
    sealed: dict[str, Path] = field(default_factory=dict)
    manifest: common_pb2.WorkloadManifest = field(default_factory=common_pb2.WorkloadManifest)
    approved_launches: set[tuple[str, ...]] = field(default_factory=set)

    def launch(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> Launch:
        """The launch ``sidecar run`` measures for ``command`` in this room's workload root."""
        return Launch.create(
            argv=tuple(command),
            executable_sha256=digest_executable(command[0]),
            env=dict(env or {}),
            cwd=os.path.abspath(self.workload_root),
        )

    def approve_launch(self, command: Sequence[str]) -> None:
        """Both parties approve the workload's files launched with ``command`` (no
        environment), for their keys, once per command."""
        if tuple(command) in self.approved_launches:
            return
        manifest = common_pb2.WorkloadManifest()
        manifest.CopyFrom(self.manifest)
        manifest.launch.CopyFrom(launch_to_pb(self.launch(command)))
        for party in PARTIES:
            with self.client("party", party) as client:
                client.approve_workload(
                    manifest, key_ids=[f"{party}-data"], output_recipients=OUTPUT_RECIPIENTS
                )
        self.approved_launches.add(tuple(command))

    @property
    def pki(self) -> PkiLayout:
        return self.broker.pki

    def client(self, kind: str, name: str = "") -> BrokerClient:
        cert, key = self.pki.cert_and_key(kind, name)
        return BrokerClient.connect(
            target=self.broker.grpc_address, cert_file=cert, key_file=key, ca_file=self.pki.ca_cert
        )

    def write_sidecar_config(
        self,
        path: Path,
        *,
        tcti: str,
        outputs: str,
        state_dir: str = "sidecar-state",
        root: Path | str = "workload",
        inputs: Sequence[tuple[str, str, str]] | None = None,
        grace_seconds: float = 5,
        target: str | None = None,
        retries: int = 5,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        replace_outputs: bool = False,
    ) -> Path:
        """Writes a sidecar.toml in the layout the docs describe; paths may be relative to it."""
        cert, key = self.pki.cert_and_key("sidecar", "sidecar-1")
        if inputs is None:
            inputs = [
                (party, os.path.relpath(self.sealed[party], path.parent), f"{party}-data")
                for party in PARTIES
            ]
        lines = [
            "[tpm]",
            f'tcti = "{tcti}"',
            "[broker]",
            f'target = "{target or self.broker.grpc_address}"',
            f'cert_file = "{cert}"',
            f'key_file = "{key}"',
            f'ca_file = "{self.pki.ca_cert}"',
            'server_name = "localhost"',
            f"retries = {retries}",
            "[workload]",
            'name = "join"',
            f'root = "{root}"',
            f"files = {list(WORKLOAD_FILES)!r}",
        ]
        if command:
            lines.append(f"command = {json.dumps(list(command))}")
        if env:
            lines.append(
                f"env = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in env.items())} }}"
            )
        for name, url, key_id in inputs:
            lines += ["[[inputs]]", f'name = "{name}"', f'url = "{url}"', f'key_id = "{key_id}"']
        lines += [
            "[outputs]",
            f'directory = "{outputs}"',
            *(["replace = true"] if replace_outputs else []),
            "[runtime]",
            f'state_dir = "{state_dir}"',
            f"grace_seconds = {grace_seconds}",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path


def _csv(party: str, marker: str, rows: int) -> bytes:
    header = "id,segment\n" if party == "advertiser" else "id,visits\n"
    body = "".join(
        f"{i},{marker}-{party}-{i}\n" if party == "advertiser" else f"{i},{i % 7}\n"
        for i in range(rows)
    )
    return (header + body).encode()


def broker_config(directory: Path, pki: PkiLayout, **extra: Any) -> Path:
    return write_config(
        directory / "broker.toml", directory, pki, trusted_ek_ca_files=SWTPM_EK_CA_FILES, **extra
    )


def build_clean_room(directory: Path, *, rows: int = 2000, **broker_settings: Any) -> CleanRoom:
    """Starts a broker in ``directory`` and sets up two parties, their sealed inputs and the
    approved workload. The plaintext never touches the disk: it is sealed in memory."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "pki")
    broker = start_broker(broker_config(directory, pki, **broker_settings), pki, directory)
    try:
        marker = "MARKER" + os.urandom(8).hex()
        root = directory / "workload"
        root.mkdir()
        (root / "run.py").write_text(WORKLOAD_SCRIPT)
        (root / "lib.py").write_text(WORKLOAD_LIB)
        room = CleanRoom(
            directory=directory,
            broker=broker,
            party_keys={p: generate_recipient_key() for p in PARTIES},
            plaintexts={p: _csv(p, marker, rows) for p in PARTIES},
            marker=marker,
            workload_root=root,
        )
        with room.client("operator") as operator:
            for party, key in room.party_keys.items():
                public = key.public_key()
                operator.add_party(
                    party,
                    common_pb2.RecipientKey(
                        kem=public.kem,  # type: ignore[arg-type]
                        public_key=public.raw,
                    ),
                )
        manifest = manifest_to_pb(
            "join", manifest_from_files([str(root / f) for f in WORKLOAD_FILES], root=str(root))
        )
        room.manifest = manifest
        _ROOMS[directory] = room
        (directory / "sealed").mkdir()
        for party in PARTIES:
            data_key = new_data_key()
            key_id = f"{party}-data"
            sealed = directory / "sealed" / f"{party}.csv.sealed"
            sealed.write_bytes(seal_bytes(room.plaintexts[party], data_key=data_key, key_id=key_id))
            room.sealed[party] = sealed
            with room.client("party", party) as client:
                client.register_plain_data_key(key_id, data_key)
        return room
    except BaseException:
        broker.stop()
        raise


@contextmanager
def running_clean_room(directory: Path, **settings: Any) -> Iterator[CleanRoom]:
    """:func:`build_clean_room` for the block; the broker is stopped after it and must exit
    cleanly (its stderr is the assertion's message)."""
    room = build_clean_room(directory, **settings)
    try:
        yield room
    finally:
        assert room.broker.stop() == 0, room.broker.stderr()


def sidecar_env(*, pycache: Path | None = None) -> dict[str, str]:
    """The environment for the sidecar (and so the workload).

    With ``pycache``, Python caches bytecode there, as an installed package has it compiled;
    this sandbox sets PYTHONDONTWRITEBYTECODE, which makes every start compile the project's
    modules again (about half of the start-up time).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


#: The clean rooms built in this process, by directory: a sidecar config under a room's
#: directory runs that room's workload, whose launches :func:`start_sidecar` has approved.
_ROOMS: dict[Path, CleanRoom] = {}


def start_sidecar(
    config: Path,
    *command: str,
    cwd: Path,
    verbose: bool = False,
    env: dict[str, str] | None = None,
    approve: bool = True,
) -> subprocess.Popen[str]:
    """Starts ``cleanroom sidecar run --config CONFIG -- COMMAND`` as a user would.

    With ``approve`` (the default), the parties of the room whose directory holds ``config``
    first approve ``COMMAND`` as the launch: every test's command is then an approved one,
    except in the tests of unapproved launches (``approve=False``).
    """
    room = next((_ROOMS[d] for d in config.parents if d in _ROOMS), None)
    if approve and room is not None and command:
        room.approve_launch(command)
    args = [str(CLEANROOM), *(["-v"] if verbose else []), "sidecar", "run", "--config", str(config)]
    return subprocess.Popen(
        [*args, "--", *command],
        cwd=cwd,
        env=sidecar_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_sidecar(
    config: Path,
    *command: str,
    cwd: Path,
    timeout: float = 120,
    approve: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = start_sidecar(config, *command, cwd=cwd, approve=approve, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"sidecar run timed out:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def audit(room: CleanRoom) -> list[tuple[str, str, str, str]]:
    with room.client("operator") as operator:
        records = operator.list_audit_records(limit=1000)
    return [(r.action, r.subject, r.decision, r.reason) for r in records]


def config_for(room: CleanRoom, tpm: Swtpm, rundir: Path, **kwargs: Any) -> Path:
    """A sidecar.toml beside the clean room's files (relative paths), outputs per test."""
    kwargs.setdefault("outputs", f"{rundir.name}/outputs")
    return room.write_sidecar_config(
        room.directory / f"sidecar-{rundir.name}.toml", tcti=tpm.tcti, **kwargs
    )
