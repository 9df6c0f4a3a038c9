"""Errors of the ``sidecar`` package. Every error it raises derives from :class:`SidecarError`."""


class SidecarError(Exception):
    """Root of every error the ``sidecar`` package raises."""
