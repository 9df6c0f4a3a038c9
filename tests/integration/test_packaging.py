"""What a wheel installs: the broker's database drivers, numpy and the Azure SDKs only through
optional groups, and a virtualenv with nothing but the base dependencies (the ``sidecar`` group)
runs the sidecar's and the workload SDK's import paths.

The wheel is built with pip from this tree; the fresh virtualenv gets it with ``--no-deps`` and
then the base requirements read from the wheel's own METADATA, which pip takes from its cache
and the local wheel directories (PyPI only for what they lack).
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Distributions that must never be a base requirement (normalized names).
HEAVY = {
    "numpy",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "prometheus-client",
    "grpcio-reflection",
    "azure-core",
    "azure-storage-blob",
    "azure-keyvault-keys",
    "azure-identity",
    "pandas",
    "scikit-learn",
}


def _name(requirement: str) -> str:
    head = requirement.split(";")[0].strip()
    for sep in "[<>=!~ ":
        head = head.split(sep)[0]
    return head.lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("cleanroom_broker-*.whl")
    return built


def metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode().splitlines()


def requirements(wheel: Path) -> tuple[list[str], dict[str, set[str]]]:
    """(base requirements, extra -> the distribution names it adds)."""
    base: list[str] = []
    extras: dict[str, set[str]] = {}
    for line in metadata(wheel):
        if line.startswith("Provides-Extra: "):
            extras.setdefault(line.split(": ", 1)[1].strip(), set())
        if not line.startswith("Requires-Dist: "):
            continue
        req = line.split(": ", 1)[1]
        if "extra ==" in req:
            extra = req.split("extra ==")[1].strip().strip("'\"")
            extras.setdefault(extra, set()).add(_name(req))
        else:
            base.append(req)
    return base, extras


def test_heavy_dependencies_come_only_through_extras(wheel: Path) -> None:
    base, extras = requirements(wheel)
    assert not {_name(r) for r in base} & HEAVY, base
    assert {"sqlalchemy", "alembic", "psycopg", "prometheus-client"} <= extras["broker"]
    assert {"azure-core", "azure-storage-blob", "azure-keyvault-keys", "azure-identity"} <= (
        extras["azure"]
    )
    assert "numpy" in extras["example"]
    assert "sidecar" in extras and not extras["sidecar"] & HEAVY


@pytest.fixture(scope="module")
def sidecar_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sidecar-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    base, extras = requirements(wheel)
    sidecar = [r.split(";")[0] for r in base] + sorted(extras["sidecar"])
    subprocess.run([*pip, *sidecar], check=True, capture_output=True, timeout=600)
    yield root


def test_a_sidecar_only_virtualenv_runs_the_sidecar(sidecar_venv: Path) -> None:
    python = str(sidecar_venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    names = {_name(line) for line in installed.splitlines()}
    assert not names & HEAVY, names & HEAVY
    probe = (
        "import sidecar.cli, sidecar.run, sidecar.run.runner, sidecar.attester, "
        "sidecar.dataplane.server, workload, workload.client; print('imported')"
    )
    res = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "imported", res.stderr
    cleanroom = str(sidecar_venv / "bin" / "cleanroom")
    for args in (["sidecar", "--help"], ["sidecar", "run", "--help"], ["--help"]):
        res = subprocess.run(
            [cleanroom, *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert res.returncode == 0, (args, res.stderr)
    # A broker command says which group it needs, in one line.
    res = subprocess.run(
        [cleanroom, "broker", "init", "--config", str(sidecar_venv / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "optional dependency group 'broker'" in res.stderr, res.stderr
