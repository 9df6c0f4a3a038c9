"""The broker's configuration: named security limits with safe defaults.

Loaded from the ``[broker]`` table of a TOML file, then from ``CLEANROOM_BROKER_<SETTING>``
environment variables (``CLEANROOM_BROKER_TLS_LISTEN`` for the nested ``tls.listen``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from broker.errors import BrokerConfigError
from cleanroom.config import ConfigError, load_config
from evidence.pcr import BANK_SIZES
from pki.errors import IdentityError
from pki.identity import validate_name

ENV_PREFIX = "CLEANROOM_BROKER"


@dataclass(frozen=True)
class TlsConfig:
    """The mTLS listener. Client certificates are required and checked against ``ca_file``,
    and against the revocation lists ``crl_files`` when any are named."""

    listen: str = "127.0.0.1:50051"
    cert_file: str = "pki/broker.crt"
    key_file: str = "pki/broker.key"
    ca_file: str = "pki/ca.crt"
    #: CRL files (PEM or DER), each signed by a CA of ``ca_file``; re-read when they change.
    #: Empty: no revocation checking.
    crl_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics over plain HTTP, on localhost unless changed on purpose."""

    enabled: bool = True
    listen: str = "127.0.0.1:9464"


#: TCB components a minimum can name (``[broker.azure_snp.min_tcb]``).
SNP_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True)
class AzureSnpConfig:
    """The AMD SEV-SNP hardware root behind an Azure confidential VM's vTPM
    (``[broker.azure_snp]``). Evidence a sidecar sends is always verified; these settings say
    whether it is required and what it must show."""

    #: Every attestation must carry a verified, fresh HCL report binding its AK.
    required: bool = False
    #: Accepted launch measurements (hex, 48 bytes each). Empty: any measurement.
    allowed_measurements: tuple[str, ...] = ()
    #: Minimum REPORTED_TCB per component (bootloader, tee, snp, microcode, fmc).
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    #: Accept guests whose SNP policy allows debugging. Never in production.
    allow_debug: bool = False
    #: Highest VMPL the SNP report may come from (Azure's paravisor reports at VMPL 0).
    max_vmpl: int = 0
    #: Runtime-claims ``vm-configuration`` values that must hold, e.g. ``secure-boot``.
    require_vm_configuration: Mapping[str, bool] = field(
        default_factory=lambda: {"secure-boot": True}
    )
    #: PEM files of extra trusted AMD roots (ARK with its ASK/ASVK), besides the pinned
    #: Milan, Genoa and Turin roots.
    trusted_root_files: tuple[str, ...] = ()
    #: Let a sidecar enroll an EK without a trusted certificate when a verified HCL report
    #: names that EK and the AK (credential activation still proves the AK).
    enroll: bool = False

    def __post_init__(self) -> None:
        for m in self.allowed_measurements:
            try:
                ok = len(bytes.fromhex(m)) == 48
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"azure_snp.allowed_measurements: {m!r} is not 48 bytes of hex")
        for name, floor in self.min_tcb.items():
            if name not in SNP_TCB_COMPONENTS:
                raise ConfigError(
                    f"azure_snp.min_tcb: unknown component {name!r} "
                    f"({', '.join(SNP_TCB_COMPONENTS)})"
                )
            if not isinstance(floor, int) or not 0 <= floor <= 255:
                raise ConfigError(f"azure_snp.min_tcb.{name} must be an integer 0..255")
        if not 0 <= self.max_vmpl <= 3:
            raise ConfigError("azure_snp.max_vmpl must be 0..3")
        object.__setattr__(self, "min_tcb", dict(self.min_tcb))
        object.__setattr__(self, "require_vm_configuration", dict(self.require_vm_configuration))


@dataclass(frozen=True)
class BrokerConfig:
    """Every setting of the broker. Security limits are named here with safe defaults."""

    #: SQLAlchemy URL: ``sqlite:///broker.db`` (default, WAL) or ``postgresql+psycopg://...``.
    database_url: str = "sqlite:///broker.db"
    #: Where the local KEK and the registration key live (files created with 0600).
    state_dir: str = "broker-state"
    #: The SPIFFE trust domain of callers' identities.
    trust_domain: str = "cleanroom.local"

    #: A nonce is single use and expires after this many seconds.
    nonce_ttl_seconds: float = 60.0
    #: An outstanding credential-activation challenge expires after this many seconds.
    credential_ttl_seconds: float = 300.0
    #: A sidecar must attest again after this many seconds to keep serving data.
    attestation_lifetime_seconds: float = 3600.0
    #: Largest event log accepted (entries).
    max_event_log_entries: int = 1024
    #: Largest gRPC message accepted or sent, in bytes.
    max_message_bytes: int = 1 << 20
    #: Challenges a single AK may ask for per second (token bucket, burst of 10x).
    challenge_rate_per_ak: float = 20.0
    #: Challenges a single peer identity may ask for per second.
    challenge_rate_per_peer: float = 50.0
    #: Upper bound on the time the broker spends on one call, in seconds.
    deadline_budget_seconds: float = 10.0

    #: PCR banks the quote must cover (PCR 23 in each). sha1 alone is never enough.
    required_banks: tuple[str, ...] = ("sha256",)
    #: Boot PCRs that every quote must also cover (for golden sets over a locked-down image).
    boot_pcrs: tuple[int, ...] = ()
    #: Accepted AK sizes and curves.
    accepted_rsa_bits: tuple[int, ...] = (2048, 3072)
    accepted_ecc_curves: tuple[str, ...] = ("P-256", "P-384")

    #: PEM files of CAs that sign EK certificates (TPM vendors', or swtpm's local CA in tests).
    trusted_ek_ca_files: tuple[str, ...] = ()
    #: Let sidecars enroll an EK that has no certificate. Off by default: an operator must
    #: enroll such an EK explicitly.
    allow_ek_without_certificate: bool = False
    #: The KEK that wraps newly registered data keys ("local" or an Azure Key Vault ref).
    default_kek: str = "local"
    #: Party name -> the KEK that wraps that party's newly registered data keys, so each party
    #: can keep its KEK in its own vault (``[broker.party_keks]``). A KEK the operator imported
    #: for a party (``cleanroom admin kek import``) takes precedence; parties not named here use
    #: ``default_kek``.
    party_keks: Mapping[str, str] = field(default_factory=dict)

    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    azure_snp: AzureSnpConfig = field(default_factory=AzureSnpConfig)

    def __post_init__(self) -> None:
        for bank in self.required_banks:
            if bank not in BANK_SIZES:
                raise ConfigError(f"required_banks: unknown bank {bank!r}")
        # sha1 alone is never enough, however often it is listed: SHA-1 collisions are
        # practical, so some bank the quote covers must be stronger.
        if not any(bank != "sha1" for bank in self.required_banks):
            raise ConfigError(
                "required_banks must include a bank stronger than sha1 "
                f"({', '.join(b for b in BANK_SIZES if b != 'sha1')})"
            )
        repeated = sorted({b for b in self.required_banks if self.required_banks.count(b) > 1})
        if repeated:
            raise ConfigError(f"required_banks lists {', '.join(repeated)} more than once")
        for name in ("nonce_ttl_seconds", "credential_ttl_seconds", "attestation_lifetime_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_event_log_entries < 1 or self.max_message_bytes < 1024:
            raise ConfigError("max_event_log_entries and max_message_bytes are too small")
        for pcr in self.boot_pcrs:
            if not 0 <= pcr < 23:
                raise ConfigError(f"boot_pcrs: {pcr} is not a boot PCR (0..22)")
        if not self.default_kek.strip():
            raise ConfigError("default_kek must name a KEK ('local' or azurekv:https://...)")
        for party, ref in self.party_keks.items():
            try:
                validate_name("party", party)
            except IdentityError as e:
                raise ConfigError(f"party_keks: {e}") from e
            if not isinstance(ref, str) or not ref.strip():
                raise ConfigError(f"party_keks.{party} must name a KEK")
        # A private copy, so that the caller's dict changing later cannot change the config.
        object.__setattr__(self, "party_keks", dict(self.party_keks))

    def kek_for_party(self, party: str) -> str:
        """The KEK ref this configuration gives ``party``'s new data keys."""
        return self.party_keks.get(party, self.default_kek)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


def load_broker_config(path: Path | None = None) -> BrokerConfig:
    """Reads ``[broker]`` from ``path`` (if any) and the environment.

    Relative paths (a SQLite ``database_url``'s file, ``state_dir``, the TLS files, CRLs, EK CA
    files and extra AMD root files) are resolved against the directory of ``path``, as the
    sidecar's are, so the broker finds the same state whatever directory it is started from.
    Without a file they stay relative to the working directory.

    Raises:
        ConfigError: the file or a setting is invalid.
    """
    config = load_config(BrokerConfig, path, env_prefix=ENV_PREFIX, section="broker")
    if path is None:
        return config
    return resolve_paths(config, Path(os.path.abspath(Path(path).parent)))


def _resolve(base: Path, value: str) -> str:
    return value if not value else os.fspath(base / os.path.expanduser(value))


def _resolve_database_url(base: Path, url: str) -> str:
    """A SQLite URL with a relative file made absolute against ``base``; others unchanged."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # Store.open reports the malformed URL.
    database = parsed.database
    if (
        not parsed.drivername.startswith("sqlite")
        or not database
        or database == ":memory:"
        or database.startswith("file:")
        or os.path.isabs(database)
    ):
        return url
    return parsed.set(database=_resolve(base, database)).render_as_string(hide_password=False)


def resolve_paths(config: BrokerConfig, base: Path) -> BrokerConfig:
    """``config`` with every relative path resolved against ``base`` (see
    :func:`load_broker_config`)."""
    tls = config.tls
    return replace(
        config,
        database_url=_resolve_database_url(base, config.database_url),
        state_dir=_resolve(base, config.state_dir),
        trusted_ek_ca_files=tuple(_resolve(base, f) for f in config.trusted_ek_ca_files),
        azure_snp=replace(
            config.azure_snp,
            trusted_root_files=tuple(
                _resolve(base, f) for f in config.azure_snp.trusted_root_files
            ),
        ),
        tls=replace(
            tls,
            cert_file=_resolve(base, tls.cert_file),
            key_file=_resolve(base, tls.key_file),
            ca_file=_resolve(base, tls.ca_file),
            crl_files=tuple(_resolve(base, f) for f in tls.crl_files),
        ),
    )


def read_config_file(path: Path, *, max_bytes: int, what: str) -> bytes:
    """Reads a file the configuration names (a CA bundle, a root certificate), refusing one
    larger than ``max_bytes`` before reading it, so that a wrong path cannot fill the memory.

    Raises:
        BrokerConfigError: the file is missing, unreadable or too large (named ``what``).
    """
    try:
        if path.stat().st_size > max_bytes:
            raise BrokerConfigError(f"{what} {path} is too large")
        return path.read_bytes()
    except OSError as e:
        raise BrokerConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e
