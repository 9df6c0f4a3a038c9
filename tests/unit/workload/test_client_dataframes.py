"""The workload SDK with the data scientists' stack, against a real sidecar data path:
pandas and pyarrow read ``open_input`` streams directly, DataFrames and figures write to
``create_output``, Parquet reads through a bounded in-memory seekable copy. The streaming
readers keep no plaintext file under the temporary directory and hold memory independent of the
input's size (measured in child processes against a small input in the same run)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sidecar.dataplane import ProcessTree
from tests.support.dataplane import (
    Party,
    Session,
    only_this_process,
    open_sealed,
    running_session,
)
from workload import Client, InputTooLargeError, seekable_copy

ROOT = Path(__file__).resolve().parents[3]
OWNER = Party("advertiser")
FRAME = pd.DataFrame(
    {
        "user_id": [f"u{i:06d}" for i in range(20_000)],
        "segment": [f"s{i % 7}" for i in range(20_000)],
        "spend": [i % 1000 for i in range(20_000)],
    }
)
CSV = FRAME.to_csv(index=False).encode()


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with running_session(
        tmp_path,
        inputs={"table.csv": (CSV, OWNER), "table.parquet": (_parquet(FRAME), OWNER)},
        recipients=[OWNER],
        allowed_peer=only_this_process,
    ) as s:
        yield s


def test_the_sdk_imports_none_of_the_data_stack() -> None:
    # The SDK and the sidecar stay lean: the stack is the optional group "example".
    code = (
        "import sys, workload, sidecar.dataplane\n"
        "heavy = {'pandas', 'pyarrow', 'sklearn', 'scipy', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_pandas_reads_an_input_stream_directly(session: Session) -> None:
    with Client(session.socket) as client:
        frame = pd.read_csv(client.open_input("table.csv"))
        pd.testing.assert_frame_equal(frame, FRAME)
        chunks = list(pd.read_csv(client.open_input("table.csv"), chunksize=3000))
        assert len(chunks) == 7
        pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), FRAME)


def test_pyarrow_csv_readers_take_the_same_stream(session: Session) -> None:
    with Client(session.socket) as client:
        table = pacsv.read_csv(client.open_input("table.csv"))
        assert table.num_rows == len(FRAME) and table.column_names == list(FRAME.columns)
        streamed = pacsv.open_csv(
            client.open_input("table.csv"), read_options=pacsv.ReadOptions(block_size=64 << 10)
        )
        batches = list(streamed)
        assert len(batches) > 1
        assert pa.Table.from_batches(batches).equals(table)


def test_parquet_reads_through_a_bounded_seekable_copy(session: Session) -> None:
    with Client(session.socket) as client:
        frame = pq.read_table(client.open_seekable_input("table.parquet")).to_pandas()
        pd.testing.assert_frame_equal(frame, FRAME)
        size = len(_parquet(FRAME))
        with pytest.raises(InputTooLargeError, match=r"'table.parquet' is larger than"):
            client.open_seekable_input("table.parquet", max_bytes=size - 1)
        assert len(client.open_seekable_input("table.parquet", max_bytes=size).getbuffer()) == size


def test_seekable_copy_stops_reading_past_its_limit() -> None:
    source = io.BytesIO(b"x" * 10_000)
    with pytest.raises(InputTooLargeError):
        seekable_copy(source, max_bytes=100)
    # It read one byte past the limit to know, not the whole input.
    assert source.tell() == 101


def test_dataframes_and_figures_write_to_outputs(session: Session) -> None:
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1, 2])
    with Client(session.socket) as client:
        with client.create_output("frame.csv") as out:
            FRAME.to_csv(out, index=False, chunksize=5000)
        with client.create_output("frame.parquet") as out:
            FRAME.to_parquet(out, index=False)
        with client.create_output("figure.png") as out:
            # The stubs want IO[Any]; an OutputStream is a RawIOBase, which savefig accepts.
            fig.savefig(cast(IO[bytes], out), format="png")
        with client.create_output("figure.svg") as out:
            fig.savefig(cast(IO[bytes], out), format="svg")
    plt.close(fig)
    key = OWNER.recipient
    assert open_sealed(session.output_dir / "frame.csv.sealed", key) == CSV
    parquet = open_sealed(session.output_dir / "frame.parquet.sealed", key)
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(parquet)), FRAME)
    assert open_sealed(session.output_dir / "figure.png.sealed", key).startswith(b"\x89PNG")
    assert b"<svg" in open_sealed(session.output_dir / "figure.svg.sealed", key)


# --- streaming: no plaintext file, memory independent of the input's size ------------------------

#: The child: reads an input with one of the stack's streaming readers, writes a DataFrame and a
#: figure to outputs, and reports its peak resident memory.
_CHILD = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pyarrow.csv as pacsv
import workload

reader, name = sys.argv[1], sys.argv[2]
totals = None
if reader == "pandas":
    for chunk in pd.read_csv(workload.open_input(name), chunksize=100_000):
        part = chunk.groupby("segment")["spend"].sum()
        totals = part if totals is None else totals.add(part, fill_value=0)
else:
    # One reading thread: with pyarrow's default thread pool, how many blocks are read ahead
    # depends on the machine's load, and so would the peak this test bounds.
    options = pacsv.ReadOptions(use_threads=False)
    for batch in pacsv.open_csv(workload.open_input(name), read_options=options):
        part = batch.to_pandas().groupby("segment")["spend"].sum()
        totals = part if totals is None else totals.add(part, fill_value=0)
with workload.create_output(f"{reader}-{name}.csv") as out:
    totals.to_frame().to_csv(out)
fig, ax = plt.subplots()
totals.plot.bar(ax=ax)
with workload.create_output(f"{reader}-{name}.png") as out:
    fig.savefig(out, format="png")
# VmHWM, not ru_maxrss: the latter also counts the forked parent's pages from before exec.
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"rss": peak}))
"""

LARGE_ROWS = 10_000_000  # about 150 MiB of CSV
#: The most a streaming reader's peak may grow from the small input to the large one: its
#: working buffers (pyarrow's memory pool keeps what it freed). Measured with pyarrow's
#: default thread pool: pandas +18 MiB, pyarrow +40 to +53 MiB, whether the input is 100 or
#: 200 MiB; the test once failed on a loaded machine, and pyarrow's read-ahead on several
#: threads is the part that depends on load, so the child reads with one thread. pandas
#: reading the whole input at once grows by 218 MiB.
MAX_GROWTH = 64 << 20


def _csv_rows(rows: int) -> bytes:
    # One block of distinct rows, repeated: building 100 MiB row by row would take long.
    block = b"".join(b"u%07d,s%d,%d\n" % (i, i % 7, i % 1000) for i in range(100_000))
    return b"user_id,segment,spend\n" + block * (rows // 100_000)


class _TempWatch:
    """Polls a directory tree and the child's open files for anything that could hold
    plaintext: a file under the temporary directory, or an unlinked file held open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(str(p) for p in self.directory.rglob("*"))
            if self.pid:
                try:
                    for fd in os.listdir(f"/proc/{self.pid}/fd"):
                        target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                        if target.startswith(str(self.directory)) or "(deleted)" in target:
                            self.seen.add(target)
                except OSError:
                    pass  # the child ended between the listing and the readlink
            time.sleep(0.005)

    def __enter__(self) -> _TempWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_stack_readers_stream_without_temp_files_in_bounded_memory(tmp_path: Path) -> None:
    large = _csv_rows(LARGE_ROWS)
    small = _csv_rows(100_000)
    tree = ProcessTree()
    temp = tmp_path / "tmp"
    temp.mkdir()
    peaks: dict[tuple[str, str], int] = {}
    with running_session(
        tmp_path / "session",
        inputs={"large": (large, OWNER), "small": (small, OWNER)},
        recipients=[OWNER],
        allowed_peer=tree,
    ) as session:
        del large
        env = {**session.env, "TMPDIR": str(temp), "MPLCONFIGDIR": str(tmp_path / "mpl")}
        for reader in ("pandas", "pyarrow"):
            for name in ("small", "large"):
                with _TempWatch(temp) as watch:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", _CHILD, reader, name],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    tree.set_root(proc.pid)
                    watch.pid = proc.pid
                    out, err = proc.communicate(timeout=240)
                assert proc.returncode == 0, err
                assert watch.seen == set(), (reader, name, watch.seen)
                peaks[(reader, name)] = json.loads(out)["rss"]
        totals = pd.read_csv(
            io.BytesIO(open_sealed(session.output_dir / "pandas-large.csv.sealed", OWNER.recipient))
        )
        assert totals["spend"].sum() == sum(i % 1000 for i in range(100_000)) * 100
        assert (session.output_dir / "pyarrow-large.png.sealed").is_file()
    for reader in ("pandas", "pyarrow"):
        growth = peaks[(reader, "large")] - peaks[(reader, "small")]
        # 100 times the input, and the peak grows by less than half of the large input's size.
        assert growth < MAX_GROWTH < len(small) * 100 // 2, (reader, peaks)
