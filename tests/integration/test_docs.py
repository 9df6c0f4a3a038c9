"""Runs every ``sh runnable`` block of README.md and docs/*.md, as shown.

Each Markdown file's runnable blocks run in order, as one ``bash -euo pipefail`` script, in a
fresh empty directory, so a later block may use what an earlier one made (files, exported
variables, a broker started in the background). The environment is the one a reader on this
machine would have after ``make setup``, with a software TPM standing in for the hardware one:

* ``PATH`` starts with the virtualenv's ``bin`` (``cleanroom``, ``python``);
* ``TPM2TOOLS_TCTI`` and ``CLEANROOM_SIDECAR_TPM_TCTI`` name a fresh swtpm (the ``swtpm``
  fixture), so tpm2-tools and the sidecar reach it instead of ``/dev/tpmrm0``;
* ``CLEANROOM_BROKER_TRUSTED_EK_CA_FILES`` names swtpm's local CA, which signs that TPM's EK
  certificate (on real hardware: the TPM vendor's CA, set in broker.toml);
* the broker's ports are free ones rather than the defaults 50051 and 9464, through the
  documented environment overrides (``CLEANROOM_BROKER_TLS_LISTEN``,
  ``CLEANROOM_BROKER_METRICS_LISTEN``, ``CLEANROOM_ADMIN_BROKER``,
  ``CLEANROOM_SIDECAR_BROKER_TARGET``), so two runs never collide;
* ``TPM_PORT`` is a free port (and its successor): README.md's one-machine block starts its own
  swtpm there and exports the TCTI and EK CA variables itself, as a reader pastes them.

README.md's "Trying it on one machine" lists the same variables. Every other ``CLEANROOM_*``,
``TPM2TOOLS_*`` and ``TSS2_*`` variable is removed. When the script ends, every process it left
(a background broker) is stopped through its process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cleanroom.app import devtpm
from cleanroom.loopback import free_port
from tests.harness.swtpm import Swtpm
from tests.support.docs import ROOT, Block, doc_files, parse_blocks

VENV_BIN = Path(sys.executable).parent
#: Per file; the slowest (README.md's quickstart) takes about 10 s on an idle 2-core machine.
TIMEOUT_SECONDS = 180.0
_DROPPED_PREFIXES = ("CLEANROOM_", "TPM2TOOLS_", "TSS2_")


def runnable_files() -> list[Path]:
    return [p for p in doc_files() if any(b.runnable for b in parse_blocks(p))]


@dataclass(frozen=True)
class Script:
    """The runnable blocks of one file as one bash script, with a map back to the doc's lines."""

    text: str
    #: script line (1-based) -> "file:line" in the doc
    origin: dict[int, str]

    @classmethod
    def of(cls, blocks: list[Block]) -> Script:
        lines: list[str] = []
        origin: dict[int, str] = {}
        for block in blocks:
            lines.append(f"# --- {block.where}")
            for offset, line in enumerate(block.lines, start=1):
                lines.append(line)
                origin[len(lines)] = f"{block.where.rsplit(':', 1)[0]}:{block.line + offset}"
        # The ERR trap names the script line of the command that failed; it is mapped back to
        # the doc below.
        prologue = "trap 'echo \"doc-test: failed at script line $LINENO\" >&2' ERR"
        return cls(text=prologue + "\n" + "\n".join(lines) + "\n", origin=origin)

    def where(self, stderr: str) -> str:
        for line in reversed(stderr.splitlines()):
            if line.startswith("doc-test: failed at script line "):
                # The prologue is script line 1, so block lines start at 2.
                number = int(line.rsplit(" ", 1)[1]) - 1
                return self.origin.get(number, f"script line {number}")
        return "unknown line"


def doc_environment(tcti: str | None) -> dict[str, str]:
    """The environment the blocks run in (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("VIRTUAL_ENV", None)
    if tcti is not None:
        env["TPM2TOOLS_TCTI"] = tcti
        env["CLEANROOM_SIDECAR_TPM_TCTI"] = tcti
        env["CLEANROOM_BROKER_TRUSTED_EK_CA_FILES"] = ",".join(str(p) for p in devtpm.ek_ca_files())
    grpc_port, metrics_port = free_port(), free_port()
    env["CLEANROOM_BROKER_TLS_LISTEN"] = f"127.0.0.1:{grpc_port}"
    env["CLEANROOM_BROKER_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    env["CLEANROOM_ADMIN_BROKER"] = f"127.0.0.1:{grpc_port}"
    env["CLEANROOM_SIDECAR_BROKER_TARGET"] = f"127.0.0.1:{grpc_port}"
    # README.md's one-machine block starts its own swtpm on TPM_PORT and TPM_PORT + 1.
    env["TPM_PORT"] = str(_free_port_pair())
    return env


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too (swtpm's server and control ports)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free loopback ports")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_script(script: Script, *, cwd: Path, env: dict[str, str]) -> Outcome:
    """Runs the script in its own process group and stops whatever it left running.

    Output goes to files, not pipes: a background process holding a pipe open would keep a
    reader waiting long after the script itself ended.
    """
    out_path, err_path = cwd.parent / f"{cwd.name}.stdout", cwd.parent / f"{cwd.name}.stderr"
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script.text],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop_group(proc.pid)
            proc.wait()
    stderr = err_path.read_text(errors="replace")
    if timed_out:
        stderr += f"\ndoc-test: timed out after {TIMEOUT_SECONDS:.0f} s"
    return Outcome(
        proc.returncode, out_path.read_text(errors="replace"), stderr, time.monotonic() - start
    )


def _stop_group(pgid: int) -> None:
    # Background jobs of a non-interactive bash stay in its process group (no job control), so
    # the group is exactly what the script started.
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.swtpm
@pytest.mark.tpm2tools
@pytest.mark.parametrize(
    "doc", runnable_files(), ids=lambda p: str(p.relative_to(ROOT)).replace("/", "_")
)
def test_runnable_blocks_run_as_shown(doc: Path, swtpm: Swtpm, tmp_path: Path) -> None:
    script = Script.of([b for b in parse_blocks(doc) if b.runnable])
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_script(script, cwd=work, env=doc_environment(swtpm.tcti))
    assert outcome.returncode == 0, (
        f"{script.where(outcome.stderr)}: the block failed (exit {outcome.returncode}) "
        f"after {outcome.seconds:.1f} s\n--- stdout\n{_tail(outcome.stdout)}\n"
        f"--- stderr\n{_tail(outcome.stderr)}"
    )


def test_a_failing_block_is_reported_at_its_doc_line(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "example.md"
    text = (
        "# Example\n"
        "```sh runnable\n"
        "echo one > one.txt\n"
        "```\n"
        "Prose.\n"
        "```sh runnable\n"
        "test -s one.txt\n"
        "cleanroom --version\n"
        "false\n"
        "echo never\n"
        "```\n"
    )
    script = Script.of([b for b in parse_blocks(doc, text) if b.runnable])
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_script(script, cwd=work, env=doc_environment(None))
    assert outcome.returncode == 1
    assert "cleanroom " in outcome.stdout and "never" not in outcome.stdout
    assert script.where(outcome.stderr) == "docs/example.md:9"


def test_processes_left_in_the_background_are_stopped(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    doc = ROOT / "docs" / "example.md"
    text = f"```sh runnable\nsleep 300 &\necho $! > {marker}\n```\n"
    script = Script.of(parse_blocks(doc, text))
    outcome = run_script(script, cwd=tmp_path, env=doc_environment(None))
    assert outcome.returncode == 0, outcome.stderr
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the background sleep is still running"


def test_the_quickstart_wait_shows_the_broker_log_when_it_cannot_start(tmp_path: Path) -> None:
    """README.md's start of the broker, run where ``broker init`` was not: the wait ends as soon
    as the broker exits and prints its log's last lines, which name the missing database."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("cleanroom broker serve --config broker.toml > broker.log 2>&1 &")
    end = readme.index("\n", readme.index("{ tail -n 20 broker.log; false; }", start))
    (tmp_path / "broker.toml").write_text('[broker]\ndatabase_url = "sqlite:///broker.db"\n')
    began = time.monotonic()
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme[start:end]],
        cwd=tmp_path,
        env=doc_environment(None),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0
    assert time.monotonic() - began < 15  # not the whole 30 s
    assert "broker init" in res.stdout and "does not exist" in res.stdout, res.stdout
