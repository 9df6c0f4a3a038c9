"""The protobuf contract's own checks, as scripts/check_protos.sh runs them: buf lint and
buf breaking against the released v1 baseline (.ci/proto-baseline.json)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BUF = Path(sys.executable).parent / "buf"
BASELINE = ROOT / ".ci" / "proto-baseline.json"


def _buf(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def module_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def test_the_contract_as_committed_is_compatible_with_the_baseline() -> None:
    result = _buf(ROOT, "breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_removing_a_field_is_a_breaking_change(module_copy: Path) -> None:
    proto = module_copy / "protos" / "cleanroom" / "v1" / "attestation.proto"
    text = proto.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    # Drop the first field of the first message (whatever it is called today).
    start = next(i for i, line in enumerate(lines) if line.startswith("message "))
    field = next(
        i
        for i in range(start + 1, len(lines))
        if lines[i].rstrip().endswith(";") and "=" in lines[i]
    )
    removed = lines[field].strip()
    proto.write_text("".join(lines[:field] + lines[field + 1 :]), encoding="utf-8")

    result = _buf(module_copy, "breaking", "--against", str(BASELINE))
    assert result.returncode != 0, f"removing {removed!r} was not reported"
    assert "attestation.proto" in result.stdout + result.stderr


def test_adding_a_field_is_not_breaking(module_copy: Path) -> None:
    proto = module_copy / "protos" / "cleanroom" / "v1" / "common.proto"
    proto.write_text(
        proto.read_text(encoding="utf-8") + "\nmessage AddedLater {\n  string note = 1;\n}\n",
        encoding="utf-8",
    )
    assert _buf(module_copy, "lint").returncode == 0
    result = _buf(module_copy, "breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr
