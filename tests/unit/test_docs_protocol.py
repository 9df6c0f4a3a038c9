"""docs/protocol.md describes every RPC of the three services, with the callers the broker's
authorization table actually allows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker.server import authz
from cleanroom.v1 import admin_pb2, attestation_pb2, workload_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    start = PROTOCOL.index(f"\n## {heading}")
    end = PROTOCOL.find("\n## ", start + 1)
    return PROTOCOL[start : end if end != -1 else len(PROTOCOL)]


def _table_rows(section: str) -> dict[str, list[str]]:
    """First-column RPC name -> the row's cells, for rows whose first cell is `Name`."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([A-Za-z]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m[1]] = [c.strip() for c in m[2].split("|")]
    return rows


def _methods(module: object, service: str) -> set[str]:
    descriptor = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return {m.name for m in descriptor.methods}


def test_every_admin_rpc_has_a_row_and_nothing_else_does() -> None:
    rows = _table_rows(_section("AdminService"))
    assert set(rows) == _methods(admin_pb2, "AdminService")


@pytest.mark.parametrize("method", sorted(_methods(admin_pb2, "AdminService")))
def test_the_documented_callers_of_an_admin_rpc_are_the_authorized_ones(method: str) -> None:
    caller = _table_rows(_section("AdminService"))[method][0]
    documented = {role for role in ("operator", "party") if role in caller}
    allowed = authz.RULES[f"/{authz.ADMIN_SERVICE}/{method}"]
    assert documented == set(allowed), (method, caller)


def test_the_role_table_lists_every_operator_and_party_method() -> None:
    roles = _section("Identity and roles")
    operator_row = next(line for line in roles.splitlines() if line.startswith("| `/operator`"))
    party_row = next(line for line in roles.splitlines() if line.startswith("| `/party/"))
    for method in _methods(admin_pb2, "AdminService"):
        allowed = authz.RULES[f"/{authz.ADMIN_SERVICE}/{method}"]
        assert (f"`{method}`" in operator_row) == ("operator" in allowed), method
        assert (f"`{method}`" in party_row) == ("party" in allowed), method


def test_every_attestation_rpc_has_its_own_heading() -> None:
    headings = set(re.findall(r"^### ([A-Za-z]+)$", _section("AttestationService"), re.M))
    assert headings == _methods(attestation_pb2, "AttestationService")


def test_every_workload_rpc_has_a_row() -> None:
    rows = _table_rows(_section("WorkloadService"))
    assert set(rows) == _methods(workload_pb2, "WorkloadService")
