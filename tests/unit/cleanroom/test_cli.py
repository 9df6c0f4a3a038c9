"""The ``cleanroom`` dispatcher: which groups it builds for a command, and what help shows."""

from __future__ import annotations

import argparse
import importlib

import pytest

from cleanroom.app import cli

ALL_COMMANDS = {name for _, names in cli._GROUPS for name in names}


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.mark.parametrize("group", cli._GROUPS, ids=lambda g: g[0])
def test_each_group_registers_exactly_the_commands_it_is_listed_with(
    group: tuple[str, tuple[str, ...]],
) -> None:
    module, names = group
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    assert set(sub.choices) == set(names)


def test_a_known_command_builds_only_its_own_group() -> None:
    assert _commands(cli.build_parser("sidecar")) == {"sidecar"}
    assert _commands(cli.build_parser("open")) == {"keygen", "seal", "open"}


@pytest.mark.parametrize("command", [None, "no-such-command"])
def test_without_a_known_command_every_group_is_built(command: str | None) -> None:
    assert _commands(cli.build_parser(command)) == ALL_COMMANDS
    assert len(ALL_COMMANDS) == sum(len(names) for _, names in cli._GROUPS)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["sidecar", "run", "--", "python", "x.py"], "sidecar"),
        (["-v", "-v", "admin", "ak", "list"], "admin"),
        (["--verbose", "seal", "--help"], "seal"),
        (["--help"], None),
        ([], None),
        (["--", "broker"], None),
    ],
)
def test_the_command_is_the_first_argument_that_is_not_an_option(
    argv: list[str], command: str | None
) -> None:
    assert cli._command_of(argv) == command


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ALL_COMMANDS:
        assert name in out


def test_a_mistyped_command_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["sidcar", "run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sidcar'" in err
    for name in ALL_COMMANDS:
        assert f"'{name}'" in err


def test_a_group_help_works_after_global_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["-v", "sidecar", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cleanroom sidecar" in out
    assert "run" in out
