"""``python -m broker ...`` is ``cleanroom broker ...``."""

import sys

from cleanroom.app.cli import main

raise SystemExit(main(["broker", *sys.argv[1:]]))
