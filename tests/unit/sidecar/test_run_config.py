"""sidecar.toml for ``sidecar run``: the documented layout, relative paths, the environment,
validation with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom.config import ConfigError
from sidecar.config import TpmConfig
from sidecar.dataplane.config import DataPlaneConfig
from sidecar.runconfig import (
    DEFAULT_BROKER_RETRIES,
    BrokerSettings,
    InputSettings,
    RunConfig,
    WorkloadSettings,
    load_run_config,
)

#: The layout the docs and the demo use, verbatim.
DOCUMENTED = """\
[tpm]            # sidecar.config.TpmConfig as it exists
tcti = "swtpm:host=127.0.0.1,port=2321"
[broker]
target = "127.0.0.1:50051"
cert_file = "pki/sidecar-sidecar-1.crt"
key_file = "pki/sidecar-sidecar-1.key"
ca_file = "pki/ca.crt"
server_name = "localhost"        # optional
retries = 5                      # connection retries with backoff before giving up
[workload]
name = "example"
root = "workload"                # files are measured relative to it, in order
files = ["run.py", "analysis.py"]
[[inputs]]
name = "advertiser"
url = "sealed/advertiser.csv.sealed"   # relative to the config file's directory, or a URL
key_id = "advertiser-data"
[outputs]
directory = "outputs"
[runtime]
state_dir = "sidecar-state"      # remembers the enrolled AK name
socket_dir = ""                  # default: a fresh private dir under $XDG_RUNTIME_DIR or /tmp
grace_seconds = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "sidecar.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_the_documented_layout_loads_with_paths_beside_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, DOCUMENTED)
    base = path.parent
    config = load_run_config(path, env={})
    assert config.tpm == TpmConfig(tcti="swtpm:host=127.0.0.1,port=2321")
    assert config.broker == BrokerSettings(
        target="127.0.0.1:50051",
        cert_file=str(base / "pki/sidecar-sidecar-1.crt"),
        key_file=str(base / "pki/sidecar-sidecar-1.key"),
        ca_file=str(base / "pki/ca.crt"),
        server_name="localhost",
        retries=5,
    )
    assert config.workload == WorkloadSettings(
        name="example", root=str(base / "workload"), files=("run.py", "analysis.py")
    )
    assert config.workload_files() == [base / "workload/run.py", base / "workload/analysis.py"]
    assert config.inputs == (
        InputSettings(
            name="advertiser",
            url=str(base / "sealed/advertiser.csv.sealed"),
            key_id="advertiser-data",
        ),
    )
    assert config.outputs.directory == str(base / "outputs")
    assert config.runtime.state_dir == str(base / "sidecar-state")
    assert config.runtime.socket_dir == ""
    assert config.runtime.grace_seconds == 10.0
    assert config.dataplane == DataPlaneConfig()
    assert config.key_ids() == ("advertiser-data",)


def test_urls_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = DOCUMENTED.replace(
        'url = "sealed/advertiser.csv.sealed"', 'url = "file:///data/adv.sealed"'
    ).replace('root = "workload"', 'root = "/opt/workload"')
    text += '[[inputs]]\nname = "p"\nurl = "https://acct.blob/x?sig=1"\nkey_id = "p"\n'
    config = load_run_config(_write(tmp_path, text), env={})
    assert [i.url for i in config.inputs] == [
        "file:///data/adv.sealed",
        "https://acct.blob/x?sig=1",
    ]
    assert config.workload.root == "/opt/workload"


def test_environment_overrides_and_tcti_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path, DOCUMENTED)
    env = {
        "CLEANROOM_SIDECAR_BROKER_TARGET": "broker.example:443",
        "CLEANROOM_SIDECAR_RUNTIME_GRACE_SECONDS": "2.5",
        "CLEANROOM_SIDECAR_TPM_TCTI": "device:/dev/tpmrm0x",
        "CLEANROOM_SIDECAR_DATAPLANE_MAX_WORKERS": "4",
        "CLEANROOM_SIDECAR_RUNTIME_STATE_DIR": "elsewhere",
        "TPM2TOOLS_TCTI": "swtpm:port=1",
    }
    config = load_run_config(path, env=env)
    assert config.broker.target == "broker.example:443"
    assert config.runtime.grace_seconds == 2.5
    assert config.tpm.tcti == "device:/dev/tpmrm0x"
    assert config.dataplane.max_workers == 4
    # Relative paths from the environment resolve against the config file's directory too.
    assert config.runtime.state_dir == str(path.parent / "elsewhere")
    assert load_run_config(path, tcti="mssim:port=9", env=env).tpm.tcti == "mssim:port=9"
    # TPM2TOOLS_TCTI fills in only when neither the file nor CLEANROOM_SIDECAR_TPM_TCTI set one.
    no_tcti = _write(tmp_path, DOCUMENTED.replace('tcti = "swtpm:host=127.0.0.1,port=2321"', ""))
    assert load_run_config(no_tcti, env={"TPM2TOOLS_TCTI": "swtpm:port=1"}).tpm.tcti == (
        "swtpm:port=1"
    )
    assert load_run_config(no_tcti, env={}).tpm.tcti == "device:/dev/tpmrm0"


def test_defaults_of_optional_settings(tmp_path: Path) -> None:
    text = (
        '[broker]\ncert_file = "c"\nkey_file = "k"\nca_file = "ca"\n'
        '[workload]\nfiles = ["./a//b.py"]\n'
    )
    config = load_run_config(_write(tmp_path, text), env={})
    assert config.broker.retries == DEFAULT_BROKER_RETRIES
    assert config.broker.server_name is None
    assert config.workload.measured_names() == ("a/b.py",)
    assert config.inputs == ()
    assert config.runtime.socket_dir == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[workload]", "[workload]\nunknown = 1"), "unknown setting(s): unknown"),
        (("[outputs]", "[outptus]"), "unknown setting(s): outptus"),
        (('files = ["run.py", "analysis.py"]', "files = []"), "[workload] files must list"),
        (('files = ["run.py", "analysis.py"]', 'files = ["../x.py"]'), "without '..'"),
        (('files = ["run.py", "analysis.py"]', 'files = ["/x.py"]'), "relative path under root"),
        (('files = ["run.py", "analysis.py"]', 'files = ["a", "a"]'), "must not repeat"),
        (('key_id = "advertiser-data"', 'key_id = ""'), "needs a key_id"),
        (("retries = 5 ", "retries = -1 "), "[broker] retries must be >= 0"),
        (('cert_file = "pki/sidecar-sidecar-1.crt"', ""), "[broker] cert_file must be set"),
        (("grace_seconds = 10", "grace_seconds = -1"), "grace_seconds must be >= 0"),
        (('tcti = "swtpm:host=127.0.0.1,port=2321"', 'ek_algorithm = "dsa"'), "ek_algorithm"),
        (("[[inputs]]", "[[inputs]]\nrequired = 3"), "expected true or false"),
    ],
)
def test_bad_settings_are_one_clear_error(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in DOCUMENTED
    path = _write(tmp_path, DOCUMENTED.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_run_config(path, env={})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_two_inputs_with_one_name_and_missing_tables(tmp_path: Path) -> None:
    twice = DOCUMENTED + '[[inputs]]\nname = "advertiser"\nurl = "x"\nkey_id = "y"\n'
    with pytest.raises(ConfigError, match="two inputs have the same name"):
        load_run_config(_write(tmp_path, twice), env={})
    with pytest.raises(ConfigError, match=r"the \[workload\] table is required"):
        load_run_config(
            _write(tmp_path, '[broker]\ncert_file = "c"\nkey_file = "k"\nca_file = "a"\n'),
            env={},
        )
    with pytest.raises(ConfigError, match=r"the \[broker\] and \[workload\] tables are required"):
        load_run_config(_write(tmp_path, "[tpm]\n"), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_run_config(tmp_path / "missing.toml", env={})


def test_run_config_is_frozen() -> None:
    config = RunConfig(
        broker=BrokerSettings(cert_file="c", key_file="k", ca_file="a"),
        workload=WorkloadSettings(files=("x",)),
    )
    with pytest.raises(AttributeError):
        config.inputs = ()  # type: ignore[misc]
