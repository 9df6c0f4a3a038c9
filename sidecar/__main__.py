"""``python -m sidecar ...`` is ``cleanroom sidecar ...``."""

import sys

from cleanroom.cli import main

raise SystemExit(main(["sidecar", *sys.argv[1:]]))
