"""Loading frozen configuration dataclasses from TOML with environment overrides.

Every package declares its settings as a frozen dataclass whose fields have safe defaults; this
module fills one from a TOML table and then from environment variables named
``<PREFIX>_<FIELD>`` in upper case (``CLEANROOM_BROKER_NONCE_TTL_SECONDS=30``). Nested
dataclasses are filled from sub-tables and from ``<PREFIX>_<FIELD>_<SUBFIELD>`` variables.
A ``dict[str, X]`` (or ``Mapping[str, X]``) field is a table of its own whose keys are free
(``[broker.party_keks]``); its variable holds ``name=value`` pairs separated by commas.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

# Re-exported: callers that load configuration catch its error from the same module.
from cleanroom.errors import ConfigError as ConfigError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            return None
        return _coerce(value, non_none[0], where)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table")
        return _build(annotation, value, where)
    if origin in (dict, Mapping):
        return _coerce_table(value, args, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            # Base 0 accepts 0x81010002 for TPM handles given as strings (environment).
            return int(value, 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from e
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from e
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is Path:
        return Path(str(value))
    return value


def _coerce_table(value: Any, args: tuple[Any, ...], where: str) -> dict[str, Any]:
    """A TOML table of settings keyed by name (``[broker.party_keks]``).

    From the environment it is written ``name=value,name=value``.
    """
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            name, sep, text = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{where}: expected name=value pairs, got {item!r}")
            pairs[name.strip()] = text.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table")
    key_type, value_type = args if len(args) == 2 else (str, Any)
    if key_type is not str:
        raise ConfigError(f"{where}: only tables keyed by strings are supported")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings, got {k!r}")
        out[k] = _coerce(v, value_type, f"{where}.{k}")
    return out


def _build(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()}
    return cls(**kwargs)


def _env_overrides(cls: type[Any], prefix: str, env: Mapping[str, str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}_{f.name}".upper()
        ann = hints[f.name]
        if dataclasses.is_dataclass(ann):
            sub = _env_overrides(ann, name, env)  # type: ignore[arg-type]
            if sub:
                out[f.name] = sub
        elif name in env:
            out[f.name] = env[name]
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def load_config(
    cls: type[T],
    path: Path | None = None,
    *,
    env_prefix: str,
    section: str | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """Builds ``cls`` from a TOML file (optionally one table of it) and environment overrides.

    Raises:
        ConfigError: the file cannot be read or parsed, a setting is unknown or of the wrong type.
    """
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        if section is not None:
            sub = data.get(section, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
            table = sub
        else:
            table = data
    table = _merge(table, _env_overrides(cls, env_prefix, os.environ if env is None else env))
    return _build(cls, table, section or "")
