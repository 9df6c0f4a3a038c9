"""The demo's directory: where each file goes, the configuration files the demo writes for the
broker and the sidecar, and the measured copy of the example workload.

Everything the demo makes stays under one directory::

    DIR/
      .cleanroom-demo            marks the directory as the demo's (so a later run may replace it)
      broker.toml                the broker's configuration
      broker/                    broker.db (SQLite: keys wrapped by the KEK, approvals, audit log)
                                 and state/ (the local KEK and registration key, mode 0600)
      pki/                       the CA and each identity's certificate and key
      tpm/                       the software TPM's state
      parties/<party>/           each party's machine: its sample CSV, recipient key pair and the
                                 outputs it opened (opened/)
      sealed/                    the sealed inputs, as handed to the clean room
      workload/                  the measured copy of the example workload and its launcher
      workload-tampered/         the same with one byte changed
      sidecar.toml, sidecar-tampered.toml, sidecar-other-command.toml, sidecar-state/
      outputs/                   the sealed outputs of the good run
      outputs-tampered/          empty: the tampered run gets no keys, so it writes nothing
      outputs-other-command/     empty: the same files launched with another command get none
      logs/                      swtpm.log, broker.log, sidecar.log, sidecar-tampered.log,
                                 sidecar-other-command.log
                                 (and azurite.log with --azure-emulators)
      summary.txt                the summary printed at the end

With ``--azure-emulators`` the sealed inputs and outputs live in Azurite's blob containers
instead of ``sealed/`` and ``outputs/`` (the sealed outputs are downloaded to ``outputs/`` at
the end, for inspection), and two more directories appear::

      azurite/                   Azurite's data (the Azure Storage emulator)
      keyvault/                  the TLS CA and certificate of the local Key Vault double
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cleanroom.app.demo.errors import WorkspaceError

__all__ = [
    "MARKER",
    "PARTIES",
    "SIDECAR_ID",
    "TRUST_DOMAIN",
    "WORKLOAD_NAME",
    "Layout",
    "TamperedByte",
    "WorkloadCopy",
    "choose_directory",
    "copy_workload",
    "prepare_directory",
    "tamper_one_byte",
    "toml_document",
]

MARKER: Final = ".cleanroom-demo"
TRUST_DOMAIN: Final = "cleanroom.local"
PARTIES: Final = ("advertiser", "publisher")
SIDECAR_ID: Final = "sidecar-1"
WORKLOAD_NAME: Final = "example"

#: The launcher copied beside the workload. It is measured with the workload and it pins the
#: workload's arguments in a measured file (the command line that starts it is measured too,
#: as the launch).
_LAUNCHER: Final = '''\
"""Runs the example clean-room workload from the files beside this launcher.

Measured into PCR 23 together with those files, so what the parties approve is what runs:
the modules are imported from this directory (never from an installed copy), and the
arguments below are part of the approved bytes.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARGS = {args!r}


def main() -> int:
    if not sys.path or Path(sys.path[0] or ".").resolve() != HERE:
        sys.path.insert(0, str(HERE))
    import workload
    import workload.example.app as app

    for module in (workload, app):
        origin = Path(module.__file__ or "").resolve()
        if HERE not in origin.parents:
            where = f"{{module.__name__}} comes from {{origin}}, not {{HERE}}"
            print(f"launcher: {{where}}", file=sys.stderr)
            return 3
    return app.main(ARGS)


raise SystemExit(main())
'''


@dataclass(frozen=True)
class Layout:
    """Paths of the demo directory (see the module docstring)."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def tpm_state(self) -> Path:
        return self.root / "tpm"

    @property
    def broker_config(self) -> Path:
        return self.root / "broker.toml"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def broker_db(self) -> Path:
        return self.broker_dir / "broker.db"

    @property
    def sealed(self) -> Path:
        return self.root / "sealed"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sidecar_state(self) -> Path:
        return self.root / "sidecar-state"

    @property
    def summary(self) -> Path:
        return self.root / "summary.txt"

    @property
    def azurite_data(self) -> Path:
        """Azurite's data directory (``--azure-emulators``)."""
        return self.root / "azurite"

    @property
    def keyvault_dir(self) -> Path:
        """The Key Vault double's TLS files (``--azure-emulators``)."""
        return self.root / "keyvault"

    def party_dir(self, party: str) -> Path:
        return self.root / "parties" / party

    def party_csv(self, party: str) -> Path:
        return self.party_dir(party) / f"{party}.csv"

    def party_key(self, party: str) -> Path:
        """The party's recipient private key (mode 0600): it opens the outputs."""
        return self.party_dir(party) / f"{party}.key"

    def party_pub(self, party: str) -> Path:
        return self.party_dir(party) / f"{party}.pub"

    def opened(self, party: str) -> Path:
        return self.party_dir(party) / "opened"

    def sealed_input(self, party: str) -> Path:
        return self.sealed / f"{party}.csv.sealed"

    def workload(self, *, tampered: bool = False) -> Path:
        return self.root / ("workload-tampered" if tampered else "workload")

    def outputs(self, *, tampered: bool = False, run: str = "") -> Path:
        return self.root / f"outputs{_suffix(tampered, run)}"

    def sidecar_config(self, *, tampered: bool = False, run: str = "") -> Path:
        return self.root / f"sidecar{_suffix(tampered, run)}.toml"

    def sidecar_log(self, *, tampered: bool = False, run: str = "") -> Path:
        return self.logs / f"sidecar{_suffix(tampered, run)}.log"

    def rel(self, path: Path) -> str:
        """``path`` relative to the demo directory (POSIX form), for messages and configs."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def _suffix(tampered: bool, run: str) -> str:
    """The file-name suffix of a sidecar run: none for the good run, ``-tampered`` for the
    tampered one, ``-<run>`` for another named run (``-other-command``)."""
    name = run or ("tampered" if tampered else "")
    return f"-{name}" if name else ""


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def choose_directory(requested: Path | None, *, now: dt.datetime | None = None) -> Path:
    """The demo directory: ``requested``, else a new ``./cleanroom-demo-<timestamp>`` (with a
    suffix if that exists), else, when the current directory is not writable, a new temporary
    directory. The result is absolute.

    Raises:
        WorkspaceError: a temporary directory cannot be made either.
    """
    if requested is not None:
        return requested.expanduser().absolute()
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    cwd = Path.cwd()
    if _writable(cwd):
        base = cwd / f"cleanroom-demo-{stamp}"
        candidate = base
        n = 2
        while candidate.exists() or candidate.is_symlink():
            candidate = base.with_name(f"{base.name}-{n}")
            n += 1
        return candidate
    try:
        return Path(tempfile.mkdtemp(prefix=f"cleanroom-demo-{stamp}-")).absolute()
    except OSError as e:
        raise WorkspaceError(f"cannot create a temporary directory: {e.strerror or e}") from e


def prepare_directory(directory: Path) -> tuple[Layout, bool]:
    """Creates the demo directory, or empties an earlier demo's.

    Returns the layout and whether an earlier demo was replaced.

    Raises:
        WorkspaceError: the path is a file, or a non-empty directory that is not a demo's, or it
            cannot be created or emptied.
    """
    layout = Layout(directory)
    replaced = False
    try:
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise WorkspaceError(f"{directory} exists and is not a directory")
        if directory.exists() and any(directory.iterdir()):
            if not layout.marker.is_file():
                raise WorkspaceError(
                    f"{directory} is not empty and was not made by `cleanroom demo`; "
                    "choose another --dir"
                )
            for entry in directory.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            replaced = True
        directory.mkdir(parents=True, exist_ok=True)
        layout.marker.write_text("made by `cleanroom demo`; a later run may replace it\n")
        for d in (layout.logs, layout.sealed, layout.broker_dir):
            d.mkdir(exist_ok=True)
        for party in PARTIES:
            layout.party_dir(party).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkspaceError(f"cannot prepare {directory}: {e.strerror or e}") from e
    return layout, replaced


# --- configuration files ----------------------------------------------------------------------


TomlValue = str | int | float | bool | Sequence[str]


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string with ASCII escapes is a valid TOML basic string.
        return json.dumps(value)
    return "[" + ", ".join(json.dumps(v) for v in value) + "]"


def toml_document(tables: Sequence[tuple[str, Mapping[str, TomlValue]]]) -> str:
    """A TOML document from ``(header, settings)`` pairs; a header in double brackets makes an
    array-of-tables entry (``"[[inputs]]"``), any other is a table (``"broker.tls"``)."""
    out: list[str] = []
    for header, settings in tables:
        out.append(header if header.startswith("[[") else f"[{header}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in settings.items())
        out.append("")
    return "\n".join(out)


def write_text(path: Path, text: str) -> None:
    """Writes a small text file.

    Raises:
        WorkspaceError: it cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise WorkspaceError(f"cannot write {path}: {e.strerror or e}") from e


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadCopy:
    """A copy of the example workload: its directory and its files in measurement order
    (relative POSIX names; the launcher first)."""

    root: Path
    files: tuple[str, ...]
    launcher: Path


def _package_sources(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.glob("*.py") if p.is_file())


def copy_workload(destination: Path, *, args: Sequence[str]) -> WorkloadCopy:
    """Copies the workload SDK and the example workload (their ``.py`` files only, so no
    compiled bytecode is run unmeasured) into ``destination/workload/``, and writes the
    launcher ``destination/run.py`` that runs them with ``args``.

    The measured files are the launcher, the SDK's modules and the example's modules, in that
    order. The sample-data generator (``sampledata.py``) and ``__main__.py`` are left out:
    they do not run in the clean room.

    Raises:
        WorkspaceError: the installed workload package cannot be found or copied.
    """
    import workload as sdk
    import workload.example as example

    sdk_dir = Path(sdk.__file__ or "").parent
    example_dir = Path(example.__file__ or "").parent
    skipped = {"sampledata.py", "__main__.py"}
    sources = [
        *[(p, Path("workload") / p.name) for p in _package_sources(sdk_dir)],
        *[
            (p, Path("workload") / "example" / p.name)
            for p in _package_sources(example_dir)
            if p.name not in skipped
        ],
    ]
    if not sources:
        raise WorkspaceError(f"no workload sources found in {sdk_dir}")
    launcher = destination / "run.py"
    try:
        for src, rel in sources:
            target = destination / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        launcher.write_text(_LAUNCHER.format(args=list(args)), encoding="utf-8")
    except OSError as e:
        raise WorkspaceError(f"cannot copy the workload to {destination}: {e.strerror or e}") from e
    files = ("run.py", *(rel.as_posix() for _, rel in sources))
    return WorkloadCopy(root=destination, files=files, launcher=launcher)


@dataclass(frozen=True)
class TamperedByte:
    """Which byte the tamper step changed."""

    file: str
    offset: int
    before: str
    after: str


def tamper_one_byte(
    copy: WorkloadCopy, destination: Path, *, target: str
) -> tuple[TamperedByte, WorkloadCopy]:
    """Copies ``copy`` to ``destination`` and changes one byte of the file ``target`` there.

    The byte is the first letter of the file's docstring, whose case is flipped: the Python
    stays valid and behaves the same, so a refusal can only come from the measurement.

    Raises:
        WorkspaceError: the copy fails or ``target`` has no letter to change.
    """
    try:
        shutil.copytree(copy.root, destination)
        path = destination / target
        data = bytearray(path.read_bytes())
    except OSError as e:
        raise WorkspaceError(f"cannot copy the workload to {destination}: {e.strerror or e}") from e
    start = data.find(b'"""')
    offset = next(
        (i for i in range(max(start, 0), len(data)) if chr(data[i]).isalpha() and data[i] < 128),
        -1,
    )
    if offset < 0:
        raise WorkspaceError(f"{target} has no letter to change")
    before = chr(data[offset])
    after = before.swapcase()
    data[offset] = ord(after)
    try:
        path.write_bytes(bytes(data))
    except OSError as e:
        raise WorkspaceError(f"cannot write {path}: {e.strerror or e}") from e
    tampered = WorkloadCopy(
        root=destination, files=copy.files, launcher=destination / copy.launcher.name
    )
    return TamperedByte(file=target, offset=offset, before=before, after=after), tampered
