"""Prometheus metrics of the broker, served over plain HTTP on a separate (localhost) port.

Each :class:`BrokerMetrics` has its own registry, so several brokers in one process (tests) do
not share counters. Labels are bounded sets: result and reason classes, method names, status
codes and identity kinds, never identities, AK names or key ids.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Final
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from broker.server.errors import ServerSetupError
from broker.server.probes import ReadinessCheck, probe_app
from cleanroom.closing import Closeable

#: Latency buckets around the target (p99 under 25 ms) with room for slow admin calls.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``.

    Raises:
        ServerSetupError: no port, or a port that is not a number in 0..65535.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ServerSetupError(f"listen address {listen!r} must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ServerSetupError(f"listen address {listen!r} has no numeric port") from None
    if not 0 <= port <= 65535:
        raise ServerSetupError(f"listen address {listen!r} has an invalid port")
    return host, port


def format_address(host: str, port: int) -> str:
    """``(host, port)`` -> ``"host:port"`` (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BrokerMetrics:
    """The broker's counters, histogram and gauges in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.attestations = Counter(
            "cleanroom_broker_attestations",
            "Attest calls by result (allow, deny) and reason class.",
            ["result", "reason"],
            registry=r,
        )
        self.key_releases = Counter(
            "cleanroom_broker_key_releases",
            "Data keys released to attested sidecars (result=released, reason=approved) or "
            "withheld (withheld, with the reason class).",
            ["result", "reason"],
            registry=r,
        )
        self.rpc_latency = Histogram(
            "cleanroom_broker_rpc_duration_seconds",
            "Time spent serving each call, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.authz_denials = Counter(
            "cleanroom_broker_authz_denials",
            "Calls refused by the authorization table, by method and caller kind.",
            ["method", "kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            "cleanroom_broker_rate_limited",
            "GetChallenge calls refused by a rate limit (scope=peer or ak).",
            ["scope"],
            registry=r,
        )
        self.outstanding_nonces = Gauge(
            "cleanroom_broker_outstanding_nonces",
            "Nonces issued and neither used nor expired.",
            registry=r,
        )

    def track_outstanding_nonces(self, count: Callable[[], int]) -> None:
        """Makes the nonce gauge read ``count()`` at every scrape."""
        self.outstanding_nonces.set_function(lambda: float(count()))

    def serve_http(
        self, listen: str, *, readiness: ReadinessCheck | None = None
    ) -> MetricsHttpServer:
        """Starts the HTTP endpoint on ``listen`` (``host:port``; port 0 picks one):
        ``/metrics``, and the probes ``/healthz`` and ``/readyz`` (which asks ``readiness``);
        see :mod:`broker.server.probes`.

        Raises:
            ServerSetupError: the address is malformed or cannot be bound.
        """
        return MetricsHttpServer(self.registry, listen, readiness=readiness)


class MetricsHttpServer(Closeable):
    """The plain-HTTP metrics and probe endpoint; a context manager that stops it on exit."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        readiness: ReadinessCheck | None = None,
    ) -> None:
        host, port = parse_listen(listen)

        # A class per server, so that the address family (IPv4 or IPv6, from the host) is set
        # for this listener only.
        class _Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self._httpd: WSGIServer = make_server(
                host, port, probe_app(registry, readiness), _Server, handler_class=_SilentHandler
            )
        except OSError as e:
            raise ServerSetupError(f"cannot serve metrics on {listen}: {e.strerror or e}") from e
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="broker-metrics", daemon=True
        )
        self._thread.start()
        self._closed = threading.Event()

    @property
    def address(self) -> str:
        """The bound ``host:port``."""
        host, port = self._httpd.server_address[:2]
        return format_address(str(host), int(port))

    def close(self) -> None:
        """Stops serving and closes the socket (idempotent)."""
        if not self._closed.is_set():
            self._closed.set()
            self._httpd.shutdown()
            self._httpd.server_close()


__all__ = [
    "LATENCY_BUCKETS",
    "BrokerMetrics",
    "MetricsHttpServer",
    "format_address",
    "parse_listen",
]
