"""``python -m sidecar ...`` is ``cleanroom sidecar ...``."""

import sys

from cleanroom.app.cli import main

raise SystemExit(main(["sidecar", *sys.argv[1:]]))
