"""gRPC, imported with its fork handlers off (see :func:`import_grpc_without_fork_handlers`)."""

from __future__ import annotations

import os


def import_grpc_without_fork_handlers() -> None:
    """Imports gRPC with its fork handlers off, unless something imported it already.

    ``sidecar run`` starts the workload with fork() (its containment runs between fork and
    exec), and gRPC's fork handlers then print "skipping fork() handlers" on stderr while other
    threads use gRPC. They serve processes that go on using gRPC after fork(); the sidecar's
    children exec at once. gRPC reads the setting once, when it is first imported; it is put
    back afterwards so that the workload's environment does not change.
    """
    key = "GRPC_ENABLE_FORK_SUPPORT"
    previous = os.environ.get(key)
    if previous is None:
        os.environ[key] = "0"
    try:
        import grpc  # noqa: F401
    finally:
        if previous is None:
            del os.environ[key]


import_grpc_without_fork_handlers()
