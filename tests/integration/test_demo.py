"""``cleanroom demo`` end to end: the real command in a subprocess, with a real swtpm, broker,
sidecar and workload, as a user runs it.

Each test checks what the clean room produced rather than trusting the demo's own words: the
summary is compared with the outputs opened here with each party's key, and no process that
names the demo directory may outlive the command, also after a SIGINT in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.demo import (
    check_completed_demo,
    processes_mentioning,
    run_demo,
    summary_rows,
)

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    started = time.monotonic()
    proc = run_demo("--rows", "300", "--dir", str(directory), cwd=tmp_path)
    check_completed_demo(proc, directory)
    assert time.monotonic() - started < 60
    # Narration: one line per step, each naming the identity that acted.
    for actor in ("[operator]", "[advertiser]", "[publisher]", "[sidecar-1]", "[intruder]"):
        assert actor in proc.stdout
    assert "[advertiser]  sealed 300 rows" in proc.stdout


def test_demo_twice_in_a_row_in_the_same_directory(tmp_path: Path) -> None:
    first = run_demo("--rows", "300", cwd=tmp_path)
    second = run_demo("--rows", "300", cwd=tmp_path)
    made = sorted(p for p in tmp_path.iterdir() if p.name.startswith("cleanroom-demo-"))
    assert len(made) == 2, made
    check_completed_demo(first, made[0])
    check_completed_demo(second, made[1])
    # The default directory is named on the first lines and on the last.
    assert f"files go to {made[0]} (new directory)" in first.stdout

    # A third run into the first one's directory replaces that earlier demo.
    third = run_demo("--rows", "300", "--no-tamper", "--dir", str(made[0]), cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "(replacing an earlier demo)" in third.stdout
    assert "tampered run" not in summary_rows(third.stdout)
    assert not (made[0] / "workload-tampered").exists()


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_demo("--rows", "300", "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0] == (
        f"cleanroom: error: {tmp_path} is not empty and was not made by `cleanroom demo`; "
        "choose another --dir"
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_sigint_midway_leaves_no_process_behind(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cleanroom.app.cli",
            "demo",
            "--rows",
            "20000",
            "--dir",
            str(directory),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    launcher = str(directory / "workload" / "run.py")
    try:
        # Interrupt while the workload runs: then every kind of child is alive at once (swtpm,
        # the broker, the sidecar and the workload, which the sidecar starts in a session of
        # its own).
        deadline = time.monotonic() + 60
        seen: list[tuple[int, str]] = []
        while time.monotonic() < deadline and demo.poll() is None:
            seen = processes_mentioning(str(directory))
            if any(c.split()[-1] == launcher and "sidecar run" not in c for _, c in seen):
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"the workload never ran; demo exit {demo.poll()}, saw {seen}")
        kinds = " ".join(c for _, c in seen)
        assert "swtpm socket" in kinds and "broker serve" in kinds and "sidecar run" in kinds
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 130, out + err
    assert "interrupted; every process it started is stopped" in err
    assert f"files left in {directory}" in err
    assert processes_mentioning(str(directory)) == []
