"""Data-path throughput: plaintext to the workload over the sidecar's socket, and outputs sealed.

Every figure moves the same number of bytes (``--size``, 2 GiB by default) and is reported as
GB/s (10**9 bytes per second) and as ratios to two baselines measured in the same run:

- AES-256-GCM on one core (``AESGCM.decrypt_into`` / ``encrypt_into`` in 1 MiB segments, memory
  to memory): what the cryptography alone costs;
- a bare gRPC stream over a Unix socket of the same kind (same message sizes and framing, no
  crypto, no gate, no files), in its own server and client processes.

Two more rows isolate the parts: the same bare stream through the sidecar's SO_PEERCRED gate
(the splice proxy in front of gRPC), and opening the sealed input in one process with nothing
else (``OpenReader.readinto`` to memory).

The data-path rows run like production: a sidecar process (``WorkloadServer`` with a
``ProcessTree`` peer check) starts the workload as its child, which uses the workload SDK (data
connections on the workload socket: framed bytes, not gRPC; docs/workload-sdk.md). The reader
child reads the input to the end (``InputStream.chunks()``, end-of-input authenticated); the
writer child streams ``--size`` bytes into an output that the sidecar seals to one recipient
and commits (fsync included). The bare gRPC rows stay as the reference of the transport the
SDK used before. The input is sealed on the fly into a temporary file (deleted after)
and is read from the page cache. The sidecar's peak RSS is its ``ru_maxrss`` at the end of the
phase, one sidecar process per phase.

    python -m bench.bench_datapath --size 256M
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

MIB = 1 << 20
GB = 1e9
CHUNK = 1 << 20
_REPO = Path(__file__).resolve().parents[1]


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    value = int(t[: len(t) - len(unit)])
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value * units[unit]


def _pattern() -> bytes:
    # Content does not change AES-GCM's or gRPC's cost; one random MiB repeated is enough.
    return os.urandom(CHUNK)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> float:
    """CPU seconds (user + system) this process used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _child(role: str, *args: str, stdin: Any = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_datapath", "--role", role, *args],
        cwd=_REPO,
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


def _result_of(proc: subprocess.Popen[str], stdin: str | None = None) -> dict[str, Any]:
    out, _ = proc.communicate(stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- workload side -------------------------------------------------------------------------


def _role_reader(sock: str, name: str, bare: bool) -> None:
    from workload.client import Client

    total = 0
    cpu = _cpu()
    start = time.perf_counter()
    if bare:
        import grpc

        from workload.wire import decode_read_response

        with grpc.insecure_channel(f"unix:{sock}", options=_grpc_options()) as ch:
            call = ch.unary_stream(
                "/bench.Bare/Read", request_serializer=None, response_deserializer=None
            )
            for raw in call(b""):
                frame = decode_read_response(raw)
                total += len(frame.chunk)
    else:
        with Client(sock) as client, client.open_input(name) as stream:
            for chunk in stream.chunks():
                total += len(chunk)
    seconds = time.perf_counter() - start
    _emit({"bytes": total, "seconds": seconds, "cpu": _cpu() - cpu, "peak_rss": _peak_rss()})


def _role_writer(sock: str, name: str, size: int, bare: bool) -> None:
    from workload.client import Client
    from workload.wire import encode_write_chunk

    data = _pattern()
    cpu = _cpu()
    start = time.perf_counter()
    if bare:
        import grpc

        def frames() -> Iterator[bytes]:
            left = size
            while left > 0:
                n = min(left, CHUNK)
                yield encode_write_chunk(memoryview(data)[:n])
                left -= n

        with grpc.insecure_channel(f"unix:{sock}", options=_grpc_options()) as ch:
            call = ch.stream_unary(
                "/bench.Bare/Write", request_serializer=None, response_deserializer=None
            )
            call(frames())
    else:
        with Client(sock) as client, client.create_output(name) as out:
            left = size
            while left > 0:
                n = min(left, CHUNK)
                out.write(memoryview(data)[:n])
                left -= n
    seconds = time.perf_counter() - start
    _emit({"bytes": size, "seconds": seconds, "cpu": _cpu() - cpu, "peak_rss": _peak_rss()})


# --- bare gRPC baseline --------------------------------------------------------------------


def _grpc_options() -> list[tuple[str, Any]]:
    # The same options the sidecar and the SDK use, so the baseline differs only in content.
    return [
        ("grpc.max_receive_message_length", 4 << 20),
        ("grpc.max_send_message_length", 4 << 20),
        ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 1 << 20),
    ]


def _role_bare_server(workdir: str, size: int, gated: bool) -> None:
    import grpc

    from workload.wire import END_OF_INPUT, decode_write_request, encode_read_chunk

    frame = encode_read_chunk(_pattern())

    def read(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        left = size
        while left >= CHUNK:
            yield frame
            left -= CHUNK
        if left:
            yield encode_read_chunk(_pattern()[:left])
        yield END_OF_INPUT

    def write(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for raw in requests:
            _, chunk = decode_write_request(raw)
            total += 0 if chunk is None else len(chunk)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_grpc_options())
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(read),
        "Write": grpc.stream_unary_rpc_method_handler(write),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", handlers),))
    internal = Path(workdir) / "bare-grpc.sock"
    server.add_insecure_port(f"unix:{internal}")
    server.start()
    public = internal
    gate = None
    if gated:
        from sidecar.dataplane.gate import PeerGate

        public = Path(workdir) / "bare-gate.sock"
        gate = PeerGate(listen_path=public, upstream_path=internal)
        gate.start()
    _emit({"socket": str(public)})
    cpu = _cpu()
    sys.stdin.read()  # until the orchestrator closes our stdin
    used = _cpu() - cpu
    if gate is not None:
        gate.stop()
    server.stop(0).wait()
    _emit({"cpu": used, "peak_rss": _peak_rss()})


def _bare(workdir: Path, size: int, *, gated: bool, direction: str) -> dict[str, Any]:
    server = _child(
        "bare-server",
        "--workdir",
        str(workdir),
        "--size",
        str(size),
        *(["--gated"] if gated else []),
        stdin=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdin is not None
    sock = json.loads(server.stdout.readline())["socket"]
    role = "reader" if direction == "read" else "writer"
    result = _result_of(_child(role, "--socket", sock, "--size", str(size), "--bare"))
    server.stdin.close()
    result["server_cpu"] = json.loads(server.stdout.readline())["cpu"]
    server.wait()
    return result


# --- sidecar side --------------------------------------------------------------------------


def _role_sidecar(workdir: str, size: int, phase: str, output_dir: str) -> None:
    from sealing.keys import generate_recipient_key
    from sidecar.dataplane import (
        InputSpec,
        KeyRing,
        LocalDirectoryOutput,
        ProcessTree,
        WorkloadServer,
    )

    key = bytes.fromhex(sys.stdin.readline().strip())
    work = Path(workdir)
    recipient = generate_recipient_key()
    tree = ProcessTree()
    with (
        KeyRing(valid_until=None) as ring,
        WorkloadServer(
            socket_dir=work / f"sock-{phase}",
            inputs=[InputSpec("bench.bin", str(work / "input.sealed"), "bench-key", "bench")],
            keyring=ring,
            outputs=LocalDirectoryOutput(output_dir),
            recipients=[("bench", recipient.public_key())],
            allowed_peer=tree,
        ) as server,
    ):
        ring.add("bench-key", key)
        role = "reader" if phase == "read" else "writer"
        cpu = _cpu()
        child = _child(
            role, "--socket", str(server.socket_path), "--size", str(size), "--name", "bench.bin"
        )
        tree.set_root(child.pid)
        result = _result_of(child)
        result["server_cpu"] = _cpu() - cpu
    result["server_peak_rss"] = _peak_rss()
    _emit(result)


def _datapath(workdir: Path, size: int, key: bytes, phase: str, output_dir: Path) -> dict[str, Any]:
    proc = _child(
        "sidecar",
        "--workdir",
        str(workdir),
        "--size",
        str(size),
        "--phase",
        phase,
        "--output-dir",
        str(output_dir),
        stdin=subprocess.PIPE,
    )
    return _result_of(proc, key.hex() + "\n")


# --- in-process baselines --------------------------------------------------------------------


def _aes(size: int) -> tuple[float, float]:
    """(decrypt GB/s, encrypt GB/s) of AES-256-GCM on one core, 1 MiB segments."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = bytes(12)
    plain = memoryview(bytearray(_pattern()))
    sealed = memoryview(bytearray(CHUNK + 16))
    aead.encrypt_into(nonce, plain, None, sealed)
    rounds = max(1, size // CHUNK)
    start = time.perf_counter()
    for _ in range(rounds):
        aead.decrypt_into(nonce, sealed, None, plain)
    dec = rounds * CHUNK / (time.perf_counter() - start) / GB
    start = time.perf_counter()
    for _ in range(rounds):
        aead.encrypt_into(nonce, plain, None, sealed)
    enc = rounds * CHUNK / (time.perf_counter() - start) / GB
    return dec, enc


def _make_input(path: Path, size: int, key: bytes) -> float:
    from sealing.envelope import SealWriter

    data = memoryview(_pattern())
    start = time.perf_counter()
    with open(path, "wb") as f, SealWriter(f, data_key=key, key_id="bench-key") as w:
        left = size
        while left > 0:
            n = min(left, CHUNK)
            w.write(data[:n])
            left -= n
    return size / (time.perf_counter() - start) / GB


def _plain_write(directory: Path, size: int) -> float:
    """GB/s of writing ``size`` bytes to a new file in ``directory`` and fsyncing it: what the
    storage allows any output, sealed or not."""
    data = memoryview(_pattern())
    path = directory / "plain-write.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            n = min(left, CHUNK)
            f.write(data[:n])
            left -= n
        os.fsync(f.fileno())
    rate = size / (time.perf_counter() - start) / GB
    path.unlink()
    return rate


def _open_input(path: Path, key: bytes) -> float:
    from sealing.envelope import OpenReader

    buf = bytearray(CHUNK)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f, OpenReader(f, data_key=key) as r:
        while n := r.readinto(buf):
            total += n
    return total / (time.perf_counter() - start) / GB


# --- orchestration ---------------------------------------------------------------------------


def _rate(result: dict[str, Any]) -> float:
    return float(result["bytes"]) / float(result["seconds"]) / GB


def _best(runs: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The fastest of ``runs`` measurements (the machine may be shared; the best run is the one
    least disturbed). Peak RSS is the largest seen across runs."""
    results = [measure() for _ in range(runs)]
    best = max(results, key=_rate)
    if "server_peak_rss" in best:
        best["server_peak_rss"] = max(r["server_peak_rss"] for r in results)
    return best


class _Table:
    def __init__(self) -> None:
        self.lines = [
            f"{'':<44} {'GB/s':>6} {'xAES':>5} {'xgRPC':>5} "
            f"{'CPU s/GB':>8} {'(sidecar':>8} {'workload)':>9} {'RSS MiB':>7}"
        ]

    def add(
        self,
        name: str,
        rate: float,
        *,
        aes: float | None = None,
        bare: float | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        a = f"{rate / aes:5.2f}" if aes else "    -"
        b = f"{rate / bare:5.2f}" if bare else "    -"
        cpu = side = work = rss = ""
        if result is not None:
            gb = float(result["bytes"]) / GB
            side_cpu = float(result.get("server_cpu", 0.0)) / gb
            work_cpu = float(result["cpu"]) / gb
            cpu, side, work = f"{side_cpu + work_cpu:.2f}", f"{side_cpu:.2f}", f"{work_cpu:.2f}"
            if "server_peak_rss" in result:
                rss = f"{result['server_peak_rss'] / MIB:.0f}"
        self.lines.append(f"{name:<44} {rate:6.2f} {a} {b} {cpu:>8} {side:>8} {work:>9} {rss:>7}")

    def print(self) -> None:
        print("\n".join(self.lines))


def _orchestrate(size: int, output_root: Path | None, runs: int) -> None:
    from sealing.envelope import new_data_key

    workdir = Path(tempfile.mkdtemp(prefix="bench-dp-", dir="/tmp"))
    out_parent = output_root or workdir
    output_dir = Path(tempfile.mkdtemp(prefix="bench-dp-out-", dir=out_parent))
    shm = Path("/dev/shm")
    tmpfs_dir = Path(tempfile.mkdtemp(prefix="bench-dp-out-", dir=shm)) if shm.is_dir() else None
    key = new_data_key()
    try:
        print(
            f"size {size / MIB:.0f} MiB, message chunk {CHUNK // 1024} KiB, "
            f"{os.cpu_count()} CPUs, best of {runs} run(s); load average before: "
            f"{os.getloadavg()[0]:.2f}"
        )
        aes_dec, aes_enc = max(_aes(size) for _ in range(runs))
        seal_rate = _make_input(workdir / "input.sealed", size, key)
        open_rate = max(_open_input(workdir / "input.sealed", key) for _ in range(runs))
        disk_rate = max(_plain_write(output_dir, size) for _ in range(runs))
        bare_r = _best(runs, lambda: _bare(workdir, size, gated=False, direction="read"))
        bare_w = _best(runs, lambda: _bare(workdir, size, gated=False, direction="write"))
        gate_r = _best(runs, lambda: _bare(workdir, size, gated=True, direction="read"))
        gate_w = _best(runs, lambda: _bare(workdir, size, gated=True, direction="write"))
        read = _best(runs, lambda: _datapath(workdir, size, key, "read", output_dir))

        def write_once(directory: Path) -> dict[str, Any]:
            result = _datapath(workdir, size, key, "write", directory)
            (directory / "bench.bin.sealed").unlink()
            return result

        write = _best(runs, lambda: write_once(output_dir))
        write_tmpfs = _best(runs, lambda: write_once(tmpfs_dir)) if tmpfs_dir else None
        if read["bytes"] != size:
            raise RuntimeError(f"reader got {read['bytes']} bytes, expected {size}")
        r_rate, w_rate = _rate(read), _rate(write)
        t = _Table()
        t.add("AES-256-GCM decrypt, one core (baseline a)", aes_dec)
        t.add("AES-256-GCM encrypt, one core (baseline a)", aes_enc)
        t.add("bare gRPC stream, read direction (baseline b)", _rate(bare_r), result=bare_r)
        t.add("bare gRPC stream, write direction (baseline b)", _rate(bare_w), result=bare_w)
        t.add(
            "  the same through the SO_PEERCRED gate",
            _rate(gate_r),
            bare=_rate(bare_r),
            result=gate_r,
        )
        t.add(
            "  the same through the SO_PEERCRED gate",
            _rate(gate_w),
            bare=_rate(bare_w),
            result=gate_w,
        )
        t.add("seal the input to a file, one process", seal_rate, aes=aes_enc)
        t.add("open the sealed file to memory, one process", open_rate, aes=aes_dec)
        t.add("plain write + fsync to the output directory", disk_rate)
        t.add(
            "DATA PATH read: plaintext to the workload",
            r_rate,
            aes=aes_dec,
            bare=_rate(bare_r),
            result=read,
        )
        t.add(
            "DATA PATH write: sealed, committed (disk)",
            w_rate,
            aes=aes_enc,
            bare=_rate(bare_w),
            result=write,
        )
        if write_tmpfs is not None:
            t.add(
                "DATA PATH write: sealed, committed (tmpfs)",
                _rate(write_tmpfs),
                aes=aes_enc,
                bare=_rate(bare_w),
                result=write_tmpfs,
            )
        t.print()
        print(f"the disk row: output directory {output_dir.parent}; tmpfs row: /dev/shm")
        for label, result, aes in (
            ("read", read, aes_dec),
            ("write (disk)", write, aes_enc),
            ("write (tmpfs)", write_tmpfs, aes_enc),
        ):
            if result is None:
                continue
            rss = result["server_peak_rss"]
            goal = "met" if _rate(result) >= 0.5 * aes and rss <= 200 * MIB else "NOT met"
            print(f"goal for {label} (>= 0.5 xAES, sidecar peak RSS <= 200 MiB): {goal}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(output_dir, ignore_errors=True)
        if tmpfs_dir is not None:
            shutil.rmtree(tmpfs_dir, ignore_errors=True)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_datapath", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=_parse_size, default=2 << 30, help="bytes (2G)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the sealed output goes (default: a temporary directory under /tmp)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per row, best kept (1)")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--socket", default="", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="bench.bin", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="read", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    if args.role is None:
        _orchestrate(args.size, args.output_dir, max(1, args.repeat))
    elif args.role == "reader":
        _role_reader(args.socket, args.name, args.bare)
    elif args.role == "writer":
        _role_writer(args.socket, args.name, args.size, args.bare)
    elif args.role == "bare-server":
        _role_bare_server(args.workdir, args.size, args.gated)
    elif args.role == "sidecar":
        _role_sidecar(args.workdir, args.size, args.phase, str(args.output_dir))
    else:
        parser.error(f"unknown role {args.role}")


if __name__ == "__main__":
    main(sys.argv[1:])
