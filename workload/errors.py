"""Errors of the ``workload`` package. Every error it raises derives from :class:`WorkloadError`."""


class WorkloadError(Exception):
    """Root of every error the ``workload`` package raises."""
