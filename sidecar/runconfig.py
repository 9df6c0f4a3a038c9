"""Configuration of ``cleanroom sidecar run``: one TOML file, ``sidecar.toml``.

``load_run_config(path)`` reads the whole file into :class:`RunConfig` and then applies
``CLEANROOM_SIDECAR_<TABLE>_<SETTING>`` environment variables (``CLEANROOM_SIDECAR_TPM_TCTI``,
``CLEANROOM_SIDECAR_BROKER_TARGET``, ``CLEANROOM_SIDECAR_RUNTIME_GRACE_SECONDS``...). Relative
paths, in the file or in the environment, are resolved against the directory of the config
file, so a config can be moved together with the files it names. docs/sidecar-run.md describes
every setting; this is the layout::

    [tpm]                       # sidecar.config.TpmConfig
    tcti = "swtpm:host=127.0.0.1,port=2321"
    [broker]
    target = "127.0.0.1:50051"
    cert_file = "pki/sidecar-sidecar-1.crt"
    key_file = "pki/sidecar-sidecar-1.key"
    ca_file = "pki/ca.crt"
    [workload]
    name = "example"
    root = "workload"
    files = ["run.py", "analysis.py"]
    command = ["/usr/bin/python3", "run.py"]
    env = { LANG = "C.UTF-8" }
    [[inputs]]
    name = "advertiser"
    url = "sealed/advertiser.csv.sealed"
    key_id = "advertiser-data"
    [outputs]
    directory = "outputs"
    [runtime]
    state_dir = "sidecar-state"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from sidecar.config import DEFAULT_TCTI, TpmConfig
from sidecar.dataplane.config import DataPlaneConfig

__all__ = [
    "BLOB_SCHEMES",
    "DEFAULT_BROKER_RETRIES",
    "DEFAULT_GRACE_SECONDS",
    "RUN_ENV_PREFIX",
    "BrokerSettings",
    "InputSettings",
    "OutputSettings",
    "RunConfig",
    "RuntimeSettings",
    "WorkloadSettings",
    "is_blob_url",
    "load_run_config",
]

#: Prefix of the environment variables that override :class:`RunConfig` settings. The ``[tpm]``
#: and ``[dataplane]`` tables get the same variables as ``load_tpm_config`` and
#: ``load_dataplane_config`` read (``CLEANROOM_SIDECAR_TPM_TCTI``).
RUN_ENV_PREFIX = "CLEANROOM_SIDECAR"

#: Retries after the broker answered UNAVAILABLE (or could not be reached), with exponential
#: backoff from 0.1 s up to 2 s between attempts: about 3 s in all before giving up.
DEFAULT_BROKER_RETRIES = 5

#: Seconds the workload gets to exit after SIGTERM before it is killed, and that in-flight
#: outputs get to finish after it exited.
DEFAULT_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class BrokerSettings:
    """How the sidecar reaches the broker (mutual TLS with its own sidecar certificate).

    Attributes:
        target: the broker's ``HOST:PORT``.
        cert_file, key_file: the sidecar's client certificate (SPIFFE ID
            ``spiffe://<domain>/sidecar/<id>``) and key. The quote is bound to this certificate.
        ca_file: the CA bundle that the broker's certificate must chain to.
        server_name: the name the broker's certificate must carry, when it differs from the
            target's host (empty: the target's host).
        retries: retries after UNAVAILABLE, with exponential backoff, before giving up.
        timeout_seconds: deadline of each call to the broker.

    Raises:
        ValueError: an empty target or file, negative retries or a non-positive timeout.
    """

    target: str = "127.0.0.1:50051"
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    server_name: str | None = None
    retries: int = DEFAULT_BROKER_RETRIES
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("[broker] target must not be empty")
        for name in ("cert_file", "key_file", "ca_file"):
            if not getattr(self, name):
                raise ValueError(f"[broker] {name} must be set")
        if self.retries < 0:
            raise ValueError("[broker] retries must be >= 0")
        if self.timeout_seconds <= 0:
            raise ValueError("[broker] timeout_seconds must be positive")


@dataclass(frozen=True)
class WorkloadSettings:
    """The workload's files, measured into PCR 23 in this order before attestation.

    Attributes:
        name: a label for logs and messages (the broker matches approvals by the measured files,
            not by this name).
        root: the workload's directory; the workload runs with it as its working directory.
        files: relative POSIX paths under ``root``. They are the names the event log records,
            so they must be the names the parties approved (``cleanroom admin workload
            approve --root ROOT --file ...`` computes the same names).
        command: the command the sidecar runs, measured into PCR 23 after the files as the
            launch event; its first word is an absolute path (no PATH lookup). Empty: the
            command given after ``--`` on the command line is the one measured.
        env: the workload's complete environment (besides ``CLEANROOM_WORKLOAD_SOCKET``, which
            the sidecar adds); measured with the command. Nothing is inherited.

    Raises:
        ValueError: no files, a file name that is absolute, empty or contains ``..``, a
            command whose first word is not an absolute path, or a malformed variable name.
    """

    name: str = "workload"
    root: str = "."
    files: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from evidence.errors import LaunchError
        from evidence.launch import check_command, check_variable_name

        try:
            if self.command:
                check_command(self.command)
            for name in self.env:
                check_variable_name(name)
        except LaunchError as e:
            raise ValueError(f"[workload] {e}") from e
        if not self.files:
            raise ValueError("[workload] files must list at least one file to measure")
        for name in self.files:
            parts = PurePosixPath(name).parts
            if not name or name.startswith("/") or ".." in parts or "\\" in name:
                raise ValueError(
                    f"[workload] files: {name!r} must be a relative path under root, without '..'"
                )
        if len(set(self.files)) != len(self.files):
            raise ValueError("[workload] files must not repeat a file")

    def measured_names(self) -> tuple[str, ...]:
        """The names recorded in the event log (normalised POSIX form: ``./a//b`` is ``a/b``)."""
        return tuple(PurePosixPath(name).as_posix() for name in self.files)


@dataclass(frozen=True)
class InputSettings:
    """One sealed input.

    Attributes:
        name: the name the workload opens it by (``workload.open_input(name)``).
        url: where the sealed stream is: a path (relative to the config file's directory), a
            ``file:`` URL, or a URL of a registered input scheme.
        key_id: the data key that opens it, as the owning party registered it with the broker.
        required: when true (default), the sidecar refuses to start the workload unless the
            broker released this key; when false, the input is left out if its key is withheld.

    Raises:
        ValueError: an empty name, URL or key id.
    """

    name: str = ""
    url: str = ""
    key_id: str = ""
    required: bool = True

    def __post_init__(self) -> None:
        if not self.name or "\x00" in self.name:
            raise ValueError("[[inputs]] every input needs a name")
        if not self.url:
            raise ValueError(f"[[inputs]] input {self.name!r} needs a url")
        if not self.key_id:
            raise ValueError(f"[[inputs]] input {self.name!r} needs a key_id")


@dataclass(frozen=True)
class OutputSettings:
    """Where sealed outputs go: ``<directory>/<name>.sealed``. ``directory`` is a local
    directory (created as needed) or an Azure Blob container URL (``azure://account/container``
    or ``https://account.blob.core.windows.net/container``, optionally with a path prefix); the
    container must exist, and the ``[blob]`` table says how to reach it.

    ``replace``: outputs already at ``directory`` (``*.sealed``) are replaced by this run's
    outputs of the same name. Off by default: the sidecar then refuses to attest while any
    output is there, since the run could not write its own.
    """

    directory: str = "outputs"
    replace: bool = False

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("[outputs] directory must not be empty")


@dataclass(frozen=True)
class RuntimeSettings:
    """The sidecar's own files and the workload's supervision.

    Attributes:
        state_dir: where the sidecar remembers that its AK is enrolled with the broker
            (``enrollment.json``; no secrets). Created mode 0700.
        socket_dir: the directory of the workload socket. Empty (default): a fresh private
            directory under ``$XDG_RUNTIME_DIR``, or the system's temporary directory, removed
            at the end.
        grace_seconds: after SIGTERM or SIGINT, how long the workload may take to exit before it
            is killed; after it exited, how long outputs still being written may take to finish.

    Raises:
        ValueError: an empty state_dir or a negative grace period.
    """

    state_dir: str = "sidecar-state"
    socket_dir: str = ""
    grace_seconds: float = DEFAULT_GRACE_SECONDS

    def __post_init__(self) -> None:
        if not self.state_dir:
            raise ValueError("[runtime] state_dir must not be empty")
        if self.grace_seconds < 0:
            raise ValueError("[runtime] grace_seconds must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``cleanroom sidecar run`` needs. See :func:`load_run_config`.

    ``[dataplane]`` holds the workload socket's limits (:class:`DataPlaneConfig`); its defaults
    suit almost every workload.

    Raises:
        ValueError: two inputs share a name.
    """

    broker: BrokerSettings
    workload: WorkloadSettings
    tpm: TpmConfig = field(default_factory=TpmConfig)
    inputs: tuple[InputSettings, ...] = ()
    outputs: OutputSettings = field(default_factory=OutputSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    dataplane: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    #: The ``[blob]`` table as written; blobstore's own loader reads and checks it (with its
    #: ``CLEANROOM_BLOB_*`` variables) from ``source`` when an input or the outputs are in Azure
    #: Blob. Kept raw here so that loading the config does not import the Azure SDK.
    blob: Mapping[str, Any] = field(default_factory=dict)
    #: The file this config was loaded from (set by :func:`load_run_config`).
    source: str = ""

    def __post_init__(self) -> None:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("[[inputs]] two inputs have the same name")

    @property
    def workload_root(self) -> Path:
        return Path(self.workload.root)

    def workload_files(self) -> list[Path]:
        """The workload's files as paths, in measurement order."""
        return [self.workload_root / name for name in self.workload.measured_names()]

    def key_ids(self) -> tuple[str, ...]:
        """The key ids the inputs need, in input order, without repeats."""
        return tuple(dict.fromkeys(i.key_id for i in self.inputs))

    @property
    def uses_blob(self) -> bool:
        """Whether an input or the output location is in Azure Blob Storage."""
        return is_blob_url(self.outputs.directory) or any(is_blob_url(i.url) for i in self.inputs)


def is_blob_url(value: str) -> bool:
    """Whether ``value`` names Azure Blob Storage (``azure://``, ``https://``, ``http://``).

    The same rule as ``blobstore.urls.is_blob_url``, repeated here because importing the
    ``blobstore`` package loads the Azure SDK, which a run without blobs should not pay for.
    """
    scheme, sep, rest = value.partition(":")
    return bool(sep) and scheme.lower() in BLOB_SCHEMES and rest.startswith("//")


#: URL schemes served from Azure Blob Storage (inputs and the output location).
BLOB_SCHEMES = ("azure", "https", "http")


def _resolve(base: Path, value: str) -> str:
    return value if not value else os.fspath(base / os.path.expanduser(value))


def _is_url(value: str) -> bool:
    # The same rule as the data path's input registry: "file:" or "scheme://" is a URL; anything
    # else (including "C:foo" or "data:v1/x") is a path.
    scheme, sep, rest = value.partition(":")
    return bool(sep) and scheme.isalnum() and (scheme.lower() == "file" or rest.startswith("//"))


def _resolved(config: RunConfig, base: Path) -> RunConfig:
    tpm = config.tpm
    if tpm.ak_context_file:
        tpm = replace(tpm, ak_context_file=_resolve(base, tpm.ak_context_file))
    broker = replace(
        config.broker,
        cert_file=_resolve(base, config.broker.cert_file),
        key_file=_resolve(base, config.broker.key_file),
        ca_file=_resolve(base, config.broker.ca_file),
    )
    inputs = tuple(
        i if _is_url(i.url) else replace(i, url=_resolve(base, i.url)) for i in config.inputs
    )
    return replace(
        config,
        tpm=tpm,
        broker=broker,
        workload=replace(config.workload, root=_resolve(base, config.workload.root)),
        inputs=inputs,
        outputs=config.outputs
        if is_blob_url(config.outputs.directory)
        else replace(config.outputs, directory=_resolve(base, config.outputs.directory)),
        runtime=replace(
            config.runtime,
            state_dir=_resolve(base, config.runtime.state_dir),
            socket_dir=_resolve(base, config.runtime.socket_dir),
        ),
    )


def load_run_config(
    path: str | os.PathLike[str],
    *,
    tcti: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RunConfig:
    """Loads ``sidecar.toml`` and the environment into a :class:`RunConfig` with absolute paths.

    The TCTI is chosen as :func:`sidecar.config.load_tpm_config` chooses it: ``tcti`` (the
    CLI's ``--tcti``), ``CLEANROOM_SIDECAR_TPM_TCTI``, the file, ``TPM2TOOLS_TCTI``, then the
    default ``device:/dev/tpmrm0``.

    Raises:
        cleanroom.config.ConfigError: the file cannot be read, a table or setting is unknown,
            malformed or out of range, or a required setting is missing.
    """
    from cleanroom.config import ConfigError, load_config

    environ = os.environ if env is None else env
    file = Path(path)
    try:
        config = load_config(RunConfig, file, env_prefix=RUN_ENV_PREFIX, env=environ)
    except TypeError as e:
        # A missing required table surfaces as the constructor's "missing argument" TypeError.
        missing = [t for t in ("broker", "workload") if f"'{t}'" in str(e)]
        missing = missing or ["broker", "workload"]
        what = " and ".join(f"[{t}]" for t in missing)
        verb = "table is" if len(missing) == 1 else "tables are"
        raise ConfigError(f"config file {file}: the {what} {verb} required") from e
    except ConfigError as e:
        message = str(e)
        if str(file) in message:
            raise
        # The loader names the setting but not the file; a top-level table's message starts
        # with ": " (its path is empty).
        raise ConfigError(f"config file {file}: {message.removeprefix(': ')}") from e
    except ValueError as e:
        raise ConfigError(f"config file {file}: {e}") from e
    if tcti:
        config = replace(config, tpm=replace(config.tpm, tcti=tcti))
    elif config.tpm.tcti == DEFAULT_TCTI and environ.get("TPM2TOOLS_TCTI"):
        # As in load_tpm_config: a shell set up for tpm2-tools works unchanged.
        config = replace(config, tpm=replace(config.tpm, tcti=environ["TPM2TOOLS_TCTI"]))
    base = file.parent.absolute()
    return replace(_resolved(config, base), source=os.fspath(file.absolute()))
