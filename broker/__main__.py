"""``python -m broker ...`` is ``cleanroom broker ...``."""

import sys

from cleanroom.cli import main

raise SystemExit(main(["broker", *sys.argv[1:]]))
