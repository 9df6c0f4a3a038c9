"""Several broker processes on one port: ``cleanroom broker serve --processes N``.

A broker process runs its Python code under one interpreter lock, so it uses about one core
however many the machine has. :func:`serve_processes` starts N processes (``spawn``: nothing
inherited but the configuration) that each run :func:`broker.server.server.serve` bound to the
same address with SO_REUSEPORT; the kernel spreads incoming connections over them, and a gRPC
channel (one connection) stays with one process for its life.

What the processes share, and what each keeps to itself:

* **In the database, shared:** everything that a decision depends on. Nonces (one process may
  issue a nonce and another consume it: the burn is one conditional UPDATE, so exactly one
  consumer wins), the audit chain (its head row serializes appenders across processes), sessions,
  EKs, AKs and their revocation, data keys, approvals and their revocation, golden sets.
* **Per process:** the challenge rate-limit buckets (a limit holds per process, so a client whose
  connections land on several processes can reach up to N times the configured rate; one channel
  stays on one process), caches of data that never changes once stored (parties, decoded
  approvals without their ``revoked`` flag, which is read fresh each time, parsed AK public
  keys), the worker thread pool, and the metrics: each process serves its own endpoint, the first
  on the configured port and process *k* on that port + *k* (or a port of the kernel's choosing
  when the configured one is 0).
* **In the first process only:** the periodic purge of expired nonces and credential challenges
  (one purger is enough; several would only compete for the write lock).

Start-up is sequential: the first process starts alone (it migrates the database and creates the
registration key in ``state_dir`` on first use), the others once it serves. If any process exits,
the others are stopped and :func:`serve_processes` raises; SIGTERM or SIGINT to the parent stops
them all gracefully.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from broker.config import BrokerConfig
from broker.errors import BrokerError
from broker.server.errors import ServerSetupError
from broker.server.server import DEFAULT_MAX_WORKERS, ServerAddresses, serve
from broker.server.status_report import ProcessInfo

if TYPE_CHECKING:
    from broker.kek_azure import KeyVaultConfig

log = logging.getLogger("cleanroom.broker.server")

#: How long a process may take to start serving (database migration included).
START_TIMEOUT_SECONDS: Final = 120.0
#: Beyond the configured grace period, how long a stopping process may take before it is killed.
STOP_MARGIN_SECONDS: Final = 10.0


def process_config(config: BrokerConfig, index: int) -> BrokerConfig:
    """Process ``index``'s configuration: the metrics port moved by ``index`` (when fixed).

    Raises:
        ServerSetupError: the metrics address has no port.
    """
    metrics = config.metrics
    if index == 0 or not metrics.enabled:
        return config
    host, sep, port = metrics.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ServerSetupError(f"metrics.listen {metrics.listen!r} has no port")
    moved = f"{host}:{int(port) + index}" if int(port) else metrics.listen
    return dataclasses.replace(config, metrics=dataclasses.replace(metrics, listen=moved))


def _child(
    config: BrokerConfig,
    key_vault: KeyVaultConfig | None,
    index: int,
    max_workers: int,
    log_json: bool,
    log_level: int,
    reports: Any,
    processes: int = 1,
) -> None:
    """One broker process: serves until SIGTERM/SIGINT; reports readiness or failure."""
    from broker.server.logs import configure_logging

    configure_logging(json_output=log_json, level=log_level)

    def ready(addresses: ServerAddresses) -> None:
        reports.put((index, addresses.grpc, addresses.metrics, None))

    try:
        serve(
            config,
            on_ready=ready,
            max_workers=max_workers,
            reuse_port=True,
            key_vault=key_vault,
            maintenance=index == 0,
            process=ProcessInfo(processes=processes, index=index),
        )
    except BrokerError as e:
        reports.put((index, None, None, f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e


def serve_processes(
    config: BrokerConfig,
    *,
    processes: int,
    on_ready: Callable[[Sequence[ServerAddresses]], None] | None = None,
    key_vault: KeyVaultConfig | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    log_json: bool = False,
    log_level: int = logging.INFO,
) -> None:
    """Runs ``processes`` broker processes sharing ``config.tls.listen`` until SIGTERM or SIGINT
    (see the module docstring for what they share). ``on_ready`` gets every process's addresses
    once all of them serve. Each process logs to this process's standard error.

    Raises:
        ServerSetupError: ``processes`` is below 1, the listen address has no fixed port (the
            processes must bind the same one), or a process failed to start or exited.
    """
    if processes < 1:
        raise ServerSetupError("the number of broker processes must be at least 1")
    _, sep, port = config.tls.listen.rpartition(":")
    if processes > 1 and (not sep or not port.isdigit() or int(port) == 0):
        raise ServerSetupError(
            f"several broker processes need a fixed port to share (tls.listen is "
            f"{config.tls.listen!r})"
        )
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    children: list[BaseProcess] = []
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping the broker processes", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        addresses: list[ServerAddresses] = []
        for index in range(processes):
            child = ctx.Process(
                target=_child,
                args=(
                    process_config(config, index),
                    key_vault,
                    index,
                    max_workers,
                    log_json,
                    log_level,
                    reports,
                    processes,
                ),
                name=f"broker-{index}",
            )
            child.start()
            children.append(child)
            addresses.append(_wait_ready(child, index, reports, stop))
            if stop.is_set():
                return
        log.info("broker serving in %d processes", processes)
        if on_ready is not None:
            on_ready(addresses)
        while not stop.wait(0.5):
            for index, proc in enumerate(children):
                if not proc.is_alive():
                    raise ServerSetupError(
                        f"broker process {index} exited (code {proc.exitcode}); stopping the others"
                    )
    finally:
        _stop_all(children, grace=config.deadline_budget_seconds + STOP_MARGIN_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reports.close()


def _wait_ready(
    child: BaseProcess, index: int, reports: Any, stop: threading.Event
) -> ServerAddresses:
    waited = 0.0
    while not stop.is_set():
        try:
            got, grpc_address, metrics_address, problem = reports.get(timeout=0.5)
        except queue.Empty:
            waited += 0.5
            if not child.is_alive():
                raise ServerSetupError(
                    f"broker process {index} exited while starting (code {child.exitcode})"
                ) from None
            if waited > START_TIMEOUT_SECONDS:
                raise ServerSetupError(f"broker process {index} did not start in time") from None
            continue
        if problem is not None:
            raise ServerSetupError(f"broker process {got} failed to start: {problem}")
        return ServerAddresses(grpc=grpc_address, metrics=metrics_address)
    return ServerAddresses(grpc="", metrics=None)


def _stop_all(children: Sequence[BaseProcess], *, grace: float) -> None:
    for child in children:
        if child.is_alive() and child.pid is not None:
            # SIGTERM: the process's own handler stops it gracefully (in-flight calls finish).
            child.terminate()
    for child in children:
        child.join(timeout=grace)
        if child.is_alive():
            log.warning("broker process %s did not stop in time; killing it", child.name)
            child.kill()
            child.join()


__all__ = ["process_config", "serve_processes"]
