"""The configuration loader: tables keyed by free names (``dict[str, X]`` fields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cleanroom.config import ConfigError, load_config


@dataclass(frozen=True)
class Limits:
    per_party: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    name: str = "x"
    aliases: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(Settings, path, env_prefix="T", section="s", env=env or {})


def test_a_table_of_strings_and_a_nested_table_of_integers(tmp_path: Path) -> None:
    s = _load(
        tmp_path,
        '[s.aliases]\nadvertiser = "a"\n"pub.lisher" = "b"\n[s.limits.per_party]\nadvertiser = 3\n',
    )
    assert s.aliases == {"advertiser": "a", "pub.lisher": "b"}
    assert s.limits.per_party == {"advertiser": 3}


def test_the_environment_gives_name_value_pairs_and_replaces_the_table(tmp_path: Path) -> None:
    s = _load(
        tmp_path,
        '[s.aliases]\nadvertiser = "a"\n',
        env={
            "T_ALIASES": "publisher=azurekv:https://v/keys/k, other = b,",
            "T_LIMITS_PER_PARTY": "x=0x10",
        },
    )
    assert s.aliases == {"publisher": "azurekv:https://v/keys/k", "other": "b"}
    assert s.limits.per_party == {"x": 16}
    assert _load(tmp_path, "", env={"T_ALIASES": ""}).aliases == {}


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[s]\naliases = "a"\n', {}, "s.aliases: expected name=value pairs"),
        ("[s]\naliases = [1]\n", {}, "s.aliases: expected a table"),
        ("[s.aliases]\na = 1\n", {}, "s.aliases.a: expected a string"),
        ('[s.limits.per_party]\na = "many"\n', {}, "s.limits.per_party.a: expected an integer"),
        ("", {"T_ALIASES": "=x"}, "expected name=value pairs"),
        ("", {"T_ALIASES": "novalue"}, "expected name=value pairs"),
    ],
)
def test_malformed_tables_are_refused(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text, env)


def test_only_string_keys_are_supported() -> None:
    @dataclass(frozen=True)
    class Bad:
        table: dict[int, str] = field(default_factory=dict)

    with pytest.raises(ConfigError, match="only tables keyed by strings"):
        load_config(Bad, None, env_prefix="T", env={"T_TABLE": "1=a"})
