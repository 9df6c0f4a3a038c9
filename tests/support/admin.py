"""Running cleanroom admin against a real broker process, as an operator or a party would."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cleanroom.app.cli import main


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs ``cleanroom admin ARGV`` in-process; it must succeed. Returns stdout."""
    code = main(["admin", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def admin_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(admin(capsys, "--json", *argv))


def admin_fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs ``cleanroom admin ARGV`` in-process; it must fail with one line. Returns it."""
    code = main(["admin", *argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("cleanroom: error: ") and err.count("\n") == 1, err
    return err
