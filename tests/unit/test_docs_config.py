"""docs/operations.md's configuration reference and metrics table agree with the code.

Each settings table sits under a heading naming its TOML table and its class, e.g.
``### `[broker.tls]` (`broker.config.TlsConfig`)``, and has the columns Setting, Type, Default,
Environment variable, Meaning. This test checks that the table lists exactly the class's fields
(nested tables get their own section), with the type and default the code has, and sets every
environment variable the table names through the real loader to see it arrive in its field.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.docs import ROOT

OPERATIONS = ROOT / "docs" / "operations.md"
COLUMNS = ["Setting", "Type", "Default", "Environment variable", "Meaning"]

_SECTION = re.compile(r"^#{2,4} `(?P<table>\[\[?[a-z_.]+\]\]?)` \(`(?P<cls>[\w.]+)`\)\s*$")


@dataclass(frozen=True)
class Row:
    setting: str
    type: str
    default: str
    env: str
    line: int


@dataclass(frozen=True)
class Section:
    table: str
    cls: type[Any]
    rows: tuple[Row, ...]
    line: int


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def parse_sections(text: str) -> list[Section]:
    """Every settings section of the page, with its table rows."""
    lines = text.splitlines()
    sections: list[Section] = []
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if not m:
            continue
        module, _, name = m["cls"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            if lines[j].startswith("#"):
                raise AssertionError(f"operations.md:{i + 1}: {m['table']} has no table")
            j += 1
        assert _cells(lines[j]) == COLUMNS, f"operations.md:{j + 1}: columns {_cells(lines[j])}"
        rows: list[Row] = []
        for k in range(j + 2, len(lines)):
            if not lines[k].startswith("|"):
                break
            cells = _cells(lines[k])
            assert len(cells) == len(COLUMNS), f"operations.md:{k + 1}: {len(cells)} cells"
            rows.append(
                Row(
                    setting=_unquote(cells[0]),
                    type=cells[1],
                    default=cells[2],
                    env=_unquote(cells[3]),
                    line=k + 1,
                )
            )
        sections.append(Section(table=m["table"], cls=cls, rows=tuple(rows), line=i + 1))
    return sections


@pytest.fixture(scope="module")
def sections() -> list[Section]:
    return parse_sections(OPERATIONS.read_text(encoding="utf-8"))


def _by_class(sections: list[Section]) -> dict[type[Any], Section]:
    return {s.cls: s for s in sections}


# --- what the code says ---------------------------------------------------------------------


def _is_dataclass_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _settings(cls: type[Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) for the fields that are settings of this table."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        sub_tables = typing.get_origin(annotation) is tuple and any(
            _is_dataclass_type(a) for a in typing.get_args(annotation)
        )
        if _is_dataclass_type(annotation) or sub_tables:
            continue  # a sub-table: documented in its own section
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[f.name] = (annotation, default)
    return out


def type_word(annotation: Any) -> str:
    """How the reference names a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return type_word(inner)
    if origin is typing.Literal:
        return type_word(type(args[0]))
    if origin is tuple:
        return f"list of {type_word(args[0])}s"
    if origin in (dict, Mapping):
        return f"table of {type_word(args[1])}s"
    words = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return words[annotation]


def default_matches(cell: str, default: Any) -> bool:
    if cell == "(required)":
        return default is dataclasses.MISSING or default in ("", ())
    if cell == "unset":
        return default is None
    if not (cell.startswith("`") and cell.endswith("`")):
        return False
    value = tomllib.loads(f"v = {cell[1:-1]}")["v"]
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, Mapping):
        return isinstance(value, dict) and value == dict(default)
    return bool(value == default and type(value) is type(default))


# --- the reference against the code --------------------------------------------------------

#: The configuration classes a reader can set, and the TOML table each one is.
DOCUMENTED = {
    "broker.config.BrokerConfig": "[broker]",
    "broker.config.TlsConfig": "[broker.tls]",
    "broker.config.MetricsConfig": "[broker.metrics]",
    "broker.config.AzureSnpConfig": "[broker.azure_snp]",
    "broker.kek_azure.KeyVaultConfig": "[keyvault]",
    "sidecar.config.TpmConfig": "[tpm]",
    "sidecar.runconfig.BrokerSettings": "[broker]",
    "sidecar.runconfig.WorkloadSettings": "[workload]",
    "sidecar.runconfig.InputSettings": "[[inputs]]",
    "sidecar.runconfig.OutputSettings": "[outputs]",
    "sidecar.runconfig.RuntimeSettings": "[runtime]",
    "sidecar.dataplane.config.DataPlaneConfig": "[dataplane]",
    "blobstore.config.BlobConfig": "[blob]",
}


def test_every_configuration_class_has_its_section(sections: list[Section]) -> None:
    found = {f"{s.cls.__module__}.{s.cls.__qualname__}": s.table for s in sections}
    assert found == DOCUMENTED


def test_broker_sub_tables_are_the_nested_dataclasses(sections: list[Section]) -> None:
    from broker.config import BrokerConfig

    documented = _by_class(sections)
    hints = typing.get_type_hints(BrokerConfig)
    nested = {f.name: hints[f.name] for f in dataclasses.fields(BrokerConfig)}
    nested = {k: v for k, v in nested.items() if _is_dataclass_type(v)}
    assert nested, "BrokerConfig has no sub-tables any more: update this test"
    for name, cls in nested.items():
        assert documented[cls].table == f"[broker.{name}]"


def test_every_table_of_sidecar_toml_is_documented(sections: list[Section]) -> None:
    from blobstore.config import BlobConfig
    from sidecar.runconfig import RunConfig

    documented = _by_class(sections)
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "source":
            continue  # set by the loader, not a setting
        annotation = hints[f.name]
        if typing.get_origin(annotation) is tuple:
            (cls,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
            table = f"[[{f.name}]]"
        elif _is_dataclass_type(annotation):
            cls, table = annotation, f"[{f.name}]"
        else:
            # The raw [blob] table, which blobstore's own loader reads.
            assert f.name == "blob", f"RunConfig.{f.name} is new: document it"
            cls, table = BlobConfig, "[blob]"
        assert cls in documented, f"sidecar.toml's {table} ({cls.__name__}) is not documented"
        assert documented[cls].table == table


def test_each_table_lists_exactly_the_fields_with_their_types_and_defaults(
    sections: list[Section],
) -> None:
    problems = []
    for section in sections:
        fields = _settings(section.cls)
        rows = {r.setting: r for r in section.rows}
        if len(rows) != len(section.rows):
            problems.append(f"{section.table}: a setting is listed twice")
        missing = sorted(set(fields) - set(rows))
        extra = sorted(set(rows) - set(fields))
        if missing or extra:
            problems.append(
                f"{section.table} ({section.cls.__name__}): missing {missing}, "
                f"not in the code {extra}"
            )
        for name, (annotation, default) in fields.items():
            row = rows.get(name)
            if row is None:
                continue
            if row.type != type_word(annotation):
                problems.append(
                    f"operations.md:{row.line}: {name} is a {type_word(annotation)}, not {row.type}"
                )
            if not default_matches(row.default, default):
                problems.append(
                    f"operations.md:{row.line}: {name} defaults to {default!r}, not {row.default}"
                )
    assert not problems, "\n".join(problems)


# --- the environment variables, through the real loaders ------------------------------------

#: Values that pass each setting's validation and differ from its default, where the generic
#: choice (below) would not.
PROBES: dict[tuple[str, str], Any] = {
    ("BlobConfig", "auth"): "anonymous",
    ("KeyVaultConfig", "credential"): "managed-identity",
    ("TpmConfig", "ek_algorithm"): "ecc",
    ("TpmConfig", "ak_algorithm"): "ecc",
    ("TpmConfig", "banks"): ("sha256",),
    ("BrokerConfig", "required_banks"): ("sha1", "sha256"),
    ("BrokerConfig", "boot_pcrs"): (0, 7),
    ("TpmConfig", "extra_pcrs"): (0, 7),
    ("BrokerConfig", "accepted_rsa_bits"): (2048,),
    ("AzureSnpConfig", "allowed_measurements"): ("ab" * 48, "cd" * 48),
    ("AzureSnpConfig", "min_tcb"): {"snp": 24, "microcode": 219},
    ("AzureSnpConfig", "require_vm_configuration"): {"secure-boot": False, "tpm-enabled": True},
    ("TpmConfig", "vcek_url"): "http://127.0.0.1:8080/vcek",
    ("WorkloadSettings", "command"): ("/usr/bin/python3", "run.py"),
}


def probe_value(cls: type[Any], name: str, annotation: Any, default: Any) -> Any:
    if (cls.__name__, name) in PROBES:
        return PROBES[(cls.__name__, name)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return "probe-value"
    if annotation is bool:
        return not default
    if annotation in (int, float):
        return default + 1
    if origin is tuple:
        return ("probe-a", "probe-b")
    if origin in (dict, Mapping):
        return {"advertiser": "probe-a", "publisher": "probe-b"}
    return "probe-value"


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


SIDECAR_TOML = """\
[broker]
cert_file = "c.crt"
key_file = "c.key"
ca_file = "ca.crt"
[workload]
files = ["run.py"]
"""


def _loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[..., Any]]:
    """Class name -> a function that loads that class's values from a given environment."""
    from blobstore.config import load_blob_config
    from broker.config import load_broker_config
    from broker.kek_azure import load_key_vault_config
    from sidecar.runconfig import load_run_config

    sidecar_toml = tmp_path / "sidecar.toml"
    sidecar_toml.write_text(SIDECAR_TOML)

    def broker(env: Mapping[str, str]) -> Any:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            return load_broker_config(None)

    def run(env: Mapping[str, str]) -> Any:
        return load_run_config(sidecar_toml, env=dict(env))

    return {
        "BrokerConfig": broker,
        "TlsConfig": lambda env: broker(env).tls,
        "MetricsConfig": lambda env: broker(env).metrics,
        "AzureSnpConfig": lambda env: broker(env).azure_snp,
        "KeyVaultConfig": lambda env: load_key_vault_config(None, env=dict(env)),
        "TpmConfig": lambda env: run(env).tpm,
        "BrokerSettings": lambda env: run(env).broker,
        "WorkloadSettings": lambda env: run(env).workload,
        "OutputSettings": lambda env: run(env).outputs,
        "RuntimeSettings": lambda env: run(env).runtime,
        "DataPlaneConfig": lambda env: run(env).dataplane,
        "BlobConfig": lambda env: load_blob_config(None, env=dict(env)),
    }


def test_every_environment_variable_reaches_its_setting(
    sections: list[Section], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(("CLEANROOM_", "TPM2TOOLS_")):
            monkeypatch.delenv(name)
    loaders = _loaders(tmp_path, monkeypatch)
    checked = 0
    problems = []
    for section in sections:
        fields = _settings(section.cls)
        for row in section.rows:
            if row.env == "—":
                if section.cls.__name__ in loaders:
                    problems.append(f"operations.md:{row.line}: {row.setting} has a variable")
                continue
            annotation, default = fields[row.setting]
            value = probe_value(section.cls, row.setting, annotation, default)
            loaded = getattr(loaders[section.cls.__name__]({row.env: env_text(value)}), row.setting)
            # The sidecar resolves relative paths against the config file's directory.
            if loaded != value and not str(loaded).endswith(f"/{value}"):
                problems.append(
                    f"operations.md:{row.line}: {row.env}={env_text(value)} gave "
                    f"{row.setting}={loaded!r}"
                )
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked > 60


# --- metrics ---------------------------------------------------------------------------------


def test_the_metrics_table_names_every_metric_with_its_type_and_labels() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from broker.server.metrics import BrokerMetrics

    metrics = BrokerMetrics()
    code: dict[str, tuple[str, tuple[str, ...]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            name = family.name + ("_total" if family.type == "counter" else "")
            code[name] = (family.type, tuple(value._labelnames))

    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("| Metric | Type | Labels | What |")
    documented: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, kind, labels, _ = _cells(line)
        # Labels are the code spans outside parentheses: `result` (`allow`, `deny`), `reason`.
        label_names = tuple(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels)))
        documented[_unquote(name)] = (kind, label_names)
    assert documented == code
