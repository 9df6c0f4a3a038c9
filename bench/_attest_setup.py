"""What the attestation benchmark (:mod:`bench.bench_attest`) and its in-process breakdown
(:mod:`bench._breakdown`) share: the parties and the workload they approve.

It is its own module so that neither of the two imports the other for it.
"""

from __future__ import annotations

PARTIES = ("advertiser", "publisher")
#: The workload the parties approve and the sidecars measure (path, contents).
WORKLOAD = (
    ("model/train.py", b"import pandas\n# join the parties' data and train\n" * 40),
    ("model/insights.py", b"def insights(df):\n    return df.describe()\n" * 20),
    ("bin/run.sh", b"#!/bin/sh\nexec python -m model.train\n"),
)

__all__ = ["PARTIES", "WORKLOAD"]
