"""The application layer of the ``cleanroom`` command: the CLI entry point (:mod:`.cli`), the
two-party demo (:mod:`.demo`), the local service emulators (:mod:`.emulators`) and the software
TPM launcher (:mod:`.devtpm`).

Nothing below this package imports it: ``cleanroom`` itself holds only the shared bottom layer
(configuration, logging, the loopback helper and the generated ``cleanroom.v1`` protocol code),
and the domain packages sit between the two (see docs/architecture.md).
"""
