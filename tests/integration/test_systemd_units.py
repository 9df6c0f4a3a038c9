"""The systemd units of packaging/systemd pass ``systemd-analyze verify`` (no error and no
warning: an unknown or misspelt key is only a warning there), carry the hardening the
deployment relies on, and the sidecar's unit is the one docs/sidecar-run.md shows.

``systemd-analyze verify`` checks that each ``ExecStart`` program exists, so the units are
verified as copies whose ``/opt/cleanroom/venv/bin/cleanroom`` is this interpreter's
``cleanroom``; nothing else is changed. CI installs systemd (the Makefile's DEB_PACKAGES).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
INSTALLED = "/opt/cleanroom/venv/bin/cleanroom"
CLEANROOM = str(Path(sys.executable).parent / "cleanroom")
NAMES = [
    "cleanroom-broker.service",
    "cleanroom-broker-init.service",
    "cleanroom-sidecar-prepared.service",
    "cleanroom-workload.service",
]


def _settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            found.setdefault(m[1], []).append(m[2])
    return found


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the Debian package systemd (make deb)"
    units = sorted(UNITS.glob("*.service"))
    assert [u.name for u in units] == sorted(NAMES)
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, CLEANROOM))
    res = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr + res.stdout


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_is_hardened(name: str) -> None:
    s = _settings(UNITS / name)
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["PrivateTmp"] == ["yes"]
    assert s["User"] == ["cleanroom"]
    assert s["StateDirectory"] == ["cleanroom"]
    assert s["UMask"] == ["0077"]


def test_the_broker_and_the_sidecar_units() -> None:
    broker = _settings(UNITS / "cleanroom-broker.service")
    assert broker["ExecStart"][0].startswith(f"{INSTALLED} broker serve --config ")
    assert broker["RuntimeDirectory"] and broker["PrivateDevices"] == ["yes"]
    init = _settings(UNITS / "cleanroom-broker-init.service")
    assert [e.split()[1:3] for e in init["ExecStart"]] == [
        ["broker", "init"],
        ["broker", "migrate"],
    ]
    sidecar = _settings(UNITS / "cleanroom-workload.service")
    assert sidecar["ExecStart"][0].startswith(f"{INSTALLED} sidecar run --config ")
    # The workload's cgroup containment needs a delegated subtree (docs/sidecar-run.md).
    assert sidecar["Delegate"] == ["yes"]
    assert sidecar["SupplementaryGroups"] == ["tss"]  # /dev/tpmrm0
    assert sidecar["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert sidecar["RuntimeDirectory"] == ["cleanroom"]
    assert sidecar["KillMode"] == ["mixed"]


def test_docs_show_the_sidecar_unit_as_shipped() -> None:
    doc = (ROOT / "docs" / "sidecar-run.md").read_text()
    block = re.search(
        r"```ini\n# /etc/systemd/system/cleanroom-workload.service\n(.*?)```", doc, re.S
    )
    assert block, "docs/sidecar-run.md no longer shows the unit"
    shipped = (UNITS / "cleanroom-workload.service").read_text().split("\n", 1)[1]
    assert block[1] == shipped


def test_the_prepared_sidecar_unit() -> None:
    prepared = _settings(UNITS / "cleanroom-sidecar-prepared.service")
    assert prepared["ExecStart"] == [
        f"{INSTALLED} sidecar serve --config /etc/cleanroom/sidecar.toml "
        "--control /run/cleanroom-sidecar/control"
    ]
    # The control socket's directory is private (the server checks it is 0700 and its own).
    assert prepared["RuntimeDirectory"] == ["cleanroom-sidecar"]
    assert prepared["RuntimeDirectoryMode"] == ["0700"]
    # Runs are forked from it: their workloads need the delegated cgroup, the TPM its group.
    assert prepared["Delegate"] == ["yes"]
    assert prepared["SupplementaryGroups"] == ["tss"]
