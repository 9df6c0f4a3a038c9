"""Small things an operator meets at the command line, each run through the installed command:
``-v`` after the subcommand, ``open | head`` ending quietly, ``keygen`` naming its private key,
``seal`` saying what it did when stderr is not a terminal, the ``--data-key`` hint, and the
Azure SDK's HTTP logging only at ``-vv``."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from tests.support.cli import CLEANROOM
from tests.support.cli import run_cleanroom as run


def test_verbose_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    # keygen logs nothing at WARNING; at -vv (debug) the CLI's debug logs would show, so what
    # is checked is that the option parses at every depth and counts.
    for args in (
        ("keygen", "--out", "a", "-v"),
        ("keygen", "-vv", "--out", "b"),
        ("pki", "init", "--out", "pki", "-v"),
    ):
        res = run(*args, cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr.decode())
    from cleanroom.app.cli import build_parser

    parsed = build_parser("admin").parse_args(["-v", "admin", "ak", "list", "-v"])
    assert parsed.verbose >= 1
    parsed = build_parser("admin").parse_args(["admin", "ak", "list", "-vv"])
    assert parsed.verbose == 2


def test_sidecar_run_keeps_a_workloads_own_v(tmp_path: Path) -> None:
    from cleanroom.app.cli import build_parser

    parsed = build_parser("sidecar").parse_args(
        ["sidecar", "run", "--config", "s.toml", "/usr/bin/python3", "-v"]
    )
    assert parsed.command[-1] == "-v" and parsed.verbose == 0


def test_open_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(os.urandom(4 << 20))
    assert run("keygen", "--out", "alice", cwd=tmp_path).returncode == 0
    assert run("seal", "-r", "alice.pub", "data", "-o", "data.sealed", cwd=tmp_path).returncode == 0
    # `cleanroom open ... | head -c 10`: head exits after 10 bytes and closes the pipe.
    shell = (
        f"{CLEANROOM} open -k alice.key data.sealed | head -c 10 >/dev/null; "
        "echo ${PIPESTATUS[0]}"
    )
    res = subprocess.run(
        ["bash", "-c", shell], cwd=tmp_path, capture_output=True, timeout=60, check=False
    )
    assert res.stderr.decode() == ""
    assert res.stdout.decode().strip() in ("0", "141")


def test_keygen_names_the_private_key_file(tmp_path: Path) -> None:
    res = run("keygen", "--out", "carol", cwd=tmp_path)
    assert res.returncode == 0
    line = res.stdout.decode().strip()
    assert line.endswith("private key carol.key") and "carol.pub" in line


def test_seal_without_a_terminal_prints_one_summary_line(tmp_path: Path) -> None:
    assert run("keygen", "--out", "alice", cwd=tmp_path).returncode == 0
    (tmp_path / "in").write_bytes(b"x" * 1000)
    res = run("seal", "-r", "alice.pub", "--key-id", "k1", "in", "-o", "in.sealed", cwd=tmp_path)
    assert res.returncode == 0
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cleanroom: sealed 1000 bytes to in.sealed (key id k1; recipients ")


def test_opening_a_data_key_only_file_with_k_suggests_data_key(tmp_path: Path) -> None:
    assert run("keygen", "--out", "alice", cwd=tmp_path).returncode == 0
    res = run("seal", "--data-key-out", "dk", "-o", "x.sealed", cwd=tmp_path, stdin=b"data")
    assert res.returncode == 0, res.stderr.decode()
    res = run("open", "-k", "alice.key", "x.sealed", cwd=tmp_path)
    assert res.returncode == 1
    err = res.stderr.decode().strip()
    assert err.count("\n") == 0 and "--data-key" in err, err


def test_azure_sdk_http_logging_only_at_vv() -> None:
    from cleanroom.app.cli import _quiet_azure_sdk

    policy = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    try:
        _quiet_azure_sdk(1)
        assert not policy.isEnabledFor(logging.INFO)
        assert policy.isEnabledFor(logging.WARNING)
        _quiet_azure_sdk(2)
        assert policy.isEnabledFor(logging.INFO)
    finally:
        logging.getLogger("azure").setLevel(logging.NOTSET)


def _bash_complete(tmp_path: Path, line: str) -> list[str]:
    """What bash offers for ``line`` with ``cleanroom completion bash`` sourced."""
    script = tmp_path / "cleanroom.bash"
    res = run("completion", "bash", cwd=tmp_path)
    assert res.returncode == 0, res.stderr.decode()
    script.write_bytes(res.stdout)
    words = line.split(" ")
    shell = (
        f"source {script}; "
        f"COMP_LINE='{line}'; COMP_POINT={len(line)}; COMP_CWORD={len(words) - 1}; "
        f"COMP_WORDS=({' '.join(words)}); COMP_TYPE=9; "
        f"_python_argcomplete cleanroom; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    bindir = str(Path(CLEANROOM).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", shell], cwd=tmp_path, capture_output=True, timeout=60, env=env, check=True
    )
    return sorted(w.strip() for w in out.stdout.decode().splitlines() if w.strip())


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    assert _bash_complete(tmp_path, "cleanroom adm") == ["admin"]
    assert "status" in _bash_complete(tmp_path, "cleanroom admin st")
    assert _bash_complete(tmp_path, "cleanroom broker mig") == ["migrate"]
    assert "--check" in _bash_complete(tmp_path, "cleanroom broker migrate --")


def test_zsh_completion_code_is_printed(tmp_path: Path) -> None:
    res = run("completion", "zsh", cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.startswith(b"#compdef cleanroom")
