"""One broker process of a benchmark run, for the layouts ``cleanroom broker serve`` does not
offer: several processes sharing one port (SO_REUSEPORT) or another worker-pool size.

It is ``cleanroom broker serve --log-json`` otherwise: the same configuration file, the same
JSON access log on stderr, the same readiness lines on stdout.

    python -m bench._serve --config broker.toml [--max-workers 64] [--reuse-port]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from broker.config import load_broker_config
from broker.server.logs import configure_logging
from broker.server.server import DEFAULT_MAX_WORKERS, ServerAddresses, serve


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench._serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    config = load_broker_config(args.config)
    configure_logging(json_output=True, level=logging.INFO)

    def ready(addresses: ServerAddresses) -> None:
        print(f"broker listening on {addresses.grpc} (gRPC, mTLS)", flush=True)
        if addresses.metrics is not None:
            print(f"metrics on http://{addresses.metrics}/metrics", flush=True)

    serve(config, on_ready=ready, max_workers=args.max_workers, reuse_port=args.reuse_port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
