"""``python -m workload.example``: run the example clean-room workload (see app.py)."""

from workload.example.app import main

raise SystemExit(main())
