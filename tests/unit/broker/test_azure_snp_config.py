"""``[broker.azure_snp]``: settings load from TOML, bad values are refused at start, and extra
roots come only from configured files."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.azure_snp import SnpGate
from broker.config import AzureSnpConfig, load_broker_config
from broker.errors import BrokerConfigError, SnpMalformedError, SnpPolicyError
from cleanroom.config import ConfigError
from tests.harness.amd_snp import SyntheticAmdRoot


def test_loaded_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        "[broker.azure_snp]\n"
        "required = true\n"
        f'allowed_measurements = ["{"ab" * 48}"]\n'
        "[broker.azure_snp.min_tcb]\n"
        "snp = 24\n"
        "microcode = 219\n"
        "[broker.azure_snp.require_vm_configuration]\n"
        '"secure-boot" = true\n'
        '"console-enabled" = false\n'
    )
    snp = load_broker_config(path).azure_snp
    assert snp.required and snp.min_tcb == {"snp": 24, "microcode": 219}
    assert snp.require_vm_configuration == {"secure-boot": True, "console-enabled": False}


def test_defaults_are_safe() -> None:
    c = AzureSnpConfig()
    assert not c.allow_debug and c.max_vmpl == 0
    assert c.require_vm_configuration == {"secure-boot": True}


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"allowed_measurements": ("ab",)}, "48 bytes of hex"),
        ({"allowed_measurements": ("zz" * 48,)}, "48 bytes of hex"),
        ({"min_tcb": {"firmware": 1}}, "unknown component"),
        ({"min_tcb": {"snp": 300}}, "0..255"),
        ({"max_vmpl": 4}, "0..3"),
    ],
)
def test_bad_settings_are_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        AzureSnpConfig(**fields)  # type: ignore[arg-type]


def test_extra_roots_only_from_files(tmp_path: Path) -> None:
    gate = SnpGate.from_config(AzureSnpConfig())
    assert gate.roots.products == ("Milan", "Genoa", "Turin")
    root = tmp_path / "root.pem"
    root.write_bytes(SyntheticAmdRoot(product="Lab").pem())
    gate = SnpGate.from_config(AzureSnpConfig(trusted_root_files=(str(root),)))
    assert gate.roots.products == ("Milan", "Genoa", "Turin", "Lab")


@pytest.mark.parametrize("content", [None, b"not pem"])
def test_unusable_root_file_stops_the_start(tmp_path: Path, content: bytes | None) -> None:
    root = tmp_path / "root.pem"
    if content is not None:
        root.write_bytes(content)
    with pytest.raises(BrokerConfigError, match="azure_snp root file"):
        SnpGate.from_config(AzureSnpConfig(trusted_root_files=(str(root),)))


def test_gate_without_evidence() -> None:
    assert (
        SnpGate.from_config(AzureSnpConfig()).check(
            hcl_report=b"", vcek=b"", ak=None, qualifying_data=b"q"
        )
        is None
    )
    with pytest.raises(SnpPolicyError, match="required"):
        SnpGate.from_config(AzureSnpConfig(required=True)).check(
            hcl_report=b"", vcek=b"", ak=None, qualifying_data=b"q"
        )
    with pytest.raises(SnpMalformedError, match="together"):
        SnpGate.from_config(AzureSnpConfig()).check(
            hcl_report=b"HCLA", vcek=b"", ak=None, qualifying_data=b"q"
        )
