"""``cleanroom seal``/``open`` with blob URLs, as a party runs them, against Azurite."""

from __future__ import annotations

import os
from pathlib import Path

from tests.harness.azurite import Azurite
from tests.support.cli import run_cleanroom as run


def test_seal_to_a_blob_and_open_from_it(
    azurite: Azurite, blob_container: str, tmp_path: Path
) -> None:
    env = {"CLEANROOM_BLOB_CONNECTION_STRING": azurite.connection_string()}
    assert run("keygen", "--out", "alice", cwd=tmp_path, env=env).returncode == 0
    plain = os.urandom(3 << 20) + b"tail"
    (tmp_path / "train.csv").write_bytes(plain)
    url = f"{blob_container}/advertiser/train.csv.sealed"
    sealed = run(
        "seal",
        "-r",
        "alice.pub",
        "--chunk-size",
        "64K",
        "train.csv",
        "-o",
        url,
        cwd=tmp_path,
        env=env,
    )
    assert sealed.returncode == 0, sealed.stderr.decode()
    opened = run("open", "-k", "alice.key", url, "-o", "out.csv", cwd=tmp_path, env=env)
    assert opened.returncode == 0, opened.stderr.decode()
    assert (tmp_path / "out.csv").read_bytes() == plain
    # The https form of the same blob, read from stdin-less to stdout.
    https_url = f"{azurite.account_url}/{url.split('/', 3)[3]}"
    piped = run("open", "-k", "alice.key", https_url, cwd=tmp_path, env=env)
    assert piped.returncode == 0 and piped.stdout == plain


def test_blob_failures_are_one_line_without_secrets(
    azurite: Azurite, blob_container: str, tmp_path: Path
) -> None:
    env = {"CLEANROOM_BLOB_CONNECTION_STRING": azurite.connection_string()}
    assert run("keygen", "--out", "alice", cwd=tmp_path, env=env).returncode == 0
    missing = run("open", "-k", "alice.key", f"{blob_container}/nothing", cwd=tmp_path, env=env)
    assert missing.returncode == 1
    lines = missing.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "the blob does not exist" in lines[0], lines
    no_container = run(
        "seal",
        "-r",
        "alice.pub",
        "-o",
        "azure://devstoreaccount1/no-such/x",
        cwd=tmp_path,
        env=env,
        stdin=b"data",
    )
    assert no_container.returncode == 1
    assert "the container does not exist" in no_container.stderr.decode()
    sas = run(
        "open",
        "-k",
        "alice.key",
        f"{azurite.account_url}/nope/x?sv=1&sig=TOPSECRET",
        cwd=tmp_path,
        env=env,
    )
    assert sas.returncode == 1 and "TOPSECRET" not in sas.stderr.decode()
    assert azurite.account_key not in (missing.stderr + no_container.stderr).decode()
