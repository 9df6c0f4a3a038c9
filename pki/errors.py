"""Errors of the ``pki`` package. Every error it raises derives from :class:`PKIError`."""


class PKIError(Exception):
    """Root of every error the ``pki`` package raises."""
