"""``python -m broker.storage upgrade|current URL``: run or inspect the schema migrations.

The broker migrates on start (``Store.open(url, migrate=True)``); this entry point is for
operators who prefer to upgrade explicitly (e.g. before rolling out new replicas that start
with ``migrate=False``).
"""

from __future__ import annotations

import argparse
import sys

from broker.errors import StorageError
from broker.storage import migrate
from broker.storage.store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.storage", description=__doc__)
    parser.add_argument("command", choices=["upgrade", "current", "head"])
    parser.add_argument("url", nargs="?", help="database URL (sqlite:///... or postgresql+...)")
    args = parser.parse_args(argv)
    if args.command == "head":
        print(migrate.head_revision())
        return 0
    if not args.url:
        parser.error("a database URL is needed")
    try:
        if args.command == "upgrade":
            with Store.open(args.url, migrate=True) as store:
                print(f"{store.display_url} is at revision {migrate.head_revision()}")
        else:
            with Store.open(args.url, migrate=False) as store:
                print(f"{store.display_url} is at revision {migrate.head_revision()}")
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
