"""``cleanroom demo --azure-emulators`` end to end: the real command in a subprocess, with a real
swtpm, broker, sidecar, workload and Azurite, and the local Key Vault double.

On top of every check a plain demo passes (tests/integration/test_demo.py), it checks what the
Azure backends did, from the clean room's own records rather than the demo's words: the broker's
database says Key Vault keys wrap both data keys, the sidecar's configuration names blob URLs
for every input and output, and Azurite's log shows the blobs being written and read.
"""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path

import pytest

from tests.support.demo import check_completed_demo, processes_mentioning, run_demo, summary_rows

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]


def test_demo_with_azure_emulators_runs_end_to_end(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    proc = run_demo("--azure-emulators", "--rows", "300", "--dir", str(directory), cwd=tmp_path)
    check_completed_demo(proc, directory)
    rows = summary_rows(proc.stdout)

    # The summary names both backends.
    assert rows["blob storage"].startswith("Azure Blob via Azurite (the storage emulator, ")
    assert "sealed inputs in advertiser-in, publisher-in" in rows["blob storage"]
    assert rows["key custody"].startswith("Azure Key Vault via the local test double (https://")
    assert (
        "advertiser-data by Key Vault key advertiser-kek, "
        "publisher-data by Key Vault key publisher-kek; 2 Key Vault unwraps" in rows["key custody"]
    )

    # The narration says which backend each step used.
    out = proc.stdout
    assert "started Azurite, the Azure Storage emulator" in out
    assert "started the local Key Vault double" in out
    assert "imported the publisher's own Key Vault key publisher-kek as its KEK" in out
    for party in ("advertiser", "publisher"):
        said = [line for line in out.splitlines() if line.startswith(f"[{party}] ")]
        url = f"azure://devstoreaccount1/{party}-in/{party}.csv.sealed"
        assert any("sealed 300 rows" in x and x.endswith(f"(Azurite): {url}") for x in said)
        ref_start = f"stored wrapped by the Key Vault key {party}-kek (azurekv:https://127.0.0.1:"
        assert any(ref_start in x for x in said)
        assert any("downloaded insights.json" in x and "from Azure Blob" in x for x in said)
    assert "streamed the sealed inputs from Azure Blob (Azurite)" in out
    assert "into Azure Blob (Azurite): azure://devstoreaccount1/cleanroom-out/run/" in out

    # The broker's own records: both data keys wrapped by Key Vault keys, chosen two ways.
    with sqlite3.connect(directory / "broker" / "broker.db") as db:
        refs = dict(db.execute("SELECT key_id, kek_ref FROM data_keys").fetchall())
        imported = db.execute("SELECT party, kek_ref FROM party_keks").fetchall()
        releases = db.execute(
            "SELECT subject FROM audit_records WHERE action = 'key.release' AND decision = 'allow'"
        ).fetchall()
    assert set(refs) == {"advertiser-data", "publisher-data"}
    assert refs["advertiser-data"].startswith("azurekv:https://127.0.0.1:")
    assert refs["advertiser-data"].endswith("/keys/advertiser-kek")
    assert imported == [("publisher", refs["publisher-data"])]
    assert refs["publisher-data"].endswith("/keys/publisher-kek")
    assert sorted(s for (s,) in releases) == ["advertiser-data", "publisher-data"]
    broker_toml = tomllib.loads((directory / "broker.toml").read_text())
    assert broker_toml["broker"]["party_keks"] == {"advertiser": refs["advertiser-data"]}
    assert broker_toml["keyvault"]["credential"] == "static-token"

    # The sidecar read and wrote blobs, and Azurite saw it.
    sidecar = tomllib.loads((directory / "sidecar.toml").read_text())
    assert [i["url"] for i in sidecar["inputs"]] == [
        "azure://devstoreaccount1/advertiser-in/advertiser.csv.sealed",
        "azure://devstoreaccount1/publisher-in/publisher.csv.sealed",
    ]
    assert sidecar["outputs"]["directory"] == "azure://devstoreaccount1/cleanroom-out/run"
    assert not any((directory / "sealed").iterdir())  # no local copy of the sealed inputs
    assert (directory / "azurite").is_dir() and (directory / "logs" / "azurite.log").is_file()
    assert processes_mentioning(str(directory)) == []


def test_demo_with_azure_emulators_without_azurite_names_make_setup(tmp_path: Path) -> None:
    """Azurite missing: one clear line naming `make setup`, and nothing started."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env["CLEANROOM_AZURITE_BLOB"] = str(tmp_path / "no-azurite-here")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cleanroom.app.cli",
            "demo",
            "--azure-emulators",
            "--dir",
            str(tmp_path / "d"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("cleanroom: error: CLEANROOM_AZURITE_BLOB=")
    assert "run 'make setup' in the repository" in first
    assert not (tmp_path / "d" / "pki").exists()
