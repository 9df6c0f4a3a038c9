"""``cleanroom sidecar run``'s command line: arguments, and the failures caught before the TPM
or the broker is contacted (one line, exit 1, nothing started)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cleanroom.cli import build_parser, main

CONFIG = """\
[tpm]
tcti = "swtpm:host=127.0.0.1,port=1"
[broker]
target = "127.0.0.1:1"
cert_file = "missing.crt"
key_file = "missing.key"
ca_file = "missing-ca.crt"
[workload]
root = "wl"
files = ["run.py"]
[[inputs]]
name = "a"
url = "sealed/a.sealed"
key_id = "a-key"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "wl").mkdir()
    (tmp_path / "wl" / "run.py").write_text("print('ran')\n")
    (tmp_path / "sealed").mkdir()
    (tmp_path / "sealed" / "a.sealed").write_bytes(b"x")
    path = tmp_path / "sidecar.toml"
    path.write_text(CONFIG)
    return path


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_the_command_follows_the_double_dash() -> None:
    args = build_parser().parse_args(
        ["sidecar", "run", "--config", "s.toml", "--tcti", "t", "--", "python", "-v", "--x"]
    )
    assert (args.config, args.tcti) == ("s.toml", "t")
    assert args.command == ["--", "python", "-v", "--x"]
    # The group's options work before the subcommand too.
    args = build_parser().parse_args(["sidecar", "--config", "s.toml", "run", "--", "w"])
    assert args.config == "s.toml"


def test_config_and_command_are_required(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(capsys, ["sidecar", "run", "--", "true"]) == (
        "cleanroom: error: sidecar run needs --config FILE (sidecar.toml; see docs/sidecar-run.md)"
    )
    assert _error(capsys, ["sidecar", "run", "--config", str(config), "--"]) == (
        "cleanroom: error: sidecar run needs the workload command after '--'"
    )


def test_failures_before_anything_is_contacted(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sidecar", "run", "--config", str(config), "--"]
    assert _error(capsys, [*base, "no-such-workload-binary-x"]) == (
        "cleanroom: error: workload command 'no-such-workload-binary-x' is not found on PATH"
    )
    assert _error(capsys, [*base, "./run.py"]) == (
        "cleanroom: error: workload command './run.py' is not an executable file"
    )
    (tmp_path / "sealed" / "a.sealed").unlink()
    assert _error(capsys, [*base, sys.executable, "run.py"]) == (
        f"cleanroom: error: input 'a': {tmp_path / 'sealed' / 'a.sealed'} does not exist"
    )
    (tmp_path / "sealed" / "a.sealed").write_bytes(b"x")
    err = _error(capsys, [*base, sys.executable, "run.py"])
    assert err.startswith(f"cleanroom: error: sidecar certificate {tmp_path / 'missing.crt'}")
    config.write_text(CONFIG.replace('root = "wl"', 'root = "nowhere"'))
    assert _error(capsys, [*base, sys.executable, "run.py"]) == (
        f"cleanroom: error: workload root {tmp_path / 'nowhere'} is not a directory"
    )
    config.write_text(CONFIG + "[bogus]\n")
    assert _error(capsys, [*base, sys.executable, "run.py"]) == (
        f"cleanroom: error: config file {config}: unknown setting(s): bogus"
    )
