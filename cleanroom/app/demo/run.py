"""The demo's steps, in order, and its summary.

The operator's and the parties' steps call the libraries in this process (the PKI, sealing and
the broker's client), the way their own tools would. The broker, the software TPM and the
sidecar run as child processes, the way a deployment runs them; the :class:`Supervisor` stops
them whatever happens. What the summary reports comes from the clean room itself: the broker's
audit log, PCR 23 read back from the TPM, and the headers of the sealed outputs.

With ``--azure-emulators`` the Azure backends run locally (:mod:`cleanroom.app.emulators`): Azurite
as one more child process, holding the sealed inputs and outputs in blob containers, and the
Key Vault test double as an HTTPS server in this process, holding each party's RSA KEK. The
advertiser's KEK comes from ``[broker.party_keks]`` in broker.toml, the publisher's is imported
by the operator (``SetPartyKek``), so both ways of choosing a party's KEK are shown.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Final, Protocol, cast

from cleanroom.app.demo import DEFAULT_ROWS, DEFAULT_SEED
from cleanroom.app.demo.errors import (
    DemoError,
    PrerequisiteError,
    ServiceError,
    StepError,
    UnexpectedOutcomeError,
)
from cleanroom.app.demo.narrate import Narrator, human_bytes, short_hex
from cleanroom.app.demo.processes import Child, Supervisor, open_file_positions
from cleanroom.app.demo.workspace import (
    PARTIES,
    SIDECAR_ID,
    TRUST_DOMAIN,
    WORKLOAD_NAME,
    Layout,
    TamperedByte,
    WorkloadCopy,
    choose_directory,
    copy_workload,
    prepare_directory,
    tamper_one_byte,
    toml_document,
    write_text,
)

if TYPE_CHECKING:
    from blobstore.store import BlobStore
    from broker.client import BrokerClient
    from cleanroom.app.emulators.keyvault import FakeKeyVault
    from cleanroom.v1 import admin_pb2
    from evidence.launch import Launch
    from sealing.keys import RecipientPrivateKey, RecipientPublicKey

__all__ = ["DemoOptions", "DemoResult", "main", "run_demo"]

log = logging.getLogger("cleanroom.demo")

#: What each party's sample data holds, for the narration.
_DATA_DESCRIPTION: Final = {
    "advertiser": "ad impressions, clicks and conversions",
    "publisher": "page views and audience segments",
}
#: The example workload's HTML report, which each party opens in a browser.
REPORT_OUTPUT: Final = "report.html"

#: The file the tamper step changes (a module of the example workload, not the SDK).
TAMPER_TARGET: Final = "workload/example/analysis.py"
_BROKER_START_TIMEOUT: Final = 60.0
#: The sidecar gets this long, plus time proportional to the data, to finish.
_SIDECAR_BASE_TIMEOUT: Final = 300.0
_SIDECAR_SECONDS_PER_ROW: Final = 2e-4
_AZURITE_START_TIMEOUT: Final = 30.0
#: The blob container the sidecar writes sealed outputs to (--azure-emulators); each party's
#: inputs go to a container of its own, ``<party>-in``.
OUTPUT_CONTAINER: Final = "cleanroom-out"
_BROKER_READY: Final = re.compile(r"broker listening on (\S+)")
_METRICS_READY: Final = re.compile(r"metrics on (http://\S+)")


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """The command's flags (see ``cleanroom demo --help``)."""

    directory: Path | None = None
    rows: int = DEFAULT_ROWS
    seed: int = DEFAULT_SEED
    tamper: bool = True
    keep_going: bool = False
    verbose: int = 0
    #: Run the Azure backends locally: Azurite for blobs, the Key Vault double for KEKs.
    azure_emulators: bool = False


@dataclass
class RunOutcome:
    """What one sidecar run did, as the broker's audit log and the TPM tell it."""

    exit_code: int
    pcr23: dict[str, bytes]
    attest_decision: str = ""
    attest_reason: str = ""
    attest_sequence: int = 0
    released: list[tuple[str, str]] = field(default_factory=list)  # (key id, owner)
    withheld: list[tuple[str, str]] = field(default_factory=list)  # (key id, reason)
    enrollment: str = ""
    seconds: float = 0.0


@dataclass
class DemoResult:
    """What the demo did, for the summary and for tests."""

    directory: Path
    expected_pcr23: dict[str, bytes] = field(default_factory=dict)
    good: RunOutcome | None = None
    outputs: dict[str, list[str]] = field(default_factory=dict)  # output -> recipients
    headlines: dict[str, str] = field(default_factory=dict)
    tampered: RunOutcome | None = None
    tampered_byte: TamperedByte | None = None
    other_command: RunOutcome | None = None
    failures: list[str] = field(default_factory=list)
    summary: str = ""
    #: key id -> the KEK ref that wrapped it, as the broker reported at registration.
    kek_refs: dict[str, str] = field(default_factory=dict)
    #: Key Vault unwraps the broker made while the good run attested (--azure-emulators).
    key_vault_unwraps: int = 0
    #: party -> its opened copy of the workload's HTML report.
    reports: dict[str, Path] = field(default_factory=dict)


# --- helpers --------------------------------------------------------------------------------


def _foreign_errors() -> tuple[type[BaseException], ...]:
    from broker.errors import BrokerError
    from cleanroom.app.devtpm import DevTpmError
    from cleanroom.app.emulators import EmulatorError
    from cleanroom.config import ConfigError
    from evidence.errors import EvidenceError
    from pki.errors import PKIError
    from sealing.errors import SealingError
    from sidecar.errors import SidecarError

    return (
        BrokerError,
        ConfigError,
        DevTpmError,
        EmulatorError,
        EvidenceError,
        PKIError,
        SealingError,
        SidecarError,
        OSError,
        ValueError,
    )


@contextlib.contextmanager
def _step(actor: str, what: str) -> Iterator[None]:
    """Turns another package's error in a step into a one-line :class:`StepError`."""
    try:
        yield
    except DemoError:
        raise
    except _foreign_errors() as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StepError(f"[{actor}] {what} failed: {detail}") from e


def _child_env() -> dict[str, str]:
    """The children's environment: this one without settings that would override the demo's
    configuration files (the demo runs on its embedded defaults)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLEANROOM_", "TPM2TOOLS_", "TSS2_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(*args: str) -> list[str]:
    """The ``cleanroom`` command in this interpreter."""
    return [sys.executable, "-m", "cleanroom.app.cli", *args]


class _Updatable(Protocol):
    def update(self, n: int, /) -> None: ...


class _CountingWriter:
    """A text stream that counts what passes through it, for a progress bar."""

    def __init__(self, raw: IO[str], progress: _Updatable) -> None:
        self._raw = raw
        self._progress = progress

    def write(self, text: str) -> int:
        self._progress.update(len(text))
        return self._raw.write(text)


def _kem_name(kem: int) -> str:
    from sealing.keys import KEM_NAMES

    return KEM_NAMES.get(kem, f"kem-{kem}")


@dataclass
class AzureBackends:
    """The local Azure stand-ins of ``--azure-emulators``: Azurite (a child process) with one
    container per party for inputs and one for outputs, and the Key Vault double (in this
    process) with one RSA KEK per party."""

    azurite: Child
    port: int
    connection_string: str
    vault: FakeKeyVault
    store: BlobStore

    def input_url(self, party: str) -> str:
        from cleanroom.app.emulators.azurite import AZURITE_ACCOUNT

        return f"azure://{AZURITE_ACCOUNT}/{party}-in/{party}.csv.sealed"

    def output_prefix(self, *, tampered: bool = False, run: str = "") -> str:
        """Where the sidecar writes sealed outputs: a path prefix in the output container."""
        from cleanroom.app.emulators.azurite import AZURITE_ACCOUNT

        return f"azure://{AZURITE_ACCOUNT}/{OUTPUT_CONTAINER}/{_run_name(tampered, run)}"

    def kek_name(self, party: str) -> str:
        return f"{party}-kek"

    def kek_ref(self, party: str) -> str:
        return f"azurekv:{self.vault.key_url(self.kek_name(party))}"

    def unwraps(self) -> int:
        """How many unwraps the Key Vault double has answered so far."""
        return sum(
            1 for r in self.vault.recorded(method="POST", suffix="/unwrapkey") if r.status == 200
        )

    def list_outputs(self, *, tampered: bool = False, run: str = "") -> list[str]:
        """The names (``insights.json.sealed``, ...) of the blobs under the output prefix.

        Raises:
            EmulatorError: Azurite refused or cannot be reached.
        """
        from azure.core.exceptions import AzureError
        from azure.storage.blob import ContainerClient

        from cleanroom.app.emulators import EmulatorError

        prefix = f"{_run_name(tampered, run)}/"
        client = ContainerClient.from_connection_string(self.connection_string, OUTPUT_CONTAINER)
        try:
            return sorted(
                b.name.removeprefix(prefix) for b in client.list_blobs(name_starts_with=prefix)
            )
        except AzureError as e:
            raise EmulatorError(f"cannot list the blob container {OUTPUT_CONTAINER}: {e}") from e
        finally:
            client.close()


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")


def _run_name(tampered: bool, run: str = "") -> str:
    name = run or ("tampered" if tampered else "")
    return f"run-{name}" if name else "run"


#: The other command the demo launches the approved files with: it would print the
#: advertiser's plaintext.
_OTHER_COMMAND_CODE: Final = (
    "import sys, workload; sys.stdout.buffer.write(workload.open_input('advertiser').read())"
)
#: The name of that run's files (``sidecar-other-command.toml``, ``outputs-other-command/``).
OTHER_COMMAND_RUN: Final = "other-command"


def _kek_words(ref: str) -> str:
    """How the summary names a KEK ref: ``Key Vault key <name>``, ``the local KEK``."""
    if ref.startswith("azurekv:"):
        name = ref.rstrip("/").split("/keys/", 1)[-1].split("/")[0]
        return f"Key Vault key {name}"
    return "the local KEK" if ref == "local" else ref


def _kek_phrase(ref: str) -> str:
    """How a step names a KEK ref: the summary's words and, for Key Vault, the ref itself."""
    if ref.startswith("azurekv:"):
        return f"the {_kek_words(ref)} ({ref})"
    return _kek_words(ref)


# --- the demo -------------------------------------------------------------------------------


class Demo:
    """Runs the steps. Construct it inside an open :class:`Supervisor`."""

    def __init__(
        self,
        options: DemoOptions,
        layout: Layout,
        narrator: Narrator,
        supervisor: Supervisor,
    ) -> None:
        self.options = options
        self.layout = layout
        self.say = narrator.say
        self.narrator = narrator
        self.sup = supervisor
        self.result = DemoResult(directory=layout.root)
        self.env = _child_env()
        self.tcti = ""
        self.ek_cas: tuple[Path, ...] = ()
        self.broker_target = ""
        self.clients: dict[str, BrokerClient] = {}
        self.public_keys: dict[str, RecipientPublicKey] = {}
        self.key_ids = {party: f"{party}-data" for party in PARTIES}
        self.workload: WorkloadCopy | None = None
        self.azure: AzureBackends | None = None

    # --- infrastructure ---------------------------------------------------------------------

    def issue_certificates(self) -> None:
        from pki.ca import init_pki

        with _step("operator", "issuing the CA and certificates"):
            pki = init_pki(
                self.layout.pki,
                trust_domain=TRUST_DOMAIN,
                parties=PARTIES,
                sidecars=(SIDECAR_ID,),
                broker_dns=("localhost",),
                broker_ips=("127.0.0.1",),
            )
        names = ", ".join(f"{i.kind}/{i.name}" if i.name else i.kind for i in pki.identities)
        self.say(
            "operator",
            f"issued a CA and {len(pki.identities)} certificates in "
            f"{self.layout.rel(pki.directory)}/ (spiffe://{TRUST_DOMAIN}/: {names})",
        )

    def start_tpm(self) -> None:
        from cleanroom.app import devtpm

        try:
            devtpm.check_installed()
            devtpm.manufacture(self.layout.tpm_state)
            ek_cas = devtpm.ek_ca_files()
        except devtpm.SwtpmNotInstalledError as e:
            raise PrerequisiteError(str(e)) from e
        except devtpm.DevTpmError as e:
            raise ServiceError(f"cannot make the software TPM: {e}") from e
        tpm = devtpm.Swtpm(state_dir=self.layout.tpm_state, log_file=self.layout.logs / "swtpm.log")
        self.sup.defer("swtpm", tpm.stop)
        try:
            tpm.start()
        except devtpm.DevTpmError as e:
            raise ServiceError(f"{e} (see {self.layout.rel(self.layout.logs)}/swtpm.log)") from e
        self.tcti = tpm.tcti
        self.ek_cas = ek_cas
        self.say(
            "operator",
            f"made a software TPM (swtpm: sha1+sha256 PCR banks, EK certificate from swtpm's "
            f"local CA) and started it on 127.0.0.1:{tpm.port} (pid {tpm.pid})",
        )

    def start_azure_emulators(self) -> None:
        """Starts Azurite and the Key Vault double, makes the containers and the parties' KEKs."""
        from blobstore.config import BlobConfig
        from blobstore.store import BlobStore
        from cleanroom.app.emulators import EmulatorNotInstalledError
        from cleanroom.app.emulators.azurite import (
            azurite_command,
            connection_string,
            create_container,
            find_azurite,
            free_port,
            wait_for_port,
        )
        from cleanroom.app.emulators.keyvault import start_fake_key_vault

        layout = self.layout
        try:
            exe = find_azurite()
        except EmulatorNotInstalledError as e:
            raise PrerequisiteError(str(e)) from e
        port = free_port()
        log_file = layout.logs / "azurite.log"
        with _step("operator", "preparing Azurite's data directory"):
            layout.azurite_data.mkdir(exist_ok=True)
        child = self.sup.start(
            "azurite",
            azurite_command(exe, port=port, location=layout.azurite_data),
            log_file=log_file,
            cwd=layout.root,
            env=self.env,
        )
        try:
            wait_for_port(port, timeout=_AZURITE_START_TIMEOUT, alive=child.running)
        except TimeoutError as e:
            raise ServiceError(
                f"Azurite did not start listening: {child.log_tail()} (see {layout.rel(log_file)})"
            ) from e
        connection = connection_string(port)
        containers = [f"{p}-in" for p in PARTIES] + [OUTPUT_CONTAINER]
        with _step("operator", "creating the blob containers"):
            for name in containers:
                create_container(connection, name)
        self.say(
            "operator",
            f"started Azurite, the Azure Storage emulator, on 127.0.0.1:{port} (pid {child.pid}; "
            f"data in {layout.rel(layout.azurite_data)}/) with blob containers "
            f"{', '.join(containers)}",
        )
        with _step("operator", "starting the Key Vault double"):
            vault = start_fake_key_vault(layout.keyvault_dir)
        self.sup.defer("Key Vault double", vault.stop)
        with _step("operator", "creating the parties' Key Vault keys"):
            for party in PARTIES:
                vault.create_key(f"{party}-kek")
        store = BlobStore(config=BlobConfig(connection_string=connection))
        self.sup.defer("blob store", store.close)
        self.azure = AzureBackends(
            azurite=child, port=port, connection_string=connection, vault=vault, store=store
        )
        self.say(
            "operator",
            f"started the local Key Vault double (a test stand-in for Azure Key Vault's REST API, "
            f"HTTPS on {vault.url}) holding an RSA KEK per party: "
            + ", ".join(f"{p}-kek" for p in PARTIES),
        )

    def start_broker(self) -> None:
        layout = self.layout
        tables: list[tuple[str, Mapping[str, str | int | float | bool | Sequence[str]]]] = [
            (
                "broker",
                {
                    "database_url": f"sqlite:///{layout.rel(layout.broker_db)}",
                    "state_dir": layout.rel(layout.broker_dir / "state"),
                    "trust_domain": TRUST_DOMAIN,
                    "trusted_ek_ca_files": [str(p) for p in self.ek_cas],
                    "default_kek": "local",
                },
            ),
            (
                "broker.tls",
                {
                    "listen": "127.0.0.1:0",
                    "cert_file": "pki/broker.crt",
                    "key_file": "pki/broker.key",
                    "ca_file": "pki/ca.crt",
                },
            ),
            ("broker.metrics", {"enabled": True, "listen": "127.0.0.1:0"}),
        ]
        kek = "local KEK"
        if self.azure is not None:
            # The advertiser's KEK is chosen in the configuration; the publisher's is imported
            # by the operator once the broker runs (import_party_kek).
            tables.append(("broker.party_keks", {"advertiser": self.azure.kek_ref("advertiser")}))
            tables.append(("keyvault", self.azure.vault.broker_settings()))
            kek = (
                "the advertiser's KEK is Key Vault key advertiser-kek ([broker.party_keks]), "
                "reached with the double's static token and CA ([keyvault])"
            )
        write_text(layout.broker_config, toml_document(tables))
        # As an operator does: `broker init` creates the database and the KEK once, and
        # `broker serve` refuses to start without them.
        init = subprocess.run(
            _cli("broker", "init", "--config", str(layout.broker_config)),
            cwd=layout.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise DemoError(f"`cleanroom broker init` failed: {init.stderr.strip()}")
        fingerprint = next(
            (
                ln.split("fingerprint ", 1)[1]
                for ln in init.stdout.splitlines()
                if "KEK local" in ln
            ),
            "?",
        )
        self.say(
            "operator",
            f"ran `cleanroom broker init`: database {layout.rel(layout.broker_db)}, local KEK "
            f"{layout.rel(layout.broker_dir / 'state' / 'kek.key')} (fingerprint {fingerprint})",
        )
        log_file = layout.logs / "broker.log"
        child = self.sup.start(
            "broker",
            _cli("broker", "serve", "--config", str(layout.broker_config)),
            log_file=log_file,
            cwd=layout.root,
            env=self.env,
        )
        self.broker_target, metrics = self._wait_for_broker(child)
        self.say(
            "operator",
            f"started the broker on {self.broker_target} (mTLS as spiffe://{TRUST_DOMAIN}/broker; "
            f"SQLite {layout.rel(layout.broker_db)}; {kek}; trusts swtpm's EK CA; "
            f"metrics {metrics or 'off'}; pid {child.pid})",
        )

    def _wait_for_broker(self, child: Child) -> tuple[str, str]:
        deadline = time.monotonic() + _BROKER_START_TIMEOUT
        where = self.layout.rel(child.log_file)
        while True:
            try:
                text = child.log_file.read_text(errors="replace")
            except OSError:
                text = ""
            found = _BROKER_READY.search(text)
            if found:
                metrics = _METRICS_READY.search(text)
                return found.group(1), metrics.group(1) if metrics else ""
            if not child.running():
                raise ServiceError(
                    f"the broker exited {child.proc.returncode} before listening: "
                    f"{child.log_tail()} (see {where})"
                )
            if time.monotonic() > deadline:
                raise ServiceError(f"the broker did not start listening (see {where})")
            time.sleep(0.05)

    def client(self, who: str) -> BrokerClient:
        """A broker client with ``who``'s certificate (operator or a party), kept open."""
        from broker.client import BrokerClient
        from pki.ca import file_stem

        if who not in self.clients:
            stem = file_stem("operator") if who == "operator" else file_stem("party", who)
            with _step(who, "connecting to the broker"):
                self.clients[who] = BrokerClient.connect(
                    target=self.broker_target,
                    cert_file=self.layout.pki / f"{stem}.crt",
                    key_file=self.layout.pki / f"{stem}.key",
                    ca_file=self.layout.pki / "ca.crt",
                    server_name="localhost",
                )
        return self.clients[who]

    def close_clients(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    # --- parties -----------------------------------------------------------------------------

    def make_party_keys(self) -> None:
        from cleanroom.v1 import common_pb2
        from sealing.keys import generate_recipient_key, write_private_key, write_public_key

        for party in PARTIES:
            with _step(party, "making a recipient key pair"):
                with generate_recipient_key() as key:
                    write_private_key(key, self.layout.party_key(party))
                    public = key.public_key()
                write_public_key(public, self.layout.party_pub(party))
            self.public_keys[party] = public
            self.say(
                party,
                f"made its recipient key pair ({_kem_name(public.kem)}, fingerprint "
                f"{public.fingerprint()}): {self.layout.rel(self.layout.party_key(party))}",
            )
        operator = self.client("operator")
        for party in PARTIES:
            public = self.public_keys[party]
            with _step("operator", f"adding party {party}"):
                operator.add_party(
                    party,
                    common_pb2.RecipientKey(
                        kem=common_pb2.KemAlgorithm.ValueType(public.kem), public_key=public.raw
                    ),
                )
        self.say(
            "operator",
            f"added parties {' and '.join(PARTIES)} to the broker with their public keys",
        )

    def import_party_kek(self) -> None:
        """The operator imports the publisher's own Key Vault key as its KEK (SetPartyKek)."""
        assert self.azure is not None
        ref = self.azure.kek_ref("publisher")
        with _step("operator", "importing the publisher's Key Vault key"):
            record = self.client("operator").set_party_kek("publisher", ref)
        self.say(
            "operator",
            f"imported the publisher's own Key Vault key publisher-kek as its KEK (SetPartyKek; "
            f"the broker first wrapped and unwrapped a test key with {record.checked_key})",
        )

    def generate_data(self) -> None:
        from workload.example.sampledata import write_sample_streams

        layout = self.layout
        rows, seed = self.options.rows, self.options.seed
        # About 160 bytes a row for both files together: only the progress bar's scale.
        with (
            _step("demo", "generating sample data"),
            self.narrator.progress("generating sample data", rows * 160) as bar,
            open(layout.party_csv("advertiser"), "w", encoding="utf-8", newline="") as adv,
            open(layout.party_csv("publisher"), "w", encoding="utf-8", newline="") as pub,
        ):
            counts = write_sample_streams(
                cast(IO[str], _CountingWriter(adv, bar)),
                cast(IO[str], _CountingWriter(pub, bar)),
                rows=rows,
                seed=seed,
            )
        for party in PARTIES:
            path = layout.party_csv(party)
            self.say(
                party,
                f"has {_DATA_DESCRIPTION[party]} for {rows:,} hashed user ids "
                f"({human_bytes(path.stat().st_size)}, sample data from seed {seed}; "
                f"{counts.overlap:,} people in common): {layout.rel(path)}",
            )

    def seal_and_register(self) -> None:
        from sealing.envelope import SealWriter, atomic_output, new_data_key

        for party in PARTIES:
            src = self.layout.party_csv(party)
            key_id = self.key_ids[party]
            size = src.stat().st_size
            data_key = new_data_key()
            destination: Callable[[], contextlib.AbstractContextManager[BinaryIO]]
            if self.azure is not None:
                # Sealed as it streams into the party's container: only ciphertext leaves the
                # party, and the blob appears only once complete.
                url = self.azure.input_url(party)
                destination = functools.partial(self.azure.store.open_writer, url, overwrite=True)
                where = f"uploaded to Azure Blob (Azurite): {url}"
            else:
                dst = self.layout.sealed_input(party)
                destination = functools.partial(atomic_output, dst)
                where = self.layout.rel(dst)
            with (
                _step(party, f"sealing {src.name}"),
                self.narrator.progress(f"[{party}] sealing", size) as bar,
                open(src, "rb") as f_in,
                destination() as f_out,
                SealWriter(
                    f_out,
                    data_key=data_key,
                    key_id=key_id,
                    # The party can open its own sealed file; the clean room opens it with the
                    # data key the broker releases.
                    recipients=[self.public_keys[party]],
                ) as writer,
            ):
                while chunk := f_in.read(1 << 20):
                    writer.write(chunk)
                    bar.update(len(chunk))
            self.say(
                party,
                f"sealed {self.options.rows:,} rows ({human_bytes(size)}) with a fresh "
                f"AES-256-GCM data key, id {key_id}: {where}",
            )
            with _step(party, f"registering data key {key_id}"):
                info = self.client(party).register_plain_data_key(
                    key_id, data_key, description=f"{party} sample data"
                )
            # Python cannot wipe bytes; dropping the only reference is what it can do.
            del data_key
            self.result.kek_refs[key_id] = info.kek_ref
            self.say(
                party,
                f"registered data key {key_id} with the broker (sealed to the broker's "
                f"registration key; stored wrapped by {_kek_phrase(info.kek_ref or 'local')})",
            )

    def approve(self) -> None:
        from broker.manifests import manifest_from_files
        from evidence.manifest import expected_pcr23
        from evidence.proto import bank_from_pb, manifest_to_pb

        copy = copy_workload(self.layout.workload(), args=["--seed", str(self.options.seed)])
        self.workload = copy
        self.say(
            "operator",
            f"copied the example workload to {self.layout.rel(copy.root)}/ "
            f"({len(copy.files)} files: the launcher run.py, the workload SDK and the example)",
        )
        with _step("demo", "measuring the workload"):
            files = manifest_from_files(
                [str(copy.root / name) for name in copy.files], root=str(copy.root)
            )
            launch = self.launch(copy)
            manifest = manifest_to_pb(WORKLOAD_NAME, files, launch)
            expected = expected_pcr23(files, launch=launch)
        self.result.expected_pcr23 = expected
        for party in PARTIES:
            key_id = self.key_ids[party]
            with _step(party, "approving the workload"):
                approval = self.client(party).approve_workload(
                    manifest, key_ids=[key_id], output_recipients=list(PARTIES)
                )
            for v in approval.expected_pcrs:
                bank = bank_from_pb(v.bank)
                if bank in expected and bytes(v.value) != expected[bank]:
                    raise UnexpectedOutcomeError(
                        f"[{party}] the broker expects PCR 23 {bank}={v.value.hex()} for "
                        f"approval {approval.approval_id}, but the files give "
                        f"{expected[bank].hex()}"
                    )
            self.say(
                party,
                f"approved workload {WORKLOAD_NAME!r} ({len(files)} files and the launch "
                f"`{launch.command_line()}` with an empty environment, measured locally: "
                f"PCR 23 sha256={short_hex(expected['sha256'])}) for key {key_id}; outputs to "
                f"{', '.join(approval.output_recipients)} (approval "
                f"{short_hex(approval.approval_id, 8)})",
            )

    # --- the sidecar ---------------------------------------------------------------------------

    @staticmethod
    def command(copy: WorkloadCopy) -> list[str]:
        """The approved command: this interpreter, isolated from the environment (``-E -s``)
        and writing no bytecode (``-B``), running the measured launcher."""
        return [sys.executable, "-B", "-E", "-s", str(copy.launcher)]

    def launch(self, copy: WorkloadCopy, command: Sequence[str] | None = None) -> Launch:
        """The launch the sidecar measures for ``command`` (default: the approved one) in the
        copy's directory, with no environment.

        Raises:
            MeasurementError: the interpreter cannot be read.
        """
        from evidence.launch import Launch, digest_executable

        argv = list(command or self.command(copy))
        return Launch.create(
            argv=argv,
            executable_sha256=digest_executable(argv[0]),
            env={},
            cwd=os.path.abspath(copy.root),
        )

    def _write_sidecar_config(
        self,
        copy: WorkloadCopy,
        *,
        tampered: bool,
        run: str = "",
        command: Sequence[str] | None = None,
    ) -> Path:
        layout = self.layout
        config = layout.sidecar_config(tampered=tampered, run=run)
        stem = f"sidecar-{SIDECAR_ID}"
        tables: list[tuple[str, Mapping[str, str | int | Sequence[str]]]] = [
            ("tpm", {"tcti": self.tcti}),
            (
                "broker",
                {
                    "target": self.broker_target,
                    "cert_file": f"pki/{stem}.crt",
                    "key_file": f"pki/{stem}.key",
                    "ca_file": "pki/ca.crt",
                    "server_name": "localhost",
                    "retries": 5,
                },
            ),
            (
                "workload",
                {
                    "name": WORKLOAD_NAME,
                    "root": layout.rel(copy.root),
                    "files": copy.files,
                    "command": list(command or self.command(copy)),
                },
            ),
        ]
        azure = self.azure
        for party in PARTIES:
            tables.append(
                (
                    "[[inputs]]",
                    {
                        "name": party,
                        "url": azure.input_url(party)
                        if azure is not None
                        else layout.rel(layout.sealed_input(party)),
                        "key_id": self.key_ids[party],
                    },
                )
            )
        outputs = (
            azure.output_prefix(tampered=tampered, run=run)
            if azure is not None
            else layout.rel(layout.outputs(tampered=tampered, run=run))
        )
        tables.append(("outputs", {"directory": outputs}))
        tables.append(("runtime", {"state_dir": layout.rel(layout.sidecar_state)}))
        if azure is not None:
            # Azurite's development account key is public (Microsoft documents it); with a
            # real account the sidecar would use its managed identity instead.
            tables.append(("blob", {"connection_string": azure.connection_string}))
        write_text(config, toml_document(tables))
        return config

    def run_sidecar(
        self,
        copy: WorkloadCopy,
        *,
        tampered: bool,
        run: str = "",
        command: Sequence[str] | None = None,
    ) -> RunOutcome:
        """Runs ``cleanroom sidecar run`` on ``copy`` (with ``[workload] command`` set to
        ``command``, default the approved one) and reads back what happened."""
        layout = self.layout
        config = self._write_sidecar_config(copy, tampered=tampered, run=run, command=command)
        layout.outputs(tampered=tampered, run=run).mkdir(exist_ok=True)
        operator = self.client("operator")
        with _step("operator", "reading the audit log"):
            before = self._last_sequence(operator)
        log_file = layout.sidecar_log(tampered=tampered, run=run)
        started = time.monotonic()
        name = run or ("tampered" if tampered else "")
        child = self.sup.start(
            f"{SIDECAR_ID} ({name})" if name else SIDECAR_ID,
            _cli("sidecar", "run", "--config", str(config)),
            log_file=log_file,
            cwd=layout.root,
            env=self.env,
        )
        timeout = _SIDECAR_BASE_TIMEOUT + _SIDECAR_SECONDS_PER_ROW * self.options.rows
        try:
            code = self._wait_showing_inputs(child, timeout)
        except subprocess.TimeoutExpired as e:
            self.sup.stop(child)
            raise ServiceError(
                f"the sidecar did not finish within {timeout:.0f} s (see {layout.rel(log_file)})"
            ) from e
        outcome = RunOutcome(exit_code=code, pcr23=self._read_pcr23())
        outcome.seconds = time.monotonic() - started
        with _step("operator", "reading the audit log"):
            self._read_audit(operator, before, outcome)
        return outcome

    def _wait_showing_inputs(self, child: Child, timeout: float) -> int:
        """Waits for the sidecar; on a terminal, shows how far it has streamed the sealed
        inputs to the workload (read from the positions of its open input files in /proc).

        Raises:
            subprocess.TimeoutExpired: the sidecar ran longer than ``timeout``.
        """
        if not self.narrator.err.isatty() or self.azure is not None:
            # The progress comes from the positions of open input files, which blob inputs
            # are not.
            return child.proc.wait(timeout=timeout)
        inputs = {str(self.layout.sealed_input(p).resolve()) for p in PARTIES}
        total = sum(os.stat(p).st_size for p in inputs)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        with self.narrator.progress(f"[{SIDECAR_ID}] streaming inputs", total) as bar:
            while True:
                try:
                    code = child.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise
                else:
                    if code == 0:
                        # A run that succeeded read its inputs to the end; the last reads may
                        # have come and gone between two looks.
                        bar.update(total - sum(seen.values()))
                    return code
                before = sum(seen.values())
                for path, pos in open_file_positions(child.pid, inputs).items():
                    seen[path] = max(seen.get(path, 0), pos)
                bar.update(sum(seen.values()) - before)

    def _read_pcr23(self) -> dict[str, bytes]:
        """PCR 23 as the TPM holds it now (the sidecar has exited, so the TPM is free)."""
        from sidecar.config import TpmConfig
        from sidecar.errors import SidecarError
        from sidecar.tpm.device import Tpm

        try:
            with Tpm(TpmConfig(tcti=self.tcti)) as tpm:
                values = tpm.read_pcrs({"sha1": [23], "sha256": [23]})
        except SidecarError as e:
            log.warning("cannot read PCR 23 back from the TPM: %s", e)
            return {}
        return {bank: value for (index, bank), value in values.items() if index == 23}

    @staticmethod
    def _last_sequence(client: BrokerClient) -> int:
        last = 0
        for record in _audit_records(client, after=0):
            last = max(last, record.sequence)
        return last

    def _read_audit(self, client: BrokerClient, after: int, outcome: RunOutcome) -> None:
        for r in _audit_records(client, after=after):
            if not r.actor.endswith(f"/sidecar/{SIDECAR_ID}"):
                continue
            if r.action == "attest":
                outcome.attest_decision = r.decision
                outcome.attest_reason = r.reason
                outcome.attest_sequence = r.sequence
            elif r.action == "key.release":
                owner = r.parties[0] if r.parties else "?"
                if r.decision == "allow":
                    outcome.released.append((r.subject, owner))
                else:
                    outcome.withheld.append((r.subject, r.reason))
            elif r.action == "ak.activate" and r.decision == "allow":
                outcome.enrollment = r.reason

    def good_run(self) -> None:
        assert self.workload is not None
        unwraps_before = self.azure.unwraps() if self.azure is not None else 0
        outcome = self.run_sidecar(self.workload, tampered=False)
        if self.azure is not None:
            self.result.key_vault_unwraps = self.azure.unwraps() - unwraps_before
        self.result.good = outcome
        pcr = outcome.pcr23.get("sha256", b"")
        where = self.layout.rel(self.layout.sidecar_log())
        if outcome.enrollment:
            self.say(
                SIDECAR_ID,
                f"enrolled its AK with the broker by credential activation under the TPM's EK "
                f"({outcome.enrollment})",
            )
        released = ", ".join(k for k, _ in outcome.released) or "none"
        decision = {"allow": "allowed", "deny": "denied"}.get(
            outcome.attest_decision, "no decision recorded"
        )
        self.say(
            SIDECAR_ID,
            f"measured {len(self.workload.files)} files into PCR 23 "
            f"(sha256={short_hex(pcr) if pcr else '?'}) and attested with a quote over the "
            f"broker's nonce: {decision}, {len(outcome.released)} keys released ({released})",
        )
        if outcome.exit_code != 0:
            raise ServiceError(
                f"the sidecar exited {outcome.exit_code}: "
                f"{self._log_tail(self.layout.sidecar_log())} (see {where})"
            )
        if outcome.attest_decision != "allow" or len(outcome.released) != len(PARTIES):
            raise UnexpectedOutcomeError(
                f"the approved workload was not given both keys: {outcome.attest_reason or '-'}"
            )
        if self.azure is not None:
            self.say(
                "broker",
                f"unwrapped both data keys through Key Vault to release them "
                f"({self.result.key_vault_unwraps} unwrap calls to the Key Vault double)",
            )
            self.say(
                SIDECAR_ID,
                "streamed the sealed inputs from Azure Blob (Azurite): "
                + ", ".join(self.azure.input_url(p) for p in PARTIES),
            )
            with _step("demo", "listing the sealed outputs in Azure Blob"):
                outputs = self.azure.list_outputs()
            where = f"Azure Blob (Azurite): {self.azure.output_prefix()}/"
        else:
            outputs = sorted(p.name for p in self.layout.outputs().glob("*.sealed"))
            where = f"{self.layout.rel(self.layout.outputs())}/"
        names = ", ".join(name.removesuffix(".sealed") for name in outputs)
        self.say(
            "workload",
            f"ran {WORKLOAD_NAME!r} in the clean room ({outcome.seconds:.1f} s with the sidecar); "
            f"its outputs {names or '(none)'} were sealed by the sidecar into {where}",
        )
        if not outputs:
            raise UnexpectedOutcomeError(f"the workload wrote no outputs (see {where})")

    @staticmethod
    def _log_tail(path: Path) -> str:
        try:
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
        except OSError:
            return "(no log)"
        kept = [ln for ln in lines if ln]
        return kept[-1] if kept else "(empty log)"

    def download_outputs(self) -> None:
        """Copies the sealed outputs from the output container to ``outputs/`` (ciphertext, for
        inspection after the demo, when Azurite is gone)."""
        from sealing.envelope import atomic_output

        assert self.azure is not None
        names = self.azure.list_outputs()
        for name in names:
            url = f"{self.azure.output_prefix()}/{name}"
            with (
                _step("demo", f"downloading {url}"),
                self.azure.store.open_reader(url) as f_in,
                atomic_output(self.layout.outputs() / name) as f_out,
            ):
                while chunk := f_in.read(1 << 20):
                    f_out.write(chunk)
        self.say(
            "demo",
            f"downloaded the sealed outputs {', '.join(names)} from Azure Blob to "
            f"{self.layout.rel(self.layout.outputs())}/ (ciphertext, kept for inspection)",
        )

    def open_outputs(self) -> None:
        from sealing.envelope import OpenReader, atomic_output, read_header
        from sealing.keys import load_private_key

        if self.azure is not None:
            self.download_outputs()
        outputs = sorted(self.layout.outputs().glob("*.sealed"))
        by_fingerprint = {k.fingerprint(): p for p, k in self.public_keys.items()}
        for path in outputs:
            name = path.name.removesuffix(".sealed")
            with _step("demo", f"reading the header of {path.name}"), open(path, "rb") as f:
                header = read_header(f)
            self.result.outputs[name] = [
                by_fingerprint.get(fp, f"unknown key {fp}") for fp in header.recipient_fingerprints
            ]
        for party in PARTIES:
            opened_dir = self.layout.opened(party)
            opened_dir.mkdir(parents=True, exist_ok=True)
            done: list[str] = []
            with _step(party, "loading its private key"):
                key: RecipientPrivateKey = load_private_key(self.layout.party_key(party))
            with key:
                for path in outputs:
                    name = path.name.removesuffix(".sealed")
                    size = path.stat().st_size
                    # With blobs each party streams its download straight into opening it.
                    source: Callable[[], contextlib.AbstractContextManager[BinaryIO]]
                    if self.azure is not None:
                        url = f"{self.azure.output_prefix()}/{path.name}"
                        source = functools.partial(self.azure.store.open_reader, url)
                    else:
                        source = functools.partial(_open_binary, path)
                    with (
                        _step(party, f"opening {name}"),
                        self.narrator.progress(f"[{party}] opening {name}", size) as bar,
                        source() as f_in,
                        OpenReader(f_in, private_key=key) as reader,
                        atomic_output(opened_dir / name) as f_out,
                    ):
                        for chunk in reader.chunks():
                            f_out.write(chunk)
                            bar.update(len(chunk))
                    done.append(f"{name} ({human_bytes((opened_dir / name).stat().st_size)})")
            did = (
                f"downloaded {', '.join(done)} from Azure Blob and opened them"
                if self.azure is not None
                else f"opened {', '.join(done)}"
            )
            self.say(party, f"{did} with its private key: {self.layout.rel(opened_dir)}/")
            report = opened_dir / REPORT_OUTPUT
            if report.is_file():
                self.result.reports[party] = report
                self.say(party, f"its visual report, to open in a browser: {report}")
        first = self.layout.opened(PARTIES[0])
        for path in sorted(first.iterdir()):
            self.result.headlines[path.name] = _headline(path)

    def tamper_run(self) -> None:
        assert self.workload is not None
        byte, copy = tamper_one_byte(
            self.workload, self.layout.workload(tampered=True), target=TAMPER_TARGET
        )
        self.result.tampered_byte = byte
        self.say(
            "intruder",
            f"changed one byte of {self.layout.rel(copy.root)}/{byte.file} (offset "
            f"{byte.offset}: {byte.before!r} -> {byte.after!r}; the code still runs the same)",
        )
        outcome = self.run_sidecar(copy, tampered=True)
        self.result.tampered = outcome
        pcr = outcome.pcr23.get("sha256", b"")
        leaked = [k for k, _ in outcome.released]
        wrote = sorted(p.name for p in self.layout.outputs(tampered=True).iterdir())
        if self.azure is not None:
            with _step("demo", "listing the tampered run's outputs in Azure Blob"):
                wrote += self.azure.list_outputs(tampered=True)
        if leaked:
            raise UnexpectedOutcomeError(
                f"the broker released {', '.join(leaked)} to the tampered workload"
            )
        if outcome.exit_code == 0 or wrote:
            raise UnexpectedOutcomeError(
                f"the tampered workload ran (exit {outcome.exit_code}, outputs: "
                f"{', '.join(wrote) or 'none'}) although no key was released"
            )
        if outcome.attest_decision != "deny":
            raise UnexpectedOutcomeError(
                "the broker recorded no denial for the tampered workload "
                f"(see {self.layout.rel(self.layout.sidecar_log(tampered=True))})"
            )
        self.say(
            SIDECAR_ID,
            f"measured the tampered files into PCR 23 (sha256={short_hex(pcr) if pcr else '?'}) "
            f"and attested: denied, no key released, so the workload never started "
            f"(sidecar exit {outcome.exit_code})",
        )
        self.say(
            "broker",
            f"recorded why in audit record #{outcome.attest_sequence} (attest, deny): "
            f"{outcome.attest_reason}",
        )

    def other_command_run(self) -> None:
        """The approved files, untouched, launched with another command: refused too."""
        assert self.workload is not None
        copy = self.workload
        command = [sys.executable, "-B", "-E", "-s", "-c", _OTHER_COMMAND_CODE]
        self.say(
            "intruder",
            f"launched the approved files with another command, which would print the "
            f"advertiser's plaintext: {shlex.join(command)}",
        )
        outcome = self.run_sidecar(copy, tampered=False, run=OTHER_COMMAND_RUN, command=command)
        self.result.other_command = outcome
        leaked = [k for k, _ in outcome.released]
        wrote = sorted(p.name for p in self.layout.outputs(run=OTHER_COMMAND_RUN).iterdir())
        if leaked:
            raise UnexpectedOutcomeError(
                f"the broker released {', '.join(leaked)} to another command"
            )
        if outcome.exit_code == 0 or wrote:
            raise UnexpectedOutcomeError(
                f"the other command ran (exit {outcome.exit_code}, outputs: "
                f"{', '.join(wrote) or 'none'}) although no key was released"
            )
        if outcome.attest_decision != "deny" or not outcome.withheld:
            raise UnexpectedOutcomeError(
                "the broker recorded no denial for the other command "
                f"(see {self.layout.rel(self.layout.sidecar_log(run=OTHER_COMMAND_RUN))})"
            )
        pcr = outcome.pcr23.get("sha256", b"")
        self.say(
            SIDECAR_ID,
            f"measured the same files and the other launch into PCR 23 "
            f"(sha256={short_hex(pcr) if pcr else '?'}) and attested: denied, no key released, "
            f"so the command never started (sidecar exit {outcome.exit_code})",
        )
        key_id, reason = outcome.withheld[0]
        self.say("broker", f"recorded why {key_id} was withheld: {reason}")

    # --- summary ---------------------------------------------------------------------------

    def summarize(self) -> None:
        r = self.result
        rows: list[tuple[str, str]] = []
        good = r.good
        if good is not None:
            verdict = (
                "allowed: quote signature, nonce binding, event log and PCR 23 checked; the "
                "measured workload is the one both parties approved"
                if good.attest_decision == "allow"
                else f"{good.attest_decision or 'none'}: {good.attest_reason}"
            )
            rows.append(("attestation", verdict))
            pcr = good.pcr23.get("sha256")
            expected = r.expected_pcr23.get("sha256")
            if pcr is not None:
                agree = "the approved value" if pcr == expected else "NOT the approved value"
                rows.append(("PCR 23", f"sha256={pcr.hex()} ({agree}, read back from the TPM)"))
            released = ", ".join(f"{k} (of {o})" for k, o in good.released) or "none"
            rows.append(("keys released", released))
        for name, recipients in r.outputs.items():
            headline = r.headlines.get(name)
            rows.append(
                (
                    f"output {name}",
                    f"sealed to {', '.join(recipients)}" + (f": {headline}" if headline else ""),
                )
            )
        for party, report in r.reports.items():
            rows.append((f"{party}'s report", str(report)))
        if r.tampered is not None and r.tampered_byte is not None:
            t = r.tampered
            pcr = t.pcr23.get("sha256")
            rows.append(
                (
                    "tampered run",
                    f"{'denied' if t.attest_decision == 'deny' else t.attest_decision}, "
                    f"{len(t.released)} keys released, no outputs ({r.tampered_byte.file} byte "
                    f"{r.tampered_byte.offset} changed; PCR 23 sha256="
                    f"{short_hex(pcr) if pcr else '?'})",
                )
            )
            where = f"{self.layout.rel(self.layout.broker_db)} (table audit_records)"
            line = _line_number(self.layout.logs / "broker.log", "attestation denied")
            if line:
                where += f" and {self.layout.rel(self.layout.logs)}/broker.log line {line}"
            rows.append(("why, per the audit log", f"record #{t.attest_sequence} in {where}"))
            rows.append(("", t.attest_reason))
        o = r.other_command
        if o is not None:
            rows.append(
                (
                    "another command",
                    f"{'denied' if o.attest_decision == 'deny' else o.attest_decision}, "
                    f"{len(o.released)} keys released, no outputs (the approved files, launched "
                    "with python -c ...)",
                )
            )
            if o.withheld:
                rows.append(("", o.withheld[0][1]))
        if self.azure is not None:
            azure = self.azure
            rows.append(
                (
                    "blob storage",
                    f"Azure Blob via Azurite (the storage emulator, 127.0.0.1:{azure.port}): "
                    f"sealed inputs in {', '.join(f'{p}-in' for p in PARTIES)}, sealed outputs "
                    f"in {OUTPUT_CONTAINER}/{_run_name(False)}/",
                )
            )
            wrapped = ", ".join(
                f"{key_id} by {_kek_words(ref)}" for key_id, ref in sorted(r.kek_refs.items())
            )
            rows.append(
                (
                    "key custody",
                    f"Azure Key Vault via the local test double ({azure.vault.url}): "
                    f"{wrapped or 'no keys registered'}; "
                    f"{r.key_vault_unwraps} Key Vault unwraps to release them",
                )
            )
        for failure in r.failures:
            rows.append(("FAILED", failure))
        rows.append(("files", str(self.layout.root)))
        self.narrator.line()
        r.summary = self.narrator.summary("Summary", rows)
        write_text(self.layout.summary, r.summary)

    def check_prerequisites(self) -> None:
        from cleanroom.app import devtpm

        try:
            devtpm.check_installed()
        except devtpm.SwtpmNotInstalledError as e:
            raise PrerequisiteError(str(e)) from e
        if self.options.azure_emulators:
            from cleanroom.app.emulators import EmulatorNotInstalledError
            from cleanroom.app.emulators.azurite import find_azurite

            try:
                find_azurite()
            except EmulatorNotInstalledError as e:
                raise PrerequisiteError(str(e)) from e

    def run(self) -> DemoResult:
        try:
            self.check_prerequisites()
            self.issue_certificates()
            if self.options.azure_emulators:
                self.start_azure_emulators()
            self.start_tpm()
            self.start_broker()
            self.make_party_keys()
            if self.azure is not None:
                self.import_party_kek()
            self.generate_data()
            self.seal_and_register()
            self.approve()
            try:
                self.good_run()
                self.open_outputs()
            except DemoError as e:
                if not (self.options.keep_going and self.options.tamper):
                    raise
                self.result.failures.append(str(e))
                self.say("demo", f"failed: {e}; going on with the tamper check (--keep-going)")
            if self.options.tamper:
                self.tamper_run()
                self.other_command_run()
            self.summarize()
        finally:
            self.close_clients()
        return self.result


def _audit_records(client: BrokerClient, *, after: int) -> Iterator[admin_pb2.AuditRecord]:
    while True:
        page = client.list_audit_records(after_sequence=after)
        if not page:
            return
        yield from page
        after = max(r.sequence for r in page)


def _line_number(path: Path, needle: str) -> int:
    """The number of the last line of ``path`` holding ``needle`` (0: none)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    found = [n for n, text in enumerate(lines, 1) if needle in text]
    return found[-1] if found else 0


def _headline(path: Path) -> str:
    """One line about an opened output: what a party would look at first."""
    try:
        if path.suffix == ".json":
            return _insights_headline(json.loads(path.read_text(encoding="utf-8")))
        if path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                count = sum(1 for _ in reader)
            return f"{count:,} synthetic rows, columns {', '.join(header)}"
        if path.suffix == ".html":
            return (
                f"HTML report ({human_bytes(path.stat().st_size)}, charts inline): conversion "
                "by segment, ROC curve, synthetic vs real marginals"
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable: {e}"
    return human_bytes(path.stat().st_size)


def _insights_headline(doc: Mapping[str, object]) -> str:
    parts: list[str] = []
    join = doc.get("join")
    if isinstance(join, Mapping) and isinstance(join.get("overlap"), int):
        parts.append(f"{join['overlap']:,} people in common")
    evaluation = doc.get("evaluation")
    if isinstance(evaluation, Mapping) and isinstance(evaluation.get("test_auc"), float):
        parts.append(f"conversion model test AUC {evaluation['test_auc']:.2f}")
    rates = doc.get("conversion_rates")
    cells = rates.get("by_segment") if isinstance(rates, Mapping) else None
    if isinstance(cells, list):
        shown = [
            c
            for c in cells
            if isinstance(c, Mapping) and isinstance(c.get("conversion_rate"), float)
        ]
        if shown:
            top = max(shown, key=lambda c: float(c["conversion_rate"]))
            parts.append(
                f"best segment {top.get('segment', '?')} converts at {top['conversion_rate']:.1%}"
            )
    return "; ".join(parts) or f"{len(doc)} top-level fields"


# --- entry point ------------------------------------------------------------------------------


def run_demo(options: DemoOptions, *, narrator: Narrator | None = None) -> DemoResult:
    """Runs the demo in a fresh (or replaced) directory and returns what it did.

    Every child process is stopped before this returns or raises.

    Raises:
        DemoError: a step failed (a subclass says which kind).
        KeyboardInterrupt: Ctrl-C, SIGTERM or SIGHUP (after cleanup).
    """
    layout, replaced = prepare_directory(choose_directory(options.directory))
    return _run_in(layout, replaced, options, narrator or Narrator())


def _run_in(layout: Layout, replaced: bool, options: DemoOptions, out: Narrator) -> DemoResult:
    how = "replacing an earlier demo" if replaced else "new directory"
    backends = (
        "; Azure backends on local emulators (Azurite, Key Vault double)"
        if options.azure_emulators
        else ""
    )
    out.line(f"cleanroom demo: {options.rows:,} rows per party, seed {options.seed}{backends}")
    out.line(f"cleanroom demo: files go to {layout.root} ({how})")
    with Supervisor() as sup:
        return Demo(options, layout, out, sup).run()


def main(options: DemoOptions) -> int:
    """The command: runs the demo, prints the outcome and where the files are; returns the
    exit status (0 success, 1 failure, 130 interrupted)."""
    narrator = Narrator()
    started = time.monotonic()
    try:
        layout, replaced = prepare_directory(choose_directory(options.directory))
    except DemoError as e:
        print(f"cleanroom: error: {e}", file=sys.stderr)
        return 1
    try:
        result = _run_in(layout, replaced, options, narrator)
    except KeyboardInterrupt:
        print("cleanroom demo: interrupted; every process it started is stopped", file=sys.stderr)
        _print_where(layout.root)
        return 130
    except DemoError as e:
        print(f"cleanroom: error: {e}", file=sys.stderr)
        if options.verbose:
            log.exception("details")
        _print_where(layout.root)
        return 1
    elapsed = time.monotonic() - started
    if result.failures:
        narrator.line(f"cleanroom demo: FAILED after {elapsed:.1f} s; files left in {layout.root}")
        return 1
    narrator.line(f"cleanroom demo: done in {elapsed:.1f} s; files left in {layout.root}")
    return 0


def _print_where(directory: Path) -> None:
    if directory.exists():
        print(f"cleanroom demo: files left in {directory}", file=sys.stderr)
