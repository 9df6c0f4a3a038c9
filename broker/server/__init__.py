"""The broker's gRPC server: servicers, the authorization and status-mapping guard, metrics,
structured logging and :func:`serve`.

Import :mod:`broker.server.server` for :class:`BrokerServer` and :func:`serve`; this package's
``__init__`` stays light so that the CLI starts fast.
"""
