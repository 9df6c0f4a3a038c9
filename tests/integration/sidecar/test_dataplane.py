"""The data path end to end: a workload subprocess using the SDK over the real Unix socket, real
gRPC, inputs sealed with the sealing package, outputs opened by each recipient's own key."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealing.errors import NoMatchingRecipientError, SealingError
from sidecar.dataplane import DataPlaneConfig, ProcessTree
from tests.support.dataplane import (
    Party,
    Session,
    open_sealed,
    running_session,
    settled_files,
    short_tempdir,
)
from workload import AccessDeniedError, Client

_REPO = Path(__file__).resolve().parents[3]

# The workload: lists and reads both inputs, stops so that the test can look at the disk, writes
# two outputs (pausing half-way through the second), and reports what it saw. It never sees a key.
WORKLOAD = textwrap.dedent(
    """
    import sys, workload

    def pause(tag):
        print(tag, flush=True)
        assert sys.stdin.readline().strip() == "go"

    names = sorted(i.name for i in workload.list_inputs())
    data = {}
    for name in names:
        with workload.open_input(name) as f:
            data[name] = f.read()
    rows = list(workload.read_csv("advertiser.csv"))
    pause("READ")
    with workload.create_output("joined.csv") as out:
        for name in names:
            out.write(data[name])
    with workload.create_output("summary/counts.txt") as out:
        out.write(b"advertiser rows: %d\\n" % len(rows))
        pause("WRITING")
        out.write(b"bytes: %d\\n" % sum(len(v) for v in data.values()))
    print("DONE", ",".join(names), flush=True)
    """
)


class Workload:
    """A workload subprocess started the way the sidecar starts it, stepped through its pauses."""

    def __init__(self, session: Session, tree: ProcessTree, code: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**session.env, "PYTHONPATH": str(_REPO)},
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        tree.set_root(self.proc.pid)

    def expect(self, line: str) -> str:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        if not got.startswith(line):
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"workload said {got!r}, expected {line!r}; stderr:\n{err}")
        return got

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.fixture
def spawn(
    session: Session, tree: ProcessTree, workdir: Path
) -> Iterator[Callable[[str], Workload]]:
    """Starts workloads; kills any still running when the test ends (a failed test must not
    leave a workload waiting on its stdin)."""
    started: list[Workload] = []

    def start(code: str) -> Workload:
        w = Workload(session, tree, code, workdir)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.communicate()


@pytest.fixture
def parties() -> dict[str, Party]:
    return {n: Party(n) for n in ("advertiser", "publisher", "carol")}


@pytest.fixture
def markers() -> tuple[bytes, bytes]:
    # Random per run, so no file on disk can hold them unless this test's plaintext leaked.
    return (f"ADV-{uuid.uuid4().hex}".encode(), f"PUB-{uuid.uuid4().hex}".encode())


@pytest.fixture
def plaintexts(markers: tuple[bytes, bytes]) -> dict[str, bytes]:
    adv, pub = markers
    advertiser = b"user,clicks,note\n" + b"".join(
        b"u%d,%d,%s\n" % (i, i % 5, adv) for i in range(20_000)
    )
    publisher = b"user,segment\n" + b"".join(b"u%d,%s-%d\n" % (i, pub, i % 9) for i in range(9_000))
    return {"advertiser.csv": advertiser, "publisher.csv": publisher}


@pytest.fixture
def tree() -> ProcessTree:
    return ProcessTree()


@pytest.fixture
def session(
    tmp_path: Path, parties: dict[str, Party], plaintexts: dict[str, bytes], tree: ProcessTree
) -> Iterator[Session]:
    with running_session(
        tmp_path,
        inputs={
            "advertiser.csv": (plaintexts["advertiser.csv"], parties["advertiser"]),
            "publisher.csv": (plaintexts["publisher.csv"], parties["publisher"]),
        },
        recipients=[parties["advertiser"], parties["publisher"]],
        allowed_peer=tree,
        config=DataPlaneConfig(chunk_size=64 << 10),
    ) as s:
        yield s


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tempdir("dp-cwd-") as d:
        yield d


def _files_holding(markers: tuple[bytes, ...], roots: list[Path], since: float) -> list[str]:
    """Regular files under ``roots`` changed since ``since`` that contain any marker."""
    hits = []
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime < since:
                        continue
                    if st.st_size > 256 << 20:
                        continue
                    with open(path, "rb") as f:
                        content = f.read()
                except OSError:
                    continue
                if any(m in content for m in markers):
                    hits.append(path)
    return hits


def test_workload_reads_two_inputs_and_writes_two_outputs(
    session: Session,
    spawn: Callable[[str], Workload],
    parties: dict[str, Party],
    plaintexts: dict[str, bytes],
    markers: tuple[bytes, bytes],
    workdir: Path,
) -> None:
    since = time.time() - 1
    roots = [
        session.output_dir,
        session.socket_dir,
        Path.cwd(),
        workdir,
        Path(tempfile.gettempdir()),
    ]
    # The socket: mode 0600 in a 0700 directory.
    assert stat.S_IMODE(os.stat(session.socket_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(session.socket).st_mode) == 0o600

    w = spawn(WORKLOAD)
    w.expect("READ")
    assert _files_holding(markers, roots, since) == [], "plaintext on disk while reading"
    w.go()
    w.expect("WRITING")
    assert _files_holding(markers, roots, since) == [], "plaintext on disk while writing"
    # Half an output exists only as a temporary file that does not open as complete.
    assert not (session.output_dir / "summary" / "counts.txt.sealed").exists()
    w.go()
    assert w.expect("DONE") == "DONE advertiser.csv,publisher.csv"
    code, _, err = w.finish()
    assert code == 0, err

    joined = plaintexts["advertiser.csv"] + plaintexts["publisher.csv"]
    counts = b"advertiser rows: 20000\nbytes: %d\n" % len(joined)
    for party in ("advertiser", "publisher"):
        key = parties[party].recipient
        assert open_sealed(session.output_dir / "joined.csv.sealed", key) == joined
        assert open_sealed(session.output_dir / "summary" / "counts.txt.sealed", key) == counts
    for name in ("joined.csv.sealed", "summary/counts.txt.sealed"):
        with pytest.raises(NoMatchingRecipientError):
            open_sealed(session.output_dir / name, parties["carol"].recipient)
    outputs = sorted(str(p.relative_to(session.output_dir)) for p in session.output_dir.rglob("*"))
    assert outputs == ["joined.csv.sealed", "summary", "summary/counts.txt.sealed"]
    assert _files_holding(markers, roots, since) == [], "plaintext on disk after the run"


def test_the_disk_scan_finds_leaked_plaintext(markers: tuple[bytes, bytes], workdir: Path) -> None:
    # The control for the scans above: a marker written to disk is found.
    since = time.time() - 1
    (workdir / "leak.txt").write_bytes(b"prefix " + markers[1] + b" suffix")
    assert _files_holding(markers, [workdir], since) == [str(workdir / "leak.txt")]


SIBLING = textwrap.dedent(
    """
    import workload
    try:
        workload.list_inputs()
    except workload.AccessDeniedError as e:
        print("DENIED", e)
    else:
        print("ALLOWED")
    """
)

# The workload starts a helper process of its own, which is inside the tree.
PARENT = textwrap.dedent(
    f"""
    import os, subprocess, sys
    code = {SIBLING!r}
    print("CHILD", subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True).stdout.strip(), flush=True)
    print("READY", flush=True)
    sys.stdin.readline()
    """
)


def test_processes_outside_the_workload_tree_are_refused(
    session: Session, spawn: Callable[[str], Workload]
) -> None:
    w = spawn(PARENT)
    assert w.expect("CHILD") == "CHILD ALLOWED", "a process the workload started may connect"
    w.expect("READY")
    # The test process (the workload's parent, like the sidecar itself) is refused...
    with Client(session.socket) as client, pytest.raises(AccessDeniedError, match="process tree"):
        client.list_inputs()
    # ...and so is another process that is not a descendant of the workload.
    sibling = subprocess.run(
        [sys.executable, "-c", SIBLING],
        env={**session.env, "PYTHONPATH": str(_REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sibling.stdout.startswith("DENIED"), sibling.stderr
    w.go()
    assert w.finish()[0] == 0


READ_ONE = textwrap.dedent(
    """
    import sys, workload
    got = 0
    try:
        with workload.open_input(sys.argv[1]) as f:
            for chunk in f.chunks():
                got += len(chunk)
    except workload.InputIntegrityError as e:
        print("INTEGRITY", got, e)
        sys.exit(3)
    print("COMPLETE", got)
    """
)


def _run_reader(session: Session, tree: ProcessTree, name: str, cwd: Path) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", READ_ONE, name],
        env={**session.env, "PYTHONPATH": str(_REPO)},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tree.set_root(proc.pid)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, out


def test_tampered_input_fails_the_workloads_read(
    session: Session, tree: ProcessTree, plaintexts: dict[str, bytes], workdir: Path
) -> None:
    path = session.input_dir / "input0.sealed"
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x04
    path.write_bytes(bytes(data))
    code, out = _run_reader(session, tree, "advertiser.csv", workdir)
    assert code == 3 and out.startswith("INTEGRITY"), out
    assert "failed authentication" in out
    # Authenticated segments before the damage were delivered, the rest was not.
    assert 0 < int(out.split()[1]) < len(plaintexts["advertiser.csv"])


def test_truncated_input_fails_the_workloads_read(
    session: Session, tree: ProcessTree, workdir: Path
) -> None:
    path = session.input_dir / "input1.sealed"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5_000])
    code, out = _run_reader(session, tree, "publisher.csv", workdir)
    assert code == 3 and out.startswith("INTEGRITY"), out
    assert "truncated" in out


def test_untampered_input_reads_completely(
    session: Session, tree: ProcessTree, plaintexts: dict[str, bytes], workdir: Path
) -> None:
    # The control for the two tests above.
    code, out = _run_reader(session, tree, "publisher.csv", workdir)
    assert (code, out.split()) == (0, ["COMPLETE", str(len(plaintexts["publisher.csv"]))])


ABORTING = textwrap.dedent(
    """
    import sys, workload
    try:
        with workload.create_output("aborted/model.bin") as out:
            out.write(b"weights " * 200_000)
            raise RuntimeError("training diverged")
    except RuntimeError:
        pass
    with workload.create_output("killed/killed.bin") as out:
        out.write(b"partial " * 200_000)
        print("HALFWAY", flush=True)
        sys.stdin.readline()
    """
)


def test_aborted_outputs_leave_nothing_that_looks_complete(
    session: Session, spawn: Callable[[str], Workload], parties: dict[str, Party]
) -> None:
    w = spawn(ABORTING)
    w.expect("HALFWAY")

    # Killed in the middle of an output: the connection drops without the closing message.
    # The aborted model.bin is gone (once the sidecar has seen the cancellation); killed.bin
    # exists only as a temporary file (once the sidecar has received its start) that fails to
    # open as complete.
    def files(sub: str) -> list[Path]:
        return [p for p in (session.output_dir / sub).rglob("*") if p.is_file()]

    for _ in range(400):
        if not files("aborted") and files("killed"):
            break
        time.sleep(0.025)
    assert files("aborted") == []
    [partial] = files("killed")
    assert partial.name.startswith(".partial-")
    with pytest.raises(SealingError):
        open_sealed(partial, parties["advertiser"].recipient)
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait(timeout=30)
    assert settled_files(session.output_dir) == [], "the sidecar discards the partial output"
