"""Liveness and readiness probes for load balancers, systemd and Kubernetes, next to the metrics.

The metrics listener is plain HTTP without client certificates (bind it to localhost or a
cluster-internal address), so a probe needs no credentials. It answers three paths and nothing
else:

* ``GET /metrics``: the Prometheus text, as before;
* ``GET /healthz``: liveness, 200 ``ok`` as long as the process serves HTTP at all;
* ``GET /readyz``: readiness, 200 ``ready`` when the database answers, its schema is at this
  code's revision and the default KEK wraps and unwraps a probe key; otherwise 503 with one line
  naming what failed (no secrets: the database URL without its password, the KEK's ref).

Every other path gets 404. The KEK check can cost a Key Vault round trip, so a success is
remembered for :data:`KEK_CHECK_TTL_SECONDS`; a failure is not remembered, so readiness comes
back as soon as the KEK does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from broker.core.compose import Broker

log = logging.getLogger("cleanroom.broker.probes")

#: How long a successful KEK check counts for readiness.
KEK_CHECK_TTL_SECONDS: Final = 30.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
#: A readiness check: None when ready, else one line saying why not.
ReadinessCheck = Callable[[], str | None]


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


class BrokerReadiness:
    """The readiness check of one open broker: database, schema revision, default KEK."""

    def __init__(self, broker: Broker, *, kek_ttl_seconds: float = KEK_CHECK_TTL_SECONDS) -> None:
        self.broker = broker
        self.kek_ttl_seconds = kek_ttl_seconds
        self._kek_ok_until = 0.0
        self._lock = threading.Lock()

    def database_problem(self) -> str | None:
        """None when the database answers at this code's schema revision, else why not."""
        return self.broker.operations.database_problem()

    def kek_problem(self) -> str | None:
        """None when the default KEK round-trips a probe key (or did so recently), else why
        not."""
        from broker.errors import BrokerError

        now = time.monotonic()
        with self._lock:
            if now < self._kek_ok_until:
                return None
        ref = self.broker.config.default_kek
        try:
            self.broker.custody.check_default_kek()
        except BrokerError as e:
            return f"KEK {ref!r} unusable: {_first_line(str(e))}"
        except Exception as e:  # A provider's unexpected failure is still "not ready".
            log.warning("readiness: KEK check failed", exc_info=True)
            return f"KEK {ref!r} unusable: {type(e).__name__}"
        with self._lock:
            self._kek_ok_until = now + self.kek_ttl_seconds
        return None

    def __call__(self) -> str | None:
        return self.database_problem() or self.kek_problem()


def probe_app(registry: CollectorRegistry, readiness: ReadinessCheck | None) -> WsgiApp:
    """The WSGI application of the metrics listener: ``/metrics``, ``/healthz``, ``/readyz``,
    404 elsewhere. Without ``readiness`` (no broker behind the registry) ``/readyz`` answers
    like ``/healthz``."""
    metrics = make_wsgi_app(registry)

    def text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
        data = (body + "\n").encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return text(start_response, "405 Method Not Allowed", "method not allowed")
        if path == "/metrics":
            body: Iterable[bytes] = metrics(environ, start_response)
            return body
        if path == "/healthz":
            return text(start_response, "200 OK", "ok")
        if path == "/readyz":
            try:
                problem = readiness() if readiness is not None else None
            except Exception as e:
                log.warning("readiness check failed", exc_info=True)
                problem = f"readiness check failed: {type(e).__name__}"
            if problem is None:
                return text(start_response, "200 OK", "ready")
            log.warning("not ready: %s", problem)
            return text(start_response, "503 Service Unavailable", f"not ready: {problem}")
        return text(start_response, "404 Not Found", "not found")

    return app


__all__ = ["KEK_CHECK_TTL_SECONDS", "BrokerReadiness", "ReadinessCheck", "probe_app"]
