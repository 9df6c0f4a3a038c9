"""``cleanroom sidecar run``'s command line: arguments, and the failures caught before the TPM
or the broker is contacted (one line, exit 1, nothing started)."""

from __future__ import annotations

import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cleanroom.app.cli import build_parser, main

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
        "cleanroom: error: no workload command: set [workload] command in the config (or give "
        "it after '--')"
    )


def test_failures_before_anything_is_contacted(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sidecar", "run", "--config", str(config), "--"]
    assert _error(capsys, [*base, "python3", "run.py"]) == (
        "cleanroom: error: workload command: the command's first word 'python3' must be an "
        "absolute path (such as /usr/bin/python3): the sidecar executes exactly the measured "
        "path and never searches PATH"
    )
    assert _error(capsys, [*base, "./run.py"]) == (
        "cleanroom: error: workload command: the command's first word './run.py' must be an "
        "absolute path (such as /usr/bin/./run.py): the sidecar executes exactly the measured "
        "path and never searches PATH"
    )
    assert _error(capsys, [*base, str(tmp_path / "wl" / "run.py")]) == (
        f"cleanroom: error: workload command {str(tmp_path / 'wl' / 'run.py')!r} is not executable"
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


def _write_certificate(path: Path) -> None:
    """A self-signed certificate: enough for the checks before the start, which only load it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidecar")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(Encoding.PEM))


def test_a_socket_path_too_long_fails_before_the_tpm_and_the_broker(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _write_certificate(tmp_path / "missing.crt")
    base = ["sidecar", "run", "--config", str(config), "--", sys.executable, "run.py"]
    # With a short socket directory the checks pass and the run goes on to the broker (whose
    # key file is missing, so it fails there).
    config.write_text(CONFIG + f'[runtime]\nsocket_dir = "{tmp_path / "s"}"\n')
    later = _error(capsys, base)
    assert later.startswith("cleanroom: error: cannot set up the broker connection"), later

    # A configured directory too long for a Unix socket address: one line, nothing created,
    # neither the TPM nor the broker used.
    long_dir = tmp_path / ("d" * 100)
    config.write_text(CONFIG + f'[runtime]\nsocket_dir = "{long_dir}"\n')
    assert _error(capsys, base) == (
        f"cleanroom: error: [runtime] socket_dir: socket path {long_dir / 'workload.sock'} is "
        "longer than 107 bytes; use a shorter directory"
    )
    assert not long_dir.exists()

    # No socket_dir: the fresh directory would go under a temporary directory that is too long.
    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    config.write_text(CONFIG)
    assert _error(capsys, base) == (
        f"cleanroom: error: the workload socket would be "
        f"{long_tmp / 'cleanroom-sidecar-XXXXXXXX' / 'workload.sock'} (a fresh directory under "
        f"{long_tmp}), too long for a Unix socket path; set [runtime] socket_dir to a shorter "
        "directory"
    )
    assert list(long_tmp.iterdir()) == []


def test_a_command_other_than_the_configured_one_is_refused_before_attesting(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(
        CONFIG.replace(
            'files = ["run.py"]', f'files = ["run.py"]\ncommand = ["{sys.executable}", "run.py"]'
        )
    )
    base = ["sidecar", "run", "--config", str(config), "--"]
    # The broker and the TPM in the config do not exist: refusing before them is the point.
    assert _error(capsys, [*base, sys.executable, "-c", "print(1)"]) == (
        f"cleanroom: error: the command after '--' ({sys.executable} -c 'print(1)') is not "
        f"[workload] command ({sys.executable} run.py): the sidecar runs only the configured "
        "command, which is what the parties approved; nothing was attested"
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('command = ["python3", "run.py"]', "[workload] the command's first word 'python3' must"),
        ('command = ["/usr/bin/python3"]\nenv = { "A=B" = "1" }', "'A=B' is not a valid"),
        (
            'command = ["/usr/bin/python3"]\nenv = { CLEANROOM_WORKLOAD_SOCKET = "/x" }',
            "CLEANROOM_WORKLOAD_SOCKET is set by the sidecar itself",
        ),
    ],
)
def test_a_malformed_workload_command_or_env_is_a_config_error(
    config: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    config.write_text(CONFIG.replace('files = ["run.py"]', f'files = ["run.py"]\n{setting}'))
    err = _error(capsys, ["sidecar", "run", "--config", str(config)])
    assert err.startswith(f"cleanroom: error: config file {config}: "), err
    assert message in err
