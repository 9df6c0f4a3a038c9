"""Errors of the ``sealing`` package. Every error it raises derives from :class:`SealingError`."""


class SealingError(Exception):
    """Root of every error the ``sealing`` package raises."""
