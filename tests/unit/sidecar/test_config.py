"""TpmConfig: defaults, TOML and environment loading, TCTI precedence, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom.config import ConfigError
from sidecar.config import DEFAULT_TCTI, TpmConfig, load_tpm_config


def test_defaults() -> None:
    config = TpmConfig()
    assert config.tcti == "device:/dev/tpmrm0"
    assert (config.ek_algorithm, config.ak_algorithm) == ("rsa", "rsa")
    assert config.ak_handle == 0x81010002 and config.ak_context_file is None
    assert config.banks == ("sha1", "sha256") and config.extra_pcrs == ()
    assert config.quoted_pcrs == (23,)
    assert TpmConfig(extra_pcrs=(7, 0, 23, 7)).quoted_pcrs == (0, 7, 23)


def test_loads_the_tpm_table_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        "[tpm]\n"
        'tcti = "swtpm:host=127.0.0.1,port=2321"\n'
        'ak_algorithm = "ecc"\n'
        "ak_handle = 0x81010010\n"
        'banks = ["sha256"]\n'
        "extra_pcrs = [0, 7]\n"
        "[other]\nx = 1\n"
    )
    config = load_tpm_config(path, env={"CLEANROOM_SIDECAR_TPM_EK_ALGORITHM": "ecc"})
    assert config == TpmConfig(
        tcti="swtpm:host=127.0.0.1,port=2321",
        ek_algorithm="ecc",
        ak_algorithm="ecc",
        ak_handle=0x81010010,
        banks=("sha256",),
        extra_pcrs=(0, 7),
    )
    env = {"CLEANROOM_SIDECAR_TPM_BANKS": "sha1,sha256", "CLEANROOM_SIDECAR_TPM_AK_HANDLE": "0"}
    env["CLEANROOM_SIDECAR_TPM_AK_CONTEXT_FILE"] = "/var/lib/sidecar/ak.blob"
    config = load_tpm_config(path, env=env)
    assert config.banks == ("sha1", "sha256") and config.ak_handle == 0
    assert config.ak_context_file == "/var/lib/sidecar/ak.blob"


def test_tcti_precedence(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text('[tpm]\ntcti = "from-file"\n')
    tools = {"TPM2TOOLS_TCTI": "from-tools"}
    assert load_tpm_config(env={}).tcti == DEFAULT_TCTI
    assert load_tpm_config(env=tools).tcti == "from-tools"
    assert load_tpm_config(path, env=tools).tcti == "from-file"
    both = {**tools, "CLEANROOM_SIDECAR_TPM_TCTI": "from-env"}
    assert load_tpm_config(path, env=both).tcti == "from-env"
    assert load_tpm_config(path, tcti="from-flag", env=both).tcti == "from-flag"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('ak_algorithm = "dsa"', "ak_algorithm must be 'rsa' or 'ecc', got 'dsa'"),
        ('ek_algorithm = "ec"', "ek_algorithm must be 'rsa' or 'ecc'"),
        ('banks = ["md5"]', "unsupported PCR bank 'md5'"),
        ("banks = []", "at least one PCR bank"),
        ('banks = ["sha1", "sha1"]', "must not repeat"),
        ("ak_handle = 0", "ak_handle 0 needs ak_context_file"),
        ("ak_handle = 0x80000001", "0x80000001 is not a persistent handle"),
        ("extra_pcrs = [24]", "PCR 24 is outside 0..23"),
        ('tcti = ""', "tcti must not be empty"),
        ("ak_handel = 1", "unknown setting"),
        ("ak_handle = true", "expected an integer"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(f"[tpm]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_tpm_config(path, env={})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path / "nope.toml")):
        load_tpm_config(tmp_path / "nope.toml", env={})
