"""The one launcher of real broker processes: ``cleanroom broker init`` then ``serve``.

Every test that runs ``cleanroom broker serve`` starts it here, so that the start-up sequence an
operator follows (init once, then serve) is the one the tests follow too.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: The ``cleanroom`` command of the interpreter running the tests (this worktree's code).
CLEANROOM = Path(sys.executable).parent / "cleanroom"


def clean_env() -> dict[str, str]:
    """The environment without ``CLEANROOM_*`` overrides (the config file decides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}


def init_broker(config: Path) -> str:
    """Runs ``cleanroom broker init --config CONFIG`` and returns what it printed.

    Raises:
        AssertionError: the command failed (its output is in the message).
    """
    proc = subprocess.run(
        [str(CLEANROOM), "broker", "init", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"broker init failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@dataclass
class Spawned:
    """A ``cleanroom broker serve`` process (the parent, with ``--processes N``)."""

    proc: subprocess.Popen[bytes]
    grpc_address: str
    stderr_path: Path
    #: Every metrics address printed, process 0's first.
    metrics: list[str] = field(default_factory=list)
    #: Everything the process printed on stdout until it was ready.
    stdout: str = ""

    def kill_all(self) -> None:
        """SIGKILL to the whole process group (the parent and every worker), then reaps."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def spawn_broker(
    config: Path,
    workdir: Path,
    *,
    processes: int = 1,
    log_json: bool = True,
    init: bool = True,
    timeout: float = 30.0,
    stderr_name: str = "broker.stderr",
) -> Spawned:
    """Initializes the broker's state (unless ``init`` is false: it exists already) and
    starts ``cleanroom broker serve`` in a process group of its own; waits until it prints
    its gRPC address and every metrics address (when the configuration enables metrics).

    Raises:
        AssertionError: it did not start (its stderr is in the message).
    """
    if init:
        init_broker(config)
    stderr_path = workdir / stderr_name
    command = [str(CLEANROOM), "broker", "serve", "--config", str(config)]
    if log_json:
        command.append("--log-json")
    if processes != 1:
        command += ["--processes", str(processes)]
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, env=clean_env(), start_new_session=True
        )
    assert proc.stdout is not None
    grpc_address, buffered = "", b""
    metrics: list[str] = []
    deadline = time.monotonic() + timeout
    with open(config, "rb") as f:
        metrics_enabled = (
            tomllib.load(f).get("broker", {}).get("metrics", {}).get("enabled", True) is not False
        )
    while not (grpc_address and len(metrics) >= (processes if metrics_enabled else 0)):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            Spawned(proc, "", stderr_path).kill_all()
            raise AssertionError(f"broker did not start:\n{stderr_path.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        buffered += os.read(proc.stdout.fileno(), 4096)
        lines = buffered.decode().splitlines()
        grpc_address = next(
            (ln.split()[3] for ln in lines if ln.startswith("broker listening on ")), ""
        )
        metrics = [ln.split("http://")[1].split("/")[0] for ln in lines if "/metrics" in ln]
    return Spawned(proc, grpc_address, stderr_path, metrics, buffered.decode())
