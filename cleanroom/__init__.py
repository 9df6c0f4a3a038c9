"""Cleanroom: TPM-attested key release for data clean rooms.

This package holds what the other packages share: the generated protocol code (``cleanroom.v1``),
the configuration loader and the ``cleanroom`` command-line entry point. The domain packages are
``broker``, ``sidecar``, ``workload``, ``sealing``, ``pki`` and ``evidence``.
"""

__version__ = "0.1.0"
