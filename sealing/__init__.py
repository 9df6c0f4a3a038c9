"""Streaming AES-256-GCM envelope format with HPKE recipient key wrapping.

* :mod:`sealing.keys`: recipient key pairs (X25519, ML-KEM-768 + X25519) and key files.
* :mod:`sealing.hpke`: single-shot HPKE ``seal`` / ``open_sealed`` to a recipient key.
* :mod:`sealing.envelope`: the sealed stream format (``SealWriter``, ``OpenReader``).
* :mod:`sealing.errors`: ``SealingError`` and its subclasses.

The package imports nothing heavy here, so that ``cleanroom --help`` stays fast; import the
submodules you need. ``docs/sealing-format.md`` describes the format byte by byte.
"""
