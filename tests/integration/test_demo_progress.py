"""``cleanroom demo``'s progress bars: drawn on a terminal, never on a pipe, never on stdout.

The real command runs in a subprocess (with its own swtpm, broker and sidecar) with stderr on a
pseudo-terminal and stdout on a pipe, as when a user redirects the story to a file. Only a step
that moves at least ``PROGRESS_THRESHOLD`` bytes gets a bar; the sample-data step is the first
to cross it, at ``ROWS`` rows per party.
"""

from __future__ import annotations

import os
import pty
import re
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from cleanroom.app.demo.narrate import PROGRESS_THRESHOLD

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

#: The bytes a row is counted as by the sample-data step's bar (``Demo.generate_data``).
BYTES_PER_ROW: Final = 160
#: The smallest ``--rows`` whose sample-data step reaches the threshold (104,858).
ROWS: Final = -(-PROGRESS_THRESHOLD // BYTES_PER_ROW)
TIMEOUT: Final = 120.0

#: One frame of sealing.cli.Progress with a known total: label, 30-cell bar, percentage.
FRAME = re.compile(rb"\r(?P<label>[^\r\[]+?) \[(?P<bar>[#-]{30})\] +(?P<pct>\d+\.\d)% ")


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_demo(directory: Path, *, rows: int, stderr_on_tty: bool) -> Run:
    """Runs ``cleanroom demo --no-tamper`` with stdout on a pipe and stderr on a fresh
    pseudo-terminal (or on a pipe), and collects both until the command exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    args = [sys.executable, "-m", "cleanroom.app.cli", "demo", "--no-tamper"]
    args += ["--rows", str(rows), "--dir", str(directory)]
    master = slave = -1
    if stderr_on_tty:
        master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=directory.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave if stderr_on_tty else subprocess.PIPE,
    )
    if stderr_on_tty:
        os.close(slave)  # the master sees EOF (EIO) once every holder of the slave is gone
    assert proc.stdout is not None
    if stderr_on_tty:
        err_fd = master
    else:
        assert proc.stderr is not None
        err_fd = proc.stderr.fileno()
    out_fd = proc.stdout.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    try:
        with selectors.DefaultSelector() as sel:
            for fd in chunks:
                sel.register(fd, selectors.EVENT_READ)
            deadline = start + TIMEOUT
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"cleanroom demo still running after {TIMEOUT} s")
                for key, _ in sel.select(remaining):
                    fd = key.fd
                    try:
                        data = os.read(fd, 65536)
                    except OSError:  # EIO: the pseudo-terminal's last writer closed it
                        data = b""
                    if data:
                        chunks[fd].append(data)
                    else:
                        sel.unregister(fd)
        returncode = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if stderr_on_tty:
            os.close(master)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    return Run(
        returncode=returncode,
        stdout=b"".join(chunks[out_fd]),
        stderr=b"".join(chunks[err_fd]),
    )


def assert_no_bar(stream: bytes) -> None:
    assert b"\r" not in stream.replace(b"\r\n", b"\n")  # a pty's own newlines are \r\n
    assert b"\x1b[" not in stream
    assert not re.search(rb"\[[#-]{10,}\]", stream), stream[-2000:]


def assert_story(run: Run, rows: int) -> None:
    text = run.stdout.decode()
    assert run.returncode == 0, text + run.stderr.decode(errors="replace")
    assert f"for {rows:,} hashed user ids" in text
    assert "\nSummary\n" in text
    assert_no_bar(run.stdout)


def test_rows_is_the_smallest_that_reaches_the_threshold() -> None:
    assert (ROWS - 1) * BYTES_PER_ROW < PROGRESS_THRESHOLD <= ROWS * BYTES_PER_ROW


def test_a_large_step_draws_a_bar_on_a_terminal(tmp_path: Path) -> None:
    run = run_demo(tmp_path / "demo", rows=ROWS, stderr_on_tty=True)
    assert_story(run, ROWS)
    frames = list(FRAME.finditer(run.stderr))
    assert frames, run.stderr[-2000:]
    # Only the sample data reaches the threshold; each sealed file is about half of it.
    assert {f["label"] for f in frames} == {b"generating sample data"}
    # The bar is redrawn in place: the first frame is drawn at once, finish() draws the last,
    # each one erases the rest of the line, and the bar ends with a newline.
    assert len(frames) >= 2
    pcts = [float(f["pct"]) for f in frames]
    assert pcts == sorted(pcts) and pcts[-1] > pcts[0], pcts
    # The bar's cells follow the percentage (which is rounded, so one cell either way).
    for frame, pct in zip(frames, pcts, strict=True):
        assert abs(frame["bar"].count(b"#") - pct / 100 * 30) <= 1, frame.group()
    assert run.stderr.count(b"\x1b[K") == len(frames)
    assert run.stderr[frames[-1].end() :].split(b"\x1b[K", 1)[1].startswith(b"\r\n")
    # The story on stdout is the same as without a terminal: no frame leaked into it.
    assert b"generating sample data [" not in run.stdout


def test_a_step_below_the_threshold_draws_no_bar_on_a_terminal(tmp_path: Path) -> None:
    run = run_demo(tmp_path / "demo", rows=ROWS - 1, stderr_on_tty=True)
    assert_story(run, ROWS - 1)
    assert_no_bar(run.stderr)


def test_no_bar_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    run = run_demo(tmp_path / "demo", rows=ROWS, stderr_on_tty=False)
    assert_story(run, ROWS)
    assert_no_bar(run.stderr)
