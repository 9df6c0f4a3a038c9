"""Cleanroom: TPM-attested key release for data clean rooms.

This package is the shared bottom layer: the generated protocol code (``cleanroom.v1``), the
configuration loader, logging, the loopback helper and the progress bar, which import no
application code. The application (the ``cleanroom`` command, the demo, the emulators, the
software TPM launcher) is the ``cleanroom.app`` subpackage. The domain packages are ``broker``,
``sidecar``, ``workload``, ``sealing``, ``pki``, ``evidence`` and ``blobstore``; the layers are
drawn in docs/architecture.md and enforced by tests/unit/test_layering.py.
"""

__version__ = "0.1.0"
