"""The demo's parts on their own: its directory, the measured copy of the workload and its
launcher, the tamper step, the configuration it writes, the process supervisor, and the
software-TPM launcher (:mod:`cleanroom.app.devtpm`). Real files, real processes, real swtpm."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from cleanroom.app import devtpm
from cleanroom.app.demo import WorkspaceError
from cleanroom.app.demo.processes import Supervisor, descendants
from cleanroom.app.demo.workspace import (
    MARKER,
    choose_directory,
    copy_workload,
    prepare_directory,
    tamper_one_byte,
    toml_document,
)

# --- the directory ----------------------------------------------------------------------------


def test_a_new_directory_is_marked_as_the_demos(tmp_path: Path) -> None:
    layout, replaced = prepare_directory(tmp_path / "d")
    assert not replaced
    assert (tmp_path / "d" / MARKER).is_file()
    assert layout.party_dir("advertiser").is_dir() and layout.logs.is_dir()


def test_an_earlier_demo_is_replaced_and_anything_else_refused(tmp_path: Path) -> None:
    layout, _ = prepare_directory(tmp_path / "d")
    (layout.root / "outputs").mkdir()
    (layout.root / "outputs" / "old.sealed").write_bytes(b"x")
    _, replaced = prepare_directory(tmp_path / "d")
    assert replaced and not (layout.root / "outputs").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="was not made by `cleanroom demo`"):
        prepare_directory(other)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(WorkspaceError, match="not a directory"):
        prepare_directory(other / "keep.txt")


def test_the_default_directory_is_new_and_timestamped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    first = choose_directory(None, now=when)
    assert first == tmp_path / "cleanroom-demo-20260102-030405"
    first.mkdir()
    assert choose_directory(None, now=when) == tmp_path / "cleanroom-demo-20260102-030405-2"
    assert choose_directory(Path("rel"), now=when) == tmp_path / "rel"


# --- the workload copy ------------------------------------------------------------------------


def _launch(launcher: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-B", "-E", "-s", str(launcher), *args],
        cwd=launcher.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_launcher_runs_the_copied_files_not_the_installed_package(tmp_path: Path) -> None:
    copy = copy_workload(tmp_path / "wl", args=["--seed", "3"])
    assert copy.files[0] == "run.py"
    assert "workload/example/app.py" in copy.files and "workload/client.py" in copy.files
    assert "workload/example/sampledata.py" not in copy.files
    assert sorted(p.relative_to(copy.root).as_posix() for p in copy.root.rglob("*.py")) == sorted(
        copy.files
    )
    # The launcher pins the arguments: they are part of the measured bytes.
    assert "ARGS = ['--seed', '3']" in copy.launcher.read_text()

    app = copy.root / "workload" / "example" / "app.py"
    app.write_text("def main(argv):\n    print('copied app', argv)\n    return 0\n")
    proc = _launch(copy.launcher)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "copied app ['--seed', '3']\n"
    # No compiled bytecode appears beside the measured files (-B), so none can run unmeasured.
    assert not list(copy.root.rglob("__pycache__"))


def test_the_launcher_refuses_modules_from_elsewhere(tmp_path: Path) -> None:
    copy = copy_workload(tmp_path / "wl", args=[])
    (copy.root / "workload" / "__init__.py").unlink()
    proc = _launch(copy.launcher)
    assert proc.returncode == 3
    assert "launcher: workload comes from" in proc.stderr


def test_tampering_changes_exactly_one_byte_and_keeps_the_code_valid(tmp_path: Path) -> None:
    copy = copy_workload(tmp_path / "wl", args=[])
    target = "workload/example/analysis.py"
    byte, tampered = tamper_one_byte(copy, tmp_path / "bad", target=target)
    good, bad = (copy.root / target).read_bytes(), (tampered.root / target).read_bytes()
    assert len(good) == len(bad)
    assert [i for i in range(len(good)) if good[i] != bad[i]] == [byte.offset]
    assert byte.before.swapcase() == byte.after
    compile(bad, target, "exec")
    assert tampered.files == copy.files
    # Every other file is an exact copy.
    for name in copy.files:
        if name != target:
            assert (copy.root / name).read_bytes() == (tampered.root / name).read_bytes()


def test_the_generated_sidecar_config_loads(tmp_path: Path) -> None:
    from sidecar.runconfig import load_run_config

    text = toml_document(
        [
            ("tpm", {"tcti": "swtpm:host=127.0.0.1,port=2321"}),
            (
                "broker",
                {
                    "target": "127.0.0.1:5",
                    "cert_file": "pki/s.crt",
                    "key_file": "pki/s.key",
                    "ca_file": "pki/ca.crt",
                    "server_name": "localhost",
                    "retries": 5,
                },
            ),
            ("workload", {"name": "example", "root": "workload", "files": ["run.py", 'a"b.py']}),
            ("[[inputs]]", {"name": "advertiser", "url": "sealed/a.sealed", "key_id": "a"}),
            ("[[inputs]]", {"name": "publisher", "url": "sealed/p.sealed", "key_id": "p"}),
            ("outputs", {"directory": "outputs"}),
            ("runtime", {"state_dir": "sidecar-state"}),
        ]
    )
    assert tomllib.loads(text)["workload"]["files"] == ["run.py", 'a"b.py']
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    config = load_run_config(path, env={})
    assert config.workload.files == ("run.py", 'a"b.py')
    assert [i.key_id for i in config.inputs] == ["a", "p"]
    assert config.inputs[0].url == str(tmp_path / "sealed" / "a.sealed")
    assert config.broker.retries == 5 and config.broker.server_name == "localhost"


# --- the supervisor ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_close_stops_children_their_groups_and_escaped_descendants(tmp_path: Path) -> None:
    pidfile = tmp_path / "escaped.pid"
    with Supervisor(grace=1.0) as sup:
        # A child whose own child leaves the group with setsid, and whose parent then exits:
        # only the subreaper sweep can find it.
        sup.start(
            "escaper",
            ["sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & exit 0"],
            log_file=tmp_path / "escaper.log",
        )
        # A child that ignores SIGTERM (and so does its sleep): SIGKILL after the grace period.
        stubborn = sup.start(
            "stubborn",
            ["sh", "-c", "trap '' TERM; sleep 300 & wait"],
            log_file=tmp_path / "stubborn.log",
        )
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
        escaped = int(pidfile.read_text())
        _wait_for(lambda: len(descendants(stubborn.pid)) == 1)
        stubborn_sleep = descendants(stubborn.pid)[0]
        assert _alive(escaped)
    for pid in (escaped, stubborn.pid, stubborn_sleep):
        assert not _alive(pid), pid
    assert "stubborn" in sup.stopped
    assert f"sleep (pid {escaped})" in sup.stopped


def test_close_leaves_the_processes_that_ran_before_it_opened(tmp_path: Path) -> None:
    # A test session's Azurite, started by a session fixture, is such a process: the sweep
    # once stopped it, and every later Azurite test hung on a service that was gone.
    earlier = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    earlier_sleep: int | None = None
    try:
        _wait_for(lambda: len(descendants(earlier.pid)) == 1)
        earlier_sleep = descendants(earlier.pid)[0]
        with Supervisor(grace=1.0) as sup:
            child = sup.start("sleeper", ["sleep", "300"], log_file=tmp_path / "s.log")
        assert not _alive(child.pid)
        assert _alive(earlier.pid)
        assert _alive(earlier_sleep)
        assert not any(str(earlier.pid) in name for name in sup.stopped)
    finally:
        earlier.kill()
        earlier.wait()
        if earlier_sleep is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(earlier_sleep, signal.SIGKILL)


def test_sigterm_becomes_keyboard_interrupt_and_handlers_come_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), Supervisor(grace=1.0) as sup:
        child = sup.start("sleeper", ["sleep", "300"], log_file=tmp_path / "s.log")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this
    assert not _alive(child.pid)
    assert signal.getsignal(signal.SIGTERM) == before


# --- the software TPM -------------------------------------------------------------------------


def test_swtpm_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(devtpm.SwtpmNotInstalledError, match=r"run `make setup`"):
        devtpm.manufacture(tmp_path / "state")


def test_demo_without_swtpm_says_so_and_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env["PATH"] = str(tmp_path / "empty")
    proc = subprocess.run(
        [sys.executable, "-m", "cleanroom.app.cli", "demo", "--dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first.startswith("cleanroom: error: swtpm and swtpm_setup are not installed")
    assert first.endswith("run `make setup`")
    assert not (tmp_path / "d" / "pki").exists()


@pytest.mark.swtpm
@pytest.mark.tpm2tools
def test_devtpm_serves_a_manufactured_state_and_stops(swtpm_template: Path, tmp_path: Path) -> None:
    import shutil

    state = tmp_path / "state"
    shutil.copytree(swtpm_template, state)
    log = tmp_path / "swtpm.log"
    with devtpm.Swtpm(state_dir=state, log_file=log) as tpm:
        assert tpm.ctrl_port == tpm.port + 1
        assert tpm.tcti == f"swtpm:host=127.0.0.1,port={tpm.port}"
        pid = tpm.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        out = subprocess.run(
            ["tpm2_pcrread", "sha1:23+sha256:23"],
            env=tpm.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "sha1" in out and "sha256" in out
    assert not tpm.running and not _alive(pid)
    for path in devtpm.ek_ca_files():
        assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
