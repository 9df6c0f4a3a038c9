"""Errors of the ``broker`` package. Every error it raises derives from :class:`BrokerError`."""


class BrokerError(Exception):
    """Root of every error the ``broker`` package raises."""
