"""A broker configuration with its metrics listener (health, readiness, metrics) on loopback,
for the tests that probe it."""

from __future__ import annotations

from pathlib import Path

from pki.ca import PkiLayout

TD = "cleanroom.local"


def write_config(path: Path, pki: PkiLayout, database_url: str) -> Path:
    cert, key = pki.cert_and_key("broker")
    path.write_text(
        "\n".join(
            [
                "[broker]",
                f'database_url = "{database_url}"',
                f'state_dir = "{path.parent / "state"}"',
                f'trust_domain = "{TD}"',
                "[broker.tls]",
                'listen = "127.0.0.1:0"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
                f'ca_file = "{pki.ca_cert}"',
                "[broker.metrics]",
                'listen = "127.0.0.1:0"',
            ]
        )
        + "\n"
    )
    return path
