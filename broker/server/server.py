"""The broker's gRPC server: one mTLS port for both services, health and reflection.

:class:`BrokerServer` wires a :class:`~broker.core.compose.Broker` into a ``grpc.server`` whose
thread pool serves 64 concurrent clients, with client certificates required by the TLS handshake and
every call run through :class:`~broker.server.interceptor.CallGuard`. Metrics are served over
plain HTTP on a separate port. :func:`serve` runs it until SIGTERM or SIGINT and then shuts down
gracefully: health turns NOT_SERVING, the port stops accepting, in-flight calls get a grace
period to finish, then storage is closed.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core.compose import Broker
from broker.errors import BrokerConfigError
from broker.server.authz import ADMIN_SERVICE, ATTESTATION_SERVICE
from broker.server.deadlines import Deadlines
from broker.server.errors import ServerSetupError
from broker.server.interceptor import CallGuard, GuardInterceptor
from broker.server.metrics import BrokerMetrics, MetricsHttpServer
from broker.server.probes import BrokerReadiness
from broker.server.servicers import AdminServicer, AttestationServicer
from broker.server.status_report import ProcessInfo
from cleanroom.closing import Stoppable
from cleanroom.v1 import admin_pb2_grpc, attestation_pb2_grpc
from pki.crl import CrlWatcher
from pki.errors import PKIError
from pki.tls import server_credentials

if TYPE_CHECKING:
    from broker.kek_azure import KeyVaultConfig

log = logging.getLogger("cleanroom.broker.server")

#: Worker threads: one per concurrent call, sized for 64 concurrent clients.
DEFAULT_MAX_WORKERS: Final = 64
#: How often expired nonces and credential challenges are purged.
MAINTENANCE_INTERVAL_SECONDS: Final = 60.0


@dataclass(frozen=True)
class ServerAddresses:
    """Where the server listens: the gRPC (mTLS) address and the metrics address, if any."""

    grpc: str
    metrics: str | None


def load_revocation(config: BrokerConfig) -> CrlWatcher | None:
    """The revocation lists of ``tls.crl_files``, verified against ``tls.ca_file``; None when
    no CRL is configured.

    Raises:
        BrokerConfigError: a CRL is unreadable, not signed by a CA of the bundle, or stale
            (or the bundle is unreadable).
    """
    tls = config.tls
    if not tls.crl_files:
        return None
    try:
        return CrlWatcher.from_files(crl_files=tls.crl_files, ca_file=tls.ca_file)
    except PKIError as e:
        raise BrokerConfigError(f"tls.crl_files: {e}") from e


class BrokerServer(Stoppable):
    """The broker's gRPC server around an open :class:`Broker` (which the caller closes).

    Use :meth:`start`, then :meth:`stop` (or the context manager, which stops on exit).
    """

    def __init__(
        self,
        *,
        broker: Broker,
        config: BrokerConfig | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        metrics: BrokerMetrics | None = None,
        reuse_port: bool = False,
        maintenance: bool = True,
        revocation: CrlWatcher | None = None,
        process: ProcessInfo | None = None,
    ) -> None:
        """``maintenance`` runs the purge of expired nonces and credential challenges in this
        server; of several processes serving one database, one is enough (see
        :func:`broker.server.processes.serve_processes`). ``revocation`` is the loaded
        ``tls.crl_files`` (see :func:`load_revocation`); without it :meth:`start` loads them."""
        self.broker = broker
        self.process = process or ProcessInfo()
        self.revocation = revocation
        self.maintenance = maintenance
        self.config = config or broker.config
        self.max_workers = max_workers
        self.reuse_port = reuse_port
        self.metrics = metrics or BrokerMetrics()
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._stop_maintenance = threading.Event()
        #: Ends the AttestStream calls whose evidence is overdue.
        self._deadlines = Deadlines()
        self._maintenance: threading.Thread | None = None
        self.addresses: ServerAddresses | None = None

    def _outstanding_nonces(self) -> int:
        try:
            return self.broker.operations.outstanding_nonces()
        except Exception:
            log.warning("cannot count outstanding nonces for metrics", exc_info=True)
            return -1

    def start(self) -> ServerAddresses:
        """Binds the mTLS port (and the metrics port) and starts serving.

        Raises:
            ServerSetupError: the TLS files are unusable or an address cannot be bound.
            BrokerConfigError: a CRL of ``tls.crl_files`` is unreadable, not signed by a CA
                of ``tls.ca_file``, or stale.
        """
        if self._server is not None:
            raise ServerSetupError("the server is already started")
        config = self.config
        tls = config.tls
        try:
            credentials = server_credentials(
                cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tls.ca_file
            )
        except PKIError as e:
            raise ServerSetupError(f"TLS: {e}") from e
        revocation = self.revocation or load_revocation(config)
        self.metrics.track_outstanding_nonces(self._outstanding_nonces)
        guard = CallGuard(
            trust_domain=config.trust_domain,
            audit=self.broker.operations,
            metrics=self.metrics,
            slow_call_seconds=config.deadline_budget_seconds,
            revocation=revocation,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix="broker-rpc"
            ),
            interceptors=[GuardInterceptor(guard)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Refuse to share the port with another process (SO_REUSEPORT would let a
                # second broker, or anything else, silently take half of the connections),
                # unless the caller runs several broker processes on one port on purpose.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ],
        )
        attestation_pb2_grpc.add_AttestationServiceServicer_to_server(
            AttestationServicer(self.broker, metrics=self.metrics, deadlines=self._deadlines),
            server,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.broker, process=self.process), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in ("", ATTESTATION_SERVICE, ADMIN_SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (ATTESTATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        try:
            port = server.add_secure_port(tls.listen, credentials)
        except RuntimeError as e:
            raise ServerSetupError(f"cannot listen on {tls.listen}: {e}") from e
        host = tls.listen.rpartition(":")[0]
        server.start()
        self._server = server
        try:
            metrics_address: str | None = None
            if config.metrics.enabled:
                self._metrics_http = self.metrics.serve_http(
                    config.metrics.listen, readiness=BrokerReadiness(self.broker)
                )
                metrics_address = self._metrics_http.address
        except BaseException:
            self.stop(grace=0)
            raise
        if self.maintenance:
            self._maintenance = threading.Thread(
                target=self._maintain, name="broker-maintenance", daemon=True
            )
            self._maintenance.start()
        self.addresses = ServerAddresses(grpc=f"{host}:{port}", metrics=metrics_address)
        return self.addresses

    def _maintain(self) -> None:
        # Expired nonces and credential challenges are useless after their TTL; purging them
        # keeps the tables (and the nonce lookups) small. A purged nonce presented again is
        # still refused (as unknown).
        interval = min(MAINTENANCE_INTERVAL_SECONDS, self.config.nonce_ttl_seconds)
        while not self._stop_maintenance.wait(interval):
            try:
                purged = self.broker.operations.purge_expired()
                if purged:
                    log.debug("purged %d expired nonces and credential challenges", purged)
            except Exception:
                log.warning("maintenance failed; will retry", exc_info=True)

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets in-flight calls finish within ``grace`` seconds (default:
        the configured deadline budget), and stops the metrics endpoint. Idempotent."""
        if grace is None:
            grace = self.config.deadline_budget_seconds
        self.health.enter_graceful_shutdown()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        self._stop_maintenance.set()
        if self._maintenance is not None:
            self._maintenance.join(timeout=5)
            self._maintenance = None
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        self._deadlines.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops (or ``timeout``); True if it stopped."""
        server = self._server
        return True if server is None else server.wait_for_termination(timeout)


def serve(
    config: BrokerConfig,
    *,
    on_ready: Callable[[ServerAddresses], None] | None = None,
    stop_event: threading.Event | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    reuse_port: bool = False,
    key_vault: KeyVaultConfig | None = None,
    maintenance: bool = True,
    process: ProcessInfo | None = None,
) -> None:
    """Runs the broker until SIGTERM or SIGINT (or ``stop_event``), then shuts down gracefully.

    ``key_vault`` (the ``[keyvault]`` settings) lets ``azurekv:`` KEK refs resolve to Azure Key
    Vault keys (see :func:`broker.app.open_broker`); the Key Vault clients and credential are
    closed with the broker at shutdown.

    Signal handlers are installed only when called from the main thread; ``on_ready`` gets the
    bound addresses once the server accepts calls. ``reuse_port`` lets several broker processes
    listen on one port (SO_REUSEPORT; the kernel spreads connections over them); it is off by
    default so that no other process can share the port unnoticed. ``maintenance`` runs the
    periodic purge of expired nonces and credential challenges here (one process of several
    sharing a database is enough).

    Raises:
        ServerSetupError: the TLS files are unusable or an address cannot be bound.
        BrokerConfigError: a CRL of ``tls.crl_files`` is unusable (see :func:`load_revocation`).
        StorageError, KekError, CustodyError, BrokerConfigError: opening the broker failed.
    """
    stop = stop_event or threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        # Before the database is opened, so that a bad CRL stops the start with one line.
        revocation = load_revocation(config)
        with (
            # Nothing is created here: `cleanroom broker init` made the state, and a broker
            # started on a missing database or KEK stops, naming it, instead of serving an
            # empty one.
            open_broker(config, key_vault=key_vault, create=False) as broker,
            BrokerServer(
                broker=broker,
                config=config,
                max_workers=max_workers,
                reuse_port=reuse_port,
                maintenance=maintenance,
                revocation=revocation,
                process=process,
            ) as server,
        ):
            addresses = server.start()
            log.info(
                "broker serving",
                extra={"fields": {"grpc": addresses.grpc, "metrics": addresses.metrics}},
            )
            if on_ready is not None:
                on_ready(addresses)
            # A bounded wait, so a signal is noticed promptly whatever the platform's lock
            # semantics.
            while not stop.wait(0.5):
                pass
            log.info("stopping: letting in-flight calls finish")
            server.stop(grace=config.deadline_budget_seconds)
        log.info("broker stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["DEFAULT_MAX_WORKERS", "BrokerServer", "ServerAddresses", "load_revocation", "serve"]
