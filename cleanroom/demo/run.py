"""The demo's steps, in order, and its summary.

The operator's and the parties' steps call the libraries in this process (the PKI, sealing and
the broker's client), the way their own tools would. The broker, the software TPM and the
sidecar run as child processes, the way a deployment runs them; the :class:`Supervisor` stops
them whatever happens. What the summary reports comes from the clean room itself: the broker's
audit log, PCR 23 read back from the TPM, and the headers of the sealed outputs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Protocol, cast

from cleanroom.demo import DEFAULT_ROWS, DEFAULT_SEED
from cleanroom.demo.errors import (
    DemoError,
    PrerequisiteError,
    ServiceError,
    StepError,
    UnexpectedOutcomeError,
)
from cleanroom.demo.narrate import Narrator, human_bytes, short_hex
from cleanroom.demo.processes import Child, Supervisor, open_file_positions
from cleanroom.demo.workspace import (
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
    from broker.client import BrokerClient
    from cleanroom.v1 import admin_pb2
    from sealing.keys import RecipientPrivateKey, RecipientPublicKey

__all__ = ["DemoOptions", "DemoResult", "main", "run_demo"]

log = logging.getLogger("cleanroom.demo")

#: What each party's sample data holds, for the narration.
_DATA_DESCRIPTION: Final = {
    "advertiser": "ad impressions, clicks and conversions",
    "publisher": "page views and audience segments",
}
#: The file the tamper step changes (a module of the example workload, not the SDK).
TAMPER_TARGET: Final = "workload/example/analysis.py"
_BROKER_START_TIMEOUT: Final = 60.0
#: The sidecar gets this long, plus time proportional to the data, to finish.
_SIDECAR_BASE_TIMEOUT: Final = 300.0
_SIDECAR_SECONDS_PER_ROW: Final = 2e-4
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
    failures: list[str] = field(default_factory=list)
    summary: str = ""


# --- helpers --------------------------------------------------------------------------------


def _foreign_errors() -> tuple[type[BaseException], ...]:
    from broker.errors import BrokerError
    from cleanroom.config import ConfigError
    from cleanroom.devtpm import DevTpmError
    from evidence.errors import EvidenceError
    from pki.errors import PKIError
    from sealing.errors import SealingError
    from sidecar.errors import SidecarError

    return (
        BrokerError,
        ConfigError,
        DevTpmError,
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
    return [sys.executable, "-m", "cleanroom.cli", *args]


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
        from cleanroom import devtpm

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

    def start_broker(self) -> None:
        layout = self.layout
        config = toml_document(
            [
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
        )
        write_text(layout.broker_config, config)
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
            f"SQLite {layout.rel(layout.broker_db)}; local KEK; trusts swtpm's EK CA; "
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
            dst = self.layout.sealed_input(party)
            key_id = self.key_ids[party]
            size = src.stat().st_size
            data_key = new_data_key()
            with (
                _step(party, f"sealing {src.name}"),
                self.narrator.progress(f"[{party}] sealing", size) as bar,
                open(src, "rb") as f_in,
                atomic_output(dst) as f_out,
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
                f"AES-256-GCM data key, id {key_id}: {self.layout.rel(dst)}",
            )
            with _step(party, f"registering data key {key_id}"):
                info = self.client(party).register_plain_data_key(
                    key_id, data_key, description=f"{party} sample data"
                )
            # Python cannot wipe bytes; dropping the only reference is what it can do.
            del data_key
            self.say(
                party,
                f"registered data key {key_id} with the broker (sealed to the broker's "
                f"registration key; stored wrapped by the {info.kek_ref or 'local'} KEK)",
            )

    def approve(self) -> None:
        from broker.admin_cli import expected_pcr23, manifest_from_files, manifest_to_pb
        from evidence.proto import bank_from_pb

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
            manifest = manifest_to_pb(WORKLOAD_NAME, files)
            expected = expected_pcr23(files)
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
                f"approved workload {WORKLOAD_NAME!r} ({len(files)} files measured locally: "
                f"PCR 23 sha256={short_hex(expected['sha256'])}) for key {key_id}; outputs to "
                f"{', '.join(approval.output_recipients)} (approval "
                f"{short_hex(approval.approval_id, 8)})",
            )

    # --- the sidecar ---------------------------------------------------------------------------

    def _write_sidecar_config(self, copy: WorkloadCopy, *, tampered: bool) -> Path:
        layout = self.layout
        config = layout.sidecar_config(tampered=tampered)
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
                {"name": WORKLOAD_NAME, "root": layout.rel(copy.root), "files": copy.files},
            ),
        ]
        for party in PARTIES:
            tables.append(
                (
                    "[[inputs]]",
                    {
                        "name": party,
                        "url": layout.rel(layout.sealed_input(party)),
                        "key_id": self.key_ids[party],
                    },
                )
            )
        tables.append(("outputs", {"directory": layout.rel(layout.outputs(tampered=tampered))}))
        tables.append(("runtime", {"state_dir": layout.rel(layout.sidecar_state)}))
        write_text(config, toml_document(tables))
        return config

    def run_sidecar(self, copy: WorkloadCopy, *, tampered: bool) -> RunOutcome:
        """Runs ``cleanroom sidecar run`` on ``copy`` and reads back what happened."""
        layout = self.layout
        config = self._write_sidecar_config(copy, tampered=tampered)
        layout.outputs(tampered=tampered).mkdir(exist_ok=True)
        operator = self.client("operator")
        with _step("operator", "reading the audit log"):
            before = self._last_sequence(operator)
        command = [sys.executable, "-B", "-E", "-s", str(copy.launcher)]
        log_file = layout.sidecar_log(tampered=tampered)
        started = time.monotonic()
        child = self.sup.start(
            SIDECAR_ID if not tampered else f"{SIDECAR_ID} (tampered)",
            _cli("sidecar", "run", "--config", str(config), "--", *command),
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
        if not self.narrator.err.isatty():
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
        outcome = self.run_sidecar(self.workload, tampered=False)
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
        outputs = sorted(self.layout.outputs().glob("*.sealed"))
        names = ", ".join(p.name.removesuffix(".sealed") for p in outputs)
        self.say(
            "workload",
            f"ran {WORKLOAD_NAME!r} in the clean room ({outcome.seconds:.1f} s with the sidecar); "
            f"its outputs {names or '(none)'} were sealed by the sidecar into "
            f"{self.layout.rel(self.layout.outputs())}/",
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

    def open_outputs(self) -> None:
        from sealing.envelope import OpenReader, atomic_output, read_header
        from sealing.keys import load_private_key

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
                    with (
                        _step(party, f"opening {name}"),
                        self.narrator.progress(f"[{party}] opening {name}", size) as bar,
                        open(path, "rb") as f_in,
                        OpenReader(f_in, private_key=key) as reader,
                        atomic_output(opened_dir / name) as f_out,
                    ):
                        for chunk in reader.chunks():
                            f_out.write(chunk)
                            bar.update(len(chunk))
                    done.append(f"{name} ({human_bytes((opened_dir / name).stat().st_size)})")
            self.say(
                party,
                f"opened {', '.join(done)} with its private key: {self.layout.rel(opened_dir)}/",
            )
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
        for failure in r.failures:
            rows.append(("FAILED", failure))
        rows.append(("files", str(self.layout.root)))
        self.narrator.line()
        r.summary = self.narrator.summary("Summary", rows)
        write_text(self.layout.summary, r.summary)

    def check_prerequisites(self) -> None:
        from cleanroom import devtpm

        try:
            devtpm.check_installed()
        except devtpm.SwtpmNotInstalledError as e:
            raise PrerequisiteError(str(e)) from e

    def run(self) -> DemoResult:
        try:
            self.check_prerequisites()
            self.issue_certificates()
            self.start_tpm()
            self.start_broker()
            self.make_party_keys()
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
    out.line(f"cleanroom demo: {options.rows:,} rows per party, seed {options.seed}")
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
