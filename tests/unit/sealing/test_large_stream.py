"""A multi-GiB stream sealed and opened through a pipe in constant memory."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import tracemalloc
from collections.abc import Iterator

import pytest

from sealing import envelope
from sealing.envelope import OpenReader, SealWriter

GIB = 1 << 30
STREAM_SIZE = 3 * GIB
# Python-level allocations may not grow with the stream; two chunk buffers per side plus
# slack is all that is allowed.
MAX_TRACED_PEAK = 12 << 20
MAX_RSS_GROWTH = 64 << 20


def _generate(block: memoryview, total: int) -> Iterator[memoryview]:
    """Slices of ``block`` in pieces whose sizes do not line up with the chunk size."""
    sizes = (1_000_003, 65_537, 3_333_333, 1, 777_777)
    sent = 0
    i = 0
    while sent < total:
        n = min(sizes[i % len(sizes)], total - sent)
        offset = (i * 7919) % (len(block) - n + 1)
        yield block[offset : offset + n]
        sent += n
        i += 1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_three_gib_round_trip_in_constant_memory() -> None:
    dk = envelope.new_data_key()
    read_fd, write_fd = os.pipe()
    for fd in (read_fd, write_fd):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # a smaller pipe is slower, not wrong
    produced = hashlib.sha256()
    consumed = hashlib.sha256()
    result: dict[str, object] = {}
    rss_samples: list[int] = []

    def consume() -> None:
        try:
            with open(read_fd, "rb") as src, OpenReader(src, data_key=dk) as reader:
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                total = 0
                while n := reader.readinto(buf):
                    consumed.update(view[:n])
                    total += n
                    if total % (256 << 20) < n:
                        rss_samples.append(_rss())
                result["size"] = total
                result["complete"] = reader.complete
        except BaseException as e:
            result["error"] = e

    block = memoryview(os.urandom(4 << 20))
    rss_before = _rss()
    tracemalloc.start()
    try:
        consumer = threading.Thread(target=consume)
        consumer.start()
        with open(write_fd, "wb") as sink, SealWriter(sink, data_key=dk, key_id="big") as writer:
            for piece in _generate(block, STREAM_SIZE):
                produced.update(piece)
                writer.write(piece)
        consumer.join(timeout=240)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert not consumer.is_alive()
    assert "error" not in result, result.get("error")
    assert result["size"] == STREAM_SIZE
    assert result["complete"] is True
    assert consumed.digest() == produced.digest()
    assert peak < MAX_TRACED_PEAK, f"traced peak {peak / 2**20:.1f} MiB"
    assert rss_samples
    growth = max(rss_samples) - rss_before
    assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth / 2**20:.1f} MiB"
