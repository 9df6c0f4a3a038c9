"""The cost of re-checking a reader's process before every chunk, next to decrypting the chunk.

The workload socket asks, before each chunk of an open stream, whether the process that
connected is still alive and still in the workload's process tree. In full that is its start
time, then its parent chain in /proc up to the workload's root; as served, one poll(2) over
pidfds of that chain, with the full check only when one of them exited. This measures both for
a reader two levels below the root (the root's grandchild), and, in the same run, the time
the sidecar spends opening one sealed chunk with :class:`sealing.envelope.OpenReader`
(AES-256-GCM), for the default chunk size (1 MiB) and for 64 KiB chunks.

    python -m bench.bench_peercheck --rounds 2000
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import time

from sealing.envelope import OpenReader, new_data_key, seal_bytes
from sidecar.dataplane.config import DEFAULT_CHUNK_SIZE
from sidecar.dataplane.peers import ProcessTree, process_start_time

# The root starts a child that starts a grandchild; the grandchild prints its pid and waits.
_LEAF = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
_MIDDLE = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_LEAF!r}])"
_ROOT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_MIDDLE!r}])"


def _start_chain() -> tuple[subprocess.Popen[str], int]:
    root = subprocess.Popen([sys.executable, "-c", _ROOT], stdout=subprocess.PIPE, text=True)
    assert root.stdout is not None
    return root, int(root.stdout.readline())


def _check_seconds(tree: ProcessTree, pid: int, uid: int, rounds: int) -> float:
    start_time = process_start_time(pid)
    begin = time.perf_counter()
    for _ in range(rounds):
        # What WorkloadServer does before each chunk (_peer_refusal).
        if process_start_time(pid) != start_time or not tree(pid, uid):
            raise AssertionError("the reader should pass the check")
    return (time.perf_counter() - begin) / rounds


def _watch_seconds(tree: ProcessTree, pid: int, rounds: int) -> float:
    watch = tree.watch(pid)
    assert watch is not None
    try:
        begin = time.perf_counter()
        for _ in range(rounds):
            # What WorkloadServer does before each chunk with a ProcessTree: the full check
            # only when a process of the reader's lineage exited.
            if not watch.intact():
                raise AssertionError("the reader's lineage should be intact")
        return (time.perf_counter() - begin) / rounds
    finally:
        watch.close()


def _decrypt_seconds(chunk: int, chunks: int) -> float:
    key = new_data_key()
    sealed = seal_bytes(os.urandom(chunk * chunks), data_key=key, key_id="bench", chunk_size=chunk)
    buf = bytearray(chunk)
    best = float("inf")
    for _ in range(3):
        reader = OpenReader(io.BytesIO(sealed), data_key=key)
        begin = time.perf_counter()
        while reader.readinto(buf):
            pass
        best = min(best, (time.perf_counter() - begin) / chunks)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2000, help="peer checks to time")
    args = parser.parse_args(argv)
    root, leaf = _start_chain()
    try:
        tree = ProcessTree(root_pid=root.pid)
        check = min(_check_seconds(tree, leaf, os.geteuid(), args.rounds) for _ in range(3))
        watch = min(_watch_seconds(tree, leaf, args.rounds) for _ in range(3))
    finally:
        # The leaf first: its parent then returns, and so does the root.
        os.kill(leaf, signal.SIGKILL)
        root.wait()
    print(f"full peer check (reader 2 levels below the root, /proc walk): {check * 1e6:.1f} us")
    print(f"per-chunk check as served (pidfd lineage poll): {watch * 1e6:.2f} us")
    for chunk, chunks in ((DEFAULT_CHUNK_SIZE, 32), (64 << 10, 256)):
        decrypt = _decrypt_seconds(chunk, chunks)
        print(
            f"decrypting one {chunk >> 10} KiB chunk (baseline): {decrypt * 1e6:.1f} us; "
            f"the per-chunk check adds {watch / decrypt * 100:.2f} % "
            f"(a full check each time would add {check / decrypt * 100:.1f} %)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
