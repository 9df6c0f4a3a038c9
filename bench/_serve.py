"""The broker of a benchmark run with a worker-pool size ``cleanroom broker serve`` does not
offer (in one process, or several sharing the port as with ``--processes``).

It is ``cleanroom broker serve --log-json`` otherwise: the same configuration file, the same
JSON access log on stderr, the same readiness lines on stdout.

    python -m bench._serve --config broker.toml [--max-workers 64] [--processes N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from broker.config import load_broker_config
from broker.server.logs import configure_logging
from broker.server.processes import serve_processes
from broker.server.server import DEFAULT_MAX_WORKERS, ServerAddresses, serve


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench._serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    config = load_broker_config(args.config)
    configure_logging(json_output=True, level=logging.INFO)

    def ready(addresses: ServerAddresses) -> None:
        print(f"broker listening on {addresses.grpc} (gRPC, mTLS)", flush=True)
        if addresses.metrics is not None:
            print(f"metrics on http://{addresses.metrics}/metrics", flush=True)

    if args.processes == 1:
        serve(config, on_ready=ready, max_workers=args.max_workers)
        return 0

    def all_ready(addresses: Sequence[ServerAddresses]) -> None:
        print(f"broker listening on {addresses[0].grpc} (gRPC, mTLS)", flush=True)

    serve_processes(
        config,
        processes=args.processes,
        on_ready=all_ready,
        max_workers=args.max_workers,
        log_json=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
