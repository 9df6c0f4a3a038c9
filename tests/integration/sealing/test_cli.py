"""``cleanroom keygen``, ``seal`` and ``open`` as a user runs them: the installed command."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import run_cleanroom as run


def ok(*args: str | Path, cwd: Path, stdin: bytes | None = None) -> bytes:
    res = run(*args, cwd=cwd, stdin=stdin)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout


def one_error_line(res: subprocess.CompletedProcess[bytes]) -> str:
    assert res.returncode != 0
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cleanroom: error: ")
    assert "Traceback" not in res.stderr.decode()
    return lines[0]


@pytest.fixture
def party_keys(tmp_path: Path) -> Path:
    ok("keygen", "--out", "alice", cwd=tmp_path)
    ok("keygen", "--out", "bob", "--kem", "mlkem768-x25519", cwd=tmp_path)
    ok("keygen", "--out", "eve", cwd=tmp_path)
    return tmp_path


def test_keygen_writes_private_key_0600_and_prints_fingerprint(tmp_path: Path) -> None:
    out = ok("keygen", "--out", "carol", cwd=tmp_path).decode()
    assert stat.S_IMODE((tmp_path / "carol.key").stat().st_mode) == 0o600
    assert (tmp_path / "carol.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    fingerprint = out.split()[0]
    assert len(fingerprint) == 16
    # A second run refuses to overwrite, with one clear line.
    line = one_error_line(run("keygen", "--out", "carol", cwd=tmp_path))
    assert "already exists" in line
    ok("keygen", "--out", "carol", "--force", cwd=tmp_path)
    assert ok("keygen", "--out", "dave", cwd=tmp_path).split()[0] != fingerprint.encode()


def test_two_recipients_each_open_a_third_cannot(party_keys: Path) -> None:
    d = party_keys
    data = os.urandom(3 * 65536 + 123)
    (d / "data.csv").write_bytes(data)
    ok("seal", "-r", "alice.pub", "-r", "bob.pub", "--chunk-size", "64K", "data.csv",
       "-o", "data.sealed", cwd=d)  # fmt: skip
    assert data not in (d / "data.sealed").read_bytes()

    ok("open", "-k", "alice.key", "data.sealed", "-o", "by-alice", cwd=d)
    ok("open", "-k", "bob.key", "data.sealed", "-o", "by-bob", cwd=d)
    assert (d / "by-alice").read_bytes() == data
    assert (d / "by-bob").read_bytes() == data

    before = sorted(p.name for p in d.iterdir())
    line = one_error_line(run("open", "-k", "eve.key", "data.sealed", "-o", "by-eve", cwd=d))
    assert "not a recipient" in line
    assert sorted(p.name for p in d.iterdir()) == before  # no output, no temporary file


def test_stdin_to_stdout_with_data_key(party_keys: Path) -> None:
    d = party_keys
    data = os.urandom(200_000)
    sealed = ok("seal", "--key-id", "advertiser/2024", "--data-key-out", "dk", cwd=d, stdin=data)
    assert stat.S_IMODE((d / "dk").stat().st_mode) == 0o600
    assert len((d / "dk").read_bytes()) == 32
    assert ok("open", "--data-key", "dk", cwd=d, stdin=sealed) == data
    assert ok("open", "--data-key", "dk", "-", "-o", "-", cwd=d, stdin=sealed) == data
    # The same data key seals another file under the same id.
    again = ok("seal", "--key-id", "advertiser/2024", "--data-key", "dk", "-r", "alice.pub",
               cwd=d, stdin=b"more")  # fmt: skip
    assert ok("open", "-k", "alice.key", cwd=d, stdin=again) == b"more"
    assert ok("open", "--data-key", "dk", cwd=d, stdin=again) == b"more"


def test_generated_key_id_is_reported(party_keys: Path) -> None:
    res = run("seal", "-r", "alice.pub", cwd=party_keys, stdin=b"x")
    assert res.returncode == 0
    assert res.stderr.decode().startswith("cleanroom: key id ")


def test_tampered_file_leaves_no_output(party_keys: Path) -> None:
    d = party_keys
    (d / "in").write_bytes(os.urandom(300_000))
    ok("seal", "-r", "alice.pub", "--chunk-size", "64K", "in", "-o", "in.sealed", cwd=d)
    b = bytearray((d / "in.sealed").read_bytes())
    b[-70_000] ^= 0x01  # inside the fourth segment
    (d / "bad.sealed").write_bytes(bytes(b))
    before = sorted(p.name for p in d.iterdir())
    line = one_error_line(run("open", "-k", "alice.key", "bad.sealed", "-o", "out", cwd=d))
    assert "failed authentication" in line
    assert sorted(p.name for p in d.iterdir()) == before


def test_truncated_stream_on_stdout_exits_non_zero(party_keys: Path) -> None:
    d = party_keys
    sealed = ok("seal", "-r", "alice.pub", "--chunk-size", "16K", cwd=d, stdin=os.urandom(100_000))
    res = run("open", "-k", "alice.key", cwd=d, stdin=sealed[:-20_000])
    line = one_error_line(res)
    assert "truncated" in line


def test_seal_needs_someone_to_open(party_keys: Path) -> None:
    line = one_error_line(run("seal", cwd=party_keys, stdin=b"x"))
    assert "nobody could open" in line


def test_bad_inputs_give_one_line(party_keys: Path) -> None:
    d = party_keys
    (d / "plain.txt").write_text("not sealed")
    assert "bad magic" in one_error_line(run("open", "-k", "alice.key", "plain.txt", cwd=d))
    assert "public key file" in one_error_line(run("open", "-k", "alice.pub", "plain.txt", cwd=d))
    assert "cannot open" in one_error_line(run("seal", "-r", "alice.pub", "missing", cwd=d))
    assert "cannot read" in one_error_line(run("seal", "-r", "nobody.pub", cwd=d, stdin=b""))
    # An existing --data-key-out file is never overwritten, and nothing is sealed.
    (d / "dk").write_bytes(b"precious")
    res = run("seal", "--data-key-out", "dk", "-o", "out", cwd=d, stdin=b"x")
    assert "already exists" in one_error_line(res)
    assert (d / "dk").read_bytes() == b"precious"
    assert not (d / "out").exists()


def test_failed_seal_removes_new_data_key_file(party_keys: Path) -> None:
    d = party_keys
    res = run("seal", "--data-key-out", "dk", "missing-input", "-o", "out", cwd=d)
    assert "cannot open" in one_error_line(res)
    assert not (d / "dk").exists()
    assert not (d / "out").exists()
