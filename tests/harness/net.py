"""Loopback port helpers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
            raise TimeoutError(f"the server for 127.0.0.1:{port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)
