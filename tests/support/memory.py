"""This process's resident memory, read from /proc, for the tests that promise a stream of any
size runs in bounded memory."""

from __future__ import annotations

import re
from pathlib import Path


def rss() -> tuple[int, int]:
    """(peak RSS since the last reset, current RSS) of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    current = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert hwm and current
    return int(hwm.group(1)) * 1024, int(current.group(1)) * 1024


def reset_peak_rss() -> int:
    """Resets the kernel's peak-RSS mark (clear_refs 5) and returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss()[1]
