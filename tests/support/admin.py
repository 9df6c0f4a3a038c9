"""Running ``cleanroom admin`` against a real broker process, as an operator or a party
would, and the environment that points it at one."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cleanroom.app.cli import main
from pki.ca import PkiLayout


def approve_argv(name: str = "w", key: str = "k", *recipients: str) -> list[str]:
    """``workload approve --name NAME --key KEY --recipient R...`` (recipient ``p`` by default)."""
    return [
        "workload",
        "approve",
        "--name",
        name,
        "--key",
        key,
        "--recipient",
        *(recipients or ("p",)),
    ]


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


def admin_env(
    pki: PkiLayout, address: str, kind: str = "operator", name: str = ""
) -> dict[str, str]:
    """The environment that points ``cleanroom admin`` at the broker at ``address`` as the
    identity ``kind``/``name`` of ``pki``, with no other ``CLEANROOM_`` variable."""
    cert, key = pki.cert_and_key(kind, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env.update(
        CLEANROOM_ADMIN_BROKER=address,
        CLEANROOM_ADMIN_CERT=str(cert),
        CLEANROOM_ADMIN_KEY=str(key),
        CLEANROOM_ADMIN_CA=str(pki.ca_cert),
    )
    return env


def use_admin_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Sets the ``CLEANROOM_ADMIN_*`` variables of ``env`` (see :func:`admin_env`) in this
    process, so in-process ``cleanroom admin`` calls reach that broker as that identity."""
    for k, v in env.items():
        if k.startswith("CLEANROOM_ADMIN_"):
            monkeypatch.setenv(k, v)
