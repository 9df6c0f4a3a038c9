"""Loopback port helpers for the tests (the product's own, re-exported)."""

from cleanroom.loopback import free_port, port_is_free, wait_for_port

__all__ = ["free_port", "port_is_free", "wait_for_port"]
