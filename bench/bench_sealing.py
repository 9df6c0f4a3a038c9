"""Sealing and opening throughput next to plain AES-256-GCM over the same bytes.

Everything is memory to memory (a sink that discards), so the figures are the format's own
cost. The baselines, measured in the same run, are ``AESGCM.encrypt`` and ``AESGCM.decrypt``
over the same bytes in chunks of the same size. A reference row adds the copy out of an
in-memory stream that any reader pays before decrypting (``BytesIO.readinto`` then
``AESGCM.decrypt_into``). Each figure is the best of ``--repeat`` rounds.

    python -m bench.bench_sealing --size 512 --repeat 5
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealing.envelope import DEFAULT_CHUNK_SIZE, OpenReader, SealWriter, new_data_key

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MIB = 1 << 20


class _NullSink:
    """Discards everything, like /dev/null without the system call."""

    def write(self, data: ReadableBuffer, /) -> int:
        return memoryview(data).nbytes


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_sealing", description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="MiB to seal and open (512)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes")
    parser.add_argument("--repeat", type=int, default=5, help="rounds, best kept (5)")
    args = parser.parse_args(argv)
    size = args.size * MIB
    chunk = args.chunk_size
    data = memoryview(os.urandom(size))
    dk = new_data_key()
    aead = AESGCM(dk)
    nonce = bytes(12)

    def baseline_encrypt() -> None:
        for off in range(0, size, chunk):
            aead.encrypt(nonce, data[off : off + chunk], None)

    sealed_chunks = b"".join(
        aead.encrypt(nonce, data[off : off + chunk], None) for off in range(0, size, chunk)
    )
    cipher_view = memoryview(sealed_chunks)
    step = chunk + 16

    def baseline_decrypt() -> None:
        for off in range(0, len(cipher_view), step):
            aead.decrypt(nonce, cipher_view[off : off + step], None)

    in_buf = bytearray(chunk + 16)
    out_buf = bytearray(chunk)

    def baseline_read_decrypt() -> None:
        # The least a stream reader must do: copy each chunk out of the stream, then decrypt.
        src = io.BytesIO(sealed_chunks)
        while n := src.readinto(in_buf):
            aead.decrypt_into(nonce, memoryview(in_buf)[:n], None, memoryview(out_buf)[: n - 16])

    def seal() -> None:
        with SealWriter(_NullSink(), data_key=dk, key_id="bench", chunk_size=chunk) as w:
            w.write(data)

    out = io.BytesIO()
    with SealWriter(out, data_key=dk, key_id="bench", chunk_size=chunk) as w:
        w.write(data)
    sealed = out.getvalue()
    del out

    def open_copy_to() -> None:
        with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
            r.copy_to(_NullSink())

    buf = bytearray(chunk)

    def open_readinto() -> None:
        with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
            while r.readinto(buf):
                pass

    def open_chunks() -> None:
        with OpenReader(io.BytesIO(sealed), data_key=dk) as r:
            for _ in r.chunks():
                pass

    # Rounds interleave all variants, so that load from elsewhere on the machine hits them
    # alike; the best round of each is kept.
    variants: dict[str, tuple[Callable[[], None], str]] = {
        "AES-256-GCM encrypt (baseline)": (baseline_encrypt, "encrypt"),
        "AES-256-GCM decrypt (baseline)": (baseline_decrypt, "decrypt"),
        "BytesIO read + decrypt (reference)": (baseline_read_decrypt, "decrypt"),
        "seal: SealWriter.write": (seal, "encrypt"),
        "open: OpenReader.copy_to": (open_copy_to, "decrypt"),
        "open: OpenReader.readinto": (open_readinto, "decrypt"),
        "open: OpenReader.chunks": (open_chunks, "decrypt"),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeat):
        for name, (fn, _) in variants.items():
            best[name] = min(best[name], _time(fn))
    base = {
        "encrypt": best["AES-256-GCM encrypt (baseline)"],
        "decrypt": best["AES-256-GCM decrypt (baseline)"],
    }
    rows = [
        (name, size / best[name] / 1e6, f"{base[kind] / best[name]:.2f} of {kind}")
        for name, (_, kind) in variants.items()
    ]

    print(f"{args.size} MiB in {chunk}-byte chunks, best of {args.repeat}")
    print(f"{'':34} {'MB/s':>9}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:34} {rate:9,.0f}  {ratio}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
