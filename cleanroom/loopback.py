"""Loopback port helpers for the local services the demo and the tests start.

Everything here binds or connects to 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def accepts(port: int, *, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on 127.0.0.1:port right now."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, *, timeout: float = 10.0, alive: Callable[[], bool] | None = None
) -> None:
    """Waits until something accepts connections on 127.0.0.1:port.

    ``alive`` tells whether the server process still runs; once it does not, waiting stops.

    Raises:
        TimeoutError: nothing listened within ``timeout`` seconds, or the server died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise TimeoutError(f"the server for {HOST}:{port} exited")
        if accepts(port):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {HOST}:{port}")
        time.sleep(0.02)
