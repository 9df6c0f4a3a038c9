"""The data connection (framed inputs and outputs on the workload socket), spoken byte by byte
as docs/workload-sdk.md describes it, by a client that does not use the SDK: each promise of
the gRPC calls holds on it too (authenticated bytes only, the peer check at the call and per
chunk, the re-attestation cut-off, explicit commits, bounded memory)."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.dataplane import DataPlaneConfig, KeyRing
from tests.support.dataplane import (
    FailingReattest,
    LapsingClock,
    LeavesAfter,
    Party,
    Session,
    only_this_process,
    open_sealed,
    running_session,
    settled_files,
)
from tests.support.memory import reset_peak_rss, rss
from workload import Client, OutputFailedError
from workload.wire import FRAME_HEADER, FRAMED_PREFACE, FrameType, frame_header

ALICE = Party("alice")
CHUNK = 64 << 10
# Four whole segments and a short final one.
DATA = os.urandom(4 * CHUNK + 37_856)
DATA_LOSS, PERMISSION_DENIED, FAILED_PRECONDITION, INVALID_ARGUMENT = 15, 7, 9, 3


class Frames:
    """A raw data connection: sends frames, collects what the sidecar answers."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(FRAMED_PREFACE)

    def send(self, kind: FrameType, payload: bytes = b"") -> None:
        self.sock.sendall(frame_header(kind, len(payload)) + payload)

    def next(self) -> tuple[int, bytes] | None:
        head = self.sock.recv(FRAME_HEADER.size, socket.MSG_WAITALL)
        if not head:
            return None
        kind, length = FRAME_HEADER.unpack(head)
        return kind, self.sock.recv(length, socket.MSG_WAITALL) if length else b""

    def read_input(self, name: str) -> tuple[bytes, bool, tuple[int, str] | None]:
        """(DATA bytes received, END seen, (code, details) of an ERROR frame)."""
        self.send(FrameType.OPEN_INPUT, name.encode())
        got, end, error = bytearray(), False, None
        while (frame := self.next()) is not None:
            kind, payload = frame
            if kind == FrameType.DATA:
                assert not end, "DATA after END"
                got += payload
            elif kind == FrameType.END:
                end = True
            elif kind == FrameType.ERROR:
                error = (payload[0], payload[1:].decode())
        return bytes(got), end, error

    def close(self) -> None:
        self.sock.close()


def read_input(path: str, name: str) -> tuple[bytes, bool, tuple[int, str] | None]:
    """:meth:`Frames.read_input` on a connection of its own."""
    conn = Frames(path)
    try:
        return conn.read_input(name)
    finally:
        conn.close()


def exchange(path: str, *frames: tuple[FrameType, bytes]) -> tuple[int, bytes] | None:
    """Sends ``frames`` on a connection of its own; returns the sidecar's first answer."""
    conn = Frames(path)
    try:
        for kind, payload in frames:
            conn.send(kind, payload)
        return conn.next()
    finally:
        conn.close()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with running_session(
        tmp_path,
        inputs={"a.bin": (DATA, ALICE)},
        recipients=[ALICE],
        allowed_peer=only_this_process,
        config=DataPlaneConfig(chunk_size=CHUNK),
        chunk_size=CHUNK,
    ) as s:
        yield s


def _corrupt_segment(path: Path, index: int) -> None:
    """Flips one ciphertext bit in the middle of segment ``index``."""
    data = bytearray(path.read_bytes())
    segment = 4 + CHUNK + 16
    header = len(data) - (4 * segment + 4 + (len(DATA) - 4 * CHUNK) + 16)
    data[header + index * segment + 4 + CHUNK // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_input_arrives_whole_then_end(session: Session) -> None:
    got, end, error = read_input(session.socket, "a.bin")
    assert (got, end, error) == (DATA, True, None)


def test_a_tampered_segment_delivers_none_of_its_bytes_nor_any_after_it(session: Session) -> None:
    # The decryption thread works ahead of the socket; only what authenticated may leave.
    _corrupt_segment(session.input_dir / "input0.sealed", 2)
    got, end, error = read_input(session.socket, "a.bin")
    assert got == DATA[: 2 * CHUNK]
    assert not end
    assert error is not None and error[0] == DATA_LOSS
    assert "segment 2 failed authentication" in error[1]


def test_a_process_outside_the_tree_gets_no_byte_and_an_audit_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE)},
            recipients=[ALICE],
            allowed_peer=lambda pid, uid: False,
        ) as s,
        caplog.at_level(logging.WARNING, logger="sidecar.dataplane.audit"),
    ):
        got, end, error = read_input(s.socket, "a.bin")
        answer = exchange(s.socket, (FrameType.OPEN_OUTPUT, b"stolen.bin"))
        assert settled_files(s.output_dir) == []
    assert (got, end) == (b"", False)
    assert error is not None and error[0] == PERMISSION_DENIED
    assert answer is not None and answer[0] == FrameType.ERROR
    assert answer[1][0] == PERMISSION_DENIED
    audit = [r.getMessage() for r in caplog.records if r.name == "sidecar.dataplane.audit"]
    assert any(
        re.search(rf"DENIED ReadInput \(data connection\) from pid={os.getpid()} ", m)
        for m in audit
    ), audit
    assert any("DENIED WriteOutput (data connection)" in m for m in audit), audit


def test_a_reader_that_leaves_the_tree_is_cut_before_the_next_chunk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE)},
            recipients=[ALICE],
            # The call's own check, then two chunks' checks; the third chunk's check says no.
            allowed_peer=LeavesAfter(3),
            config=DataPlaneConfig(chunk_size=CHUNK),
            chunk_size=CHUNK,
        ) as s,
        caplog.at_level(logging.WARNING, logger="sidecar.dataplane.audit"),
    ):
        got, end, error = read_input(s.socket, "a.bin")
    assert got == DATA[: 2 * CHUNK] and not end
    assert error is not None and error[0] == PERMISSION_DENIED
    assert "not part of the workload's process tree" in error[1]
    audit = [r.getMessage() for r in caplog.records if r.name == "sidecar.dataplane.audit"]
    assert len(audit) == 1
    assert f"CUT ReadInput of 'a.bin' of pid={os.getpid()}" in audit[0]
    assert f"after {2 * CHUNK} bytes" in audit[0]


def test_a_failed_reattestation_stops_the_stream_at_the_next_chunk(tmp_path: Path) -> None:
    reattest = FailingReattest()
    # Readings: one when the stream opens, one when the key is borrowed, then one before each
    # chunk leaves, so three chunks get out, whatever the decryption thread did ahead.
    clock = LapsingClock(lapse_after=5)
    ring = KeyRing(valid_until=clock.start + timedelta(minutes=1), reattest=reattest, clock=clock)
    with running_session(
        tmp_path,
        inputs={"a.bin": (DATA, ALICE)},
        recipients=[ALICE],
        allowed_peer=only_this_process,
        keyring=ring,
        config=DataPlaneConfig(chunk_size=CHUNK),
        chunk_size=CHUNK,
    ) as s:
        clock.readings = 0
        got, end, error = read_input(s.socket, "a.bin")
        assert got == DATA[: 3 * CHUNK] and not end
        assert error is not None and error[0] == FAILED_PRECONDITION
        assert "re-attestation failed" in error[1]
        assert reattest.attempts == 1
        # A new output is refused before anything is opened.
        answer = exchange(s.socket, (FrameType.OPEN_OUTPUT, b"late.bin"))
        assert answer is not None and answer[0] == FrameType.ERROR
        assert answer[1][0] == FAILED_PRECONDITION
        assert settled_files(s.output_dir) == []


def test_an_output_commits_only_on_commit_repeating_its_name(session: Session) -> None:
    # Connection closed without COMMIT: discarded.
    conn = Frames(session.socket)
    conn.send(FrameType.OPEN_OUTPUT, b"cut.bin")
    conn.send(FrameType.DATA, b"half of it")
    conn.close()
    # COMMIT naming another output: refused and discarded.
    answer = exchange(
        session.socket,
        (FrameType.OPEN_OUTPUT, b"wrong.bin"),
        (FrameType.DATA, b"data"),
        (FrameType.COMMIT, b"other.bin"),
    )
    assert answer is not None and answer[0] == FrameType.ERROR
    assert answer[1][0] == INVALID_ARGUMENT
    assert settled_files(session.output_dir) == []
    # The whole exchange: DATA frames, COMMIT with the name, a RECEIPT.
    answer = exchange(
        session.socket,
        (FrameType.OPEN_OUTPUT, b"ok.bin"),
        (FrameType.DATA, b"first "),
        (FrameType.DATA, b"second"),
        (FrameType.COMMIT, b"ok.bin"),
    )
    assert answer is not None and answer[0] == FrameType.RECEIPT
    sealed = session.output_dir / "ok.bin.sealed"
    assert open_sealed(sealed, ALICE.recipient) == b"first second"
    assert settled_files(session.output_dir) == [sealed]


def test_grpc_clients_still_share_the_socket(session: Session) -> None:
    # ListInputs stays on gRPC: both protocols are served on the one socket.
    with Client(session.socket) as client:
        assert [i.name for i in client.list_inputs()] == ["a.bin"]
        with client.open_input("a.bin") as f:
            assert f.read() == DATA


def test_memory_stays_bounded_whatever_the_size(tmp_path: Path) -> None:
    # Sidecar and workload in this one process, 1 MiB chunks: 256 MiB each way may grow the
    # peak by a few buffers and socket queues, not by the size.
    mib = 1 << 20
    size = 256 * mib
    block = os.urandom(mib)
    with running_session(
        tmp_path,
        inputs={"small": (block, ALICE)},
        recipients=[ALICE],
        allowed_peer=only_this_process,
        chunk_size=mib,
    ) as s:
        from sealing.envelope import SealWriter

        with (
            open(s.input_dir / "input0.sealed", "wb") as f,
            SealWriter(f, data_key=ALICE.data_key, key_id=ALICE.key_id) as w,
        ):
            for _ in range(size // mib):
                w.write(block)
        with Client(s.socket) as client:
            with client.open_input("small") as warm:
                warm.read(1)
            before = reset_peak_rss()
            total = 0
            with client.open_input("small") as stream:
                for chunk in stream.chunks():
                    total += len(chunk)
            read_growth = rss()[0] - before
            before = reset_peak_rss()
            with client.create_output("big.bin") as out:
                for _ in range(size // mib):
                    out.write(block)
            write_growth = rss()[0] - before
    assert total == size
    assert out.receipt is not None and out.receipt.plaintext_bytes == size
    assert read_growth < 48 * mib, read_growth
    assert write_growth < 48 * mib, write_growth


def test_stopping_gives_an_output_being_written_the_grace_period(tmp_path: Path) -> None:
    with running_session(
        tmp_path, inputs={}, recipients=[ALICE], allowed_peer=only_this_process
    ) as s:
        with Client(s.socket) as client:
            late = client.create_output("late.bin")
            late.write(b"written before the stop")
            cut = client.create_output("cut.bin")
            cut.write(b"never committed")
            stopper = threading.Thread(target=s.server.stop, kwargs={"grace": 2.0})
            stopper.start()
            time.sleep(0.3)
            # The workload exited; the sidecar stops, and this output still commits in time.
            late.write(b", and after it")
            receipt = late.commit()
            stopper.join()
            # The other was still open when the grace period ended: cut and discarded.
            with pytest.raises(OutputFailedError):
                cut.commit()
        sealed = s.output_dir / "late.bin.sealed"
        assert receipt.plaintext_bytes == len(b"written before the stop, and after it")
        assert open_sealed(sealed, ALICE.recipient) == b"written before the stop, and after it"
        assert settled_files(s.output_dir) == [sealed]
