"""The workload SDK against a real sidecar data path (and a real misbehaving sidecar socket)."""

from __future__ import annotations

import gc
import io
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import workload
import workload.client
from sidecar.dataplane import DataPlaneConfig
from tests.support.dataplane import (
    Party,
    Session,
    only_this_process,
    open_sealed,
    running_session,
    settled_files,
    short_tempdir,
)
from workload import (
    AccessDeniedError,
    Client,
    InputIntegrityError,
    InputNotFoundError,
    InputUnavailableError,
    OutputFailedError,
    OutputRejectedError,
    ProtocolError,
    SidecarConnectionError,
    WorkloadError,
)
from workload.wire import (
    FRAME_HEADER,
    FRAMED_PREFACE,
    FrameType,
    encode_error_frame,
    frame_header,
)

ALICE = Party("alice")
BOB = Party("bob")
LINES = b"".join(b"line %d\n" % i for i in range(20_000)) + b"no newline at the end"
CSV = b"user,segment,spend\n" + b"".join(b"u%d,s%d,%d\n" % (i, i % 7, i) for i in range(5_000))


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with running_session(
        tmp_path,
        inputs={"lines.txt": (LINES, ALICE), "users.csv": (CSV, BOB), "empty": (b"", ALICE)},
        recipients=[ALICE, BOB],
        allowed_peer=only_this_process,
        config=DataPlaneConfig(chunk_size=16 << 10),
        chunk_size=4096,
    ) as s:
        yield s


@pytest.fixture
def client(session: Session) -> Iterator[Client]:
    with Client(session.socket, chunk_size=64 << 10) as c:
        yield c


def test_from_env(monkeypatch: pytest.MonkeyPatch, session: Session) -> None:
    monkeypatch.delenv(workload.SOCKET_ENV, raising=False)
    with pytest.raises(SidecarConnectionError, match="CLEANROOM_WORKLOAD_SOCKET is not set"):
        Client.from_env()
    with Client.from_env({workload.SOCKET_ENV: session.socket}) as c:
        assert c.socket_path == session.socket


def test_module_helpers_use_the_environment(
    monkeypatch: pytest.MonkeyPatch, session: Session
) -> None:
    monkeypatch.setenv(workload.SOCKET_ENV, session.socket)
    monkeypatch.setattr(workload.client, "_default", None)
    assert [i.name for i in workload.list_inputs()] == ["lines.txt", "users.csv", "empty"]
    with workload.open_input("lines.txt") as f:
        assert f.read() == LINES
    assert next(workload.read_csv("users.csv")) == {"user": "u0", "segment": "s0", "spend": "0"}
    with workload.create_output("helper.bin") as out:
        out.write(b"via helper")
    assert open_sealed(session.output_dir / "helper.bin.sealed", ALICE.recipient) == b"via helper"
    with workload.create_text_output("helper.txt") as text:
        text.write("é\n")
    assert open_sealed(session.output_dir / "helper.txt.sealed", BOB.recipient) == "é\n".encode()


def test_list_inputs(client: Client) -> None:
    assert [(i.name, i.owner_party, i.size) for i in client.list_inputs()] == [
        ("lines.txt", "alice", len(LINES)),
        ("users.csv", "bob", len(CSV)),
        ("empty", "alice", None),
    ]


def test_read_sizes_like_a_buffered_file(client: Client) -> None:
    with client.open_input("lines.txt") as f:
        assert f.readable() and not f.writable()
        assert f.read(0) == b""
        assert f.read(5) == LINES[:5]
        # Crosses many 16 KiB chunks: read(n) returns n bytes until the end, like BufferedReader.
        assert f.read(100_000) == LINES[5:100_005]
        buf = bytearray(50_000)
        assert f.readinto(buf) == 50_000 and bytes(buf) == LINES[100_005:150_005]
        one = f.read1(1 << 20)
        assert 0 < len(one) <= 16 << 10 and one == LINES[150_005 : 150_005 + len(one)]
        rest = f.read()
        assert LINES[150_005 + len(one) :] == rest
        assert f.read() == b"" and f.read(10) == b"" and f.readinto(bytearray(3)) == 0
        assert f.bytes_read == len(LINES)
    assert f.closed


def test_lines_and_iteration(client: Client) -> None:
    with client.open_input("lines.txt") as f:
        assert f.readline() == b"line 0\n"
        assert f.readline(3) == b"lin"
        assert f.readline() == b"e 1\n"
        lines = list(f)
    assert b"".join([b"line 0\n", b"line 1\n", *lines]) == LINES
    assert lines[-1] == b"no newline at the end"


def test_chunks_and_text_wrapper(client: Client) -> None:
    with client.open_input("lines.txt") as f:
        chunks = list(f.chunks())
    assert b"".join(chunks) == LINES and all(len(c) <= 16 << 10 for c in chunks)
    with client.open_input("lines.txt") as f, io.TextIOWrapper(f, encoding="ascii") as text:
        assert text.read() == LINES.decode()


def test_pickle_loads_from_a_stream(tmp_path: Path) -> None:
    obj = {"weights": list(range(10_000)), "name": "model"}
    with (
        running_session(
            tmp_path,
            inputs={"model.pkl": (pickle.dumps(obj), ALICE)},
            recipients=[ALICE],
            allowed_peer=only_this_process,
        ) as s,
        Client(s.socket) as c,
        c.open_input("model.pkl") as f,
    ):
        assert pickle.load(f) == obj  # noqa: S301 (our own test data)


def test_empty_input(client: Client) -> None:
    with client.open_input("empty") as f:
        assert f.read() == b"" and f.readline() == b""


def test_read_csv(client: Client) -> None:
    rows = list(client.read_csv("users.csv"))
    assert len(rows) == 5_000
    assert rows[42] == {"user": "u42", "segment": "s0", "spend": "42"}
    semi = list(client.read_csv("users.csv", delimiter=";"))
    assert semi[0] == {"user,segment,spend": "u0,s0,0"}


def test_unknown_input(client: Client) -> None:
    with client.open_input("nope") as f, pytest.raises(InputNotFoundError, match="no input named"):
        f.read()


def test_tampered_input_raises_integrity_error_and_keeps_raising(
    session: Session, client: Client
) -> None:
    path = session.input_dir / "input0.sealed"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with client.open_input("lines.txt") as f:
        with pytest.raises(InputIntegrityError, match="failed authentication") as first:
            f.read()
        with pytest.raises(InputIntegrityError) as again:
            f.read(1)
        assert again.value is first.value
    with pytest.raises(InputIntegrityError):
        list(client.read_csv("lines.txt"))


def test_missing_sealed_file_is_input_unavailable(session: Session, client: Client) -> None:
    (session.input_dir / "input0.sealed").unlink()
    with client.open_input("lines.txt") as f, pytest.raises(InputUnavailableError, match="open"):
        f.read()


def test_closing_early_cancels_the_stream(client: Client) -> None:
    with client.open_input("lines.txt") as f:
        assert f.read(10) == LINES[:10]
    # The connection is still good for more calls.
    assert len(client.list_inputs()) == 3


def test_output_commit(session: Session, client: Client) -> None:
    data = os.urandom(1_000_003)
    with client.create_output("out/data.bin") as out:
        assert out.writable()
        out.write(data[:10])
        out.write(memoryview(data)[10:200_000])
        out.write(bytearray(data[200_000:]))
        assert out.bytes_written == len(data)
    assert out.closed
    assert out.receipt == workload.OutputReceipt("out/data.bin", len(data), ("alice", "bob"))
    sealed = session.output_dir / "out" / "data.bin.sealed"
    assert open_sealed(sealed, ALICE.recipient) == data
    assert open_sealed(sealed, BOB.recipient) == data


def test_close_commits_and_commit_returns_the_receipt(session: Session, client: Client) -> None:
    out = client.create_output("closed.bin")
    out.write(b"x")
    out.close()
    assert out.receipt is not None and out.receipt.plaintext_bytes == 1
    other = client.create_output("committed.bin")
    receipt = other.commit()
    assert receipt.plaintext_bytes == 0 and other.closed
    with pytest.raises(ValueError, match="already committed"):
        other.write(b"late")
    assert open_sealed(session.output_dir / "committed.bin.sealed", ALICE.recipient) == b""


def _settle(session: Session) -> list[Path]:
    """The files in the output directory once it has stayed the same for a while: the sidecar
    discards an aborted output when it sees the cancellation, which can come after the client
    has moved on, and a handler may even start (and then discard) a temporary file late."""
    return settled_files(session.output_dir)


def test_exception_in_with_block_aborts(session: Session, client: Client) -> None:
    with pytest.raises(RuntimeError, match="model diverged"), client.create_output("x.bin") as out:
        out.write(os.urandom(300_000))
        raise RuntimeError("model diverged")
    assert out.closed and out.receipt is None
    assert _settle(session) == []
    # The name was not used up.
    with client.create_output("x.bin") as again:
        again.write(b"ok")
    assert open_sealed(session.output_dir / "x.bin.sealed", ALICE.recipient) == b"ok"


def test_explicit_abort_and_text_abort(session: Session, client: Client) -> None:
    out = client.create_output("aborted.bin")
    out.write(b"partial")
    out.abort()
    out.abort()
    with pytest.raises(ValueError):
        out.write(b"more")
    with pytest.raises(KeyError), client.create_text_output("aborted.csv") as text:
        text.write("a,b\n")
        raise KeyError("column")
    assert _settle(session) == []


def test_dropped_stream_is_not_committed(session: Session, client: Client) -> None:
    out = client.create_output("dropped.bin")
    out.write(b"never finished")
    text = client.create_text_output("dropped.txt")
    text.write("never finished either")
    del out, text
    gc.collect()
    assert _settle(session) == []


def test_refused_output_names(session: Session, client: Client) -> None:
    with pytest.raises(OutputRejectedError, match="absolute"), client.create_output("/etc/x"):
        pass
    with client.create_output("twice") as out:
        out.write(b"1")
    with pytest.raises(OutputRejectedError, match="existing output"), client.create_output("twice"):
        pass
    assert open_sealed(session.output_dir / "twice.sealed", ALICE.recipient) == b"1"


def test_a_refused_output_fails_at_a_write_not_only_at_commit(client: Client) -> None:
    # The sidecar refuses at once; the SDK sees its answer before sending much more, so a
    # workload producing a large output does not compute all of it for nothing.
    out = client.create_output("/absolute/name")
    chunk = bytes(64 << 10)
    with pytest.raises(OutputRejectedError, match="absolute"):
        for _ in range(10_000):
            out.write(chunk)
            time.sleep(0.001)
    assert out.bytes_written < 10_000 * len(chunk)


def test_output_larger_than_the_message_limit_fails_cleanly(tmp_path: Path) -> None:
    config = DataPlaneConfig(chunk_size=16 << 10, max_message_size=32 << 10)
    with (
        running_session(
            tmp_path, inputs={}, recipients=[ALICE], allowed_peer=only_this_process, config=config
        ) as s,
        Client(s.socket, chunk_size=64 << 10) as c,
    ):
        with pytest.raises(OutputFailedError, match="RESOURCE_EXHAUSTED"):
            with c.create_output("big") as out:
                out.write(bytes(64 << 10))
        assert _settle(s) == []


def test_access_denied(tmp_path: Path) -> None:
    with (
        running_session(
            tmp_path,
            inputs={"a": (b"x", ALICE)},
            recipients=[ALICE],
            allowed_peer=lambda p, u: False,
        ) as s,
        Client(s.socket) as c,
    ):
        with pytest.raises(AccessDeniedError, match="process tree"):
            c.list_inputs()
        with c.open_input("a") as f, pytest.raises(AccessDeniedError):
            f.read()
        with pytest.raises(AccessDeniedError), c.create_output("x") as out:
            out.write(b"x")


def test_no_sidecar_listening() -> None:
    with short_tempdir() as d, Client(d / "absent.sock") as c:
        with pytest.raises(SidecarConnectionError, match="unreachable"):
            c.list_inputs()


# --- a sidecar that breaks the protocol: the SDK must not report a clean end -------------------


@pytest.fixture
def rogue() -> Iterator[str]:
    """A real Unix socket whose data connections misbehave according to the input's name."""
    with short_tempdir() as d:
        path = d / "rogue.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    head = conn.recv(len(FRAMED_PREFACE) + FRAME_HEADER.size, socket.MSG_WAITALL)
                    _, length = FRAME_HEADER.unpack(head[len(FRAMED_PREFACE) :])
                    name = conn.recv(length, socket.MSG_WAITALL).decode()
                    part = b"first part "
                    conn.sendall(frame_header(FrameType.DATA, len(part)) + part)
                    if name == "data-loss":
                        conn.sendall(encode_error_frame(15, "segment 3 failed authentication"))
                    elif name == "extra":
                        late = b"after the end"
                        conn.sendall(
                            frame_header(FrameType.END, 0)
                            + frame_header(FrameType.DATA, len(late))
                            + late
                        )
                    elif name == "cut-inside-a-frame":
                        conn.sendall(frame_header(FrameType.DATA, 100) + b"only ten b")
                    elif name == "huge-frame":
                        conn.sendall(frame_header(FrameType.DATA, 1 << 31))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield str(path)
        finally:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            thread.join(timeout=5)


def test_stream_ending_without_end_of_input_is_an_integrity_error(rogue: str) -> None:
    with Client(rogue) as c, c.open_input("no-end") as f:
        assert f.read(11) == b"first part "
        with pytest.raises(InputIntegrityError, match="before the sidecar confirmed its end"):
            f.read()


def test_data_loss_status_is_an_integrity_error(rogue: str) -> None:
    with Client(rogue) as c, c.open_input("data-loss") as f:
        with pytest.raises(InputIntegrityError, match="segment 3 failed authentication"):
            f.read()


def test_data_after_the_end_is_ignored_not_read(rogue: str) -> None:
    with Client(rogue) as c, c.open_input("extra") as f:
        assert f.read() == b"first part "


def test_a_connection_cut_inside_a_frame_is_an_integrity_error(rogue: str) -> None:
    with Client(rogue) as c, c.open_input("cut-inside-a-frame") as f:
        assert f.read(11) == b"first part "
        with pytest.raises(InputIntegrityError, match="before the sidecar confirmed its end"):
            f.read()


def test_a_frame_over_the_message_limit_is_refused_unread(rogue: str) -> None:
    with Client(rogue) as c, c.open_input("huge-frame") as f:
        assert f.read(11) == b"first part "
        with pytest.raises(ProtocolError, match="frame of 2147483648 bytes"):
            f.read()


def test_errors_share_the_root() -> None:
    for err in (
        AccessDeniedError,
        InputIntegrityError,
        InputNotFoundError,
        OutputFailedError,
        OutputRejectedError,
        SidecarConnectionError,
    ):
        assert issubclass(err, WorkloadError)
