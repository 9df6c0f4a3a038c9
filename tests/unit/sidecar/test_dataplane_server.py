"""The workload service on a real Unix socket, called with the generated protobuf stub (so the
fast codec is checked against protobuf too): authorization, streaming, integrity, outputs."""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from cleanroom.v1 import workload_pb2, workload_pb2_grpc
from sealing.errors import NoMatchingRecipientError
from sidecar.dataplane import (
    DataPlaneConfig,
    InputSpec,
    KeyRing,
    LocalDirectoryOutput,
    SocketSetupError,
    WorkloadServer,
)
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
    short_tempdir,
)
from workload import Client, InputUnavailableError, OutputFailedError

ALICE = Party("alice")
BOB = Party("bob")
DATA = os.urandom(300_000)
OPTIONS = [("grpc.max_receive_message_length", 8 << 20)]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with running_session(
        tmp_path,
        inputs={"a.bin": (DATA, ALICE), "b.bin": (b"bob's rows\n", BOB)},
        recipients=[ALICE, BOB],
        allowed_peer=only_this_process,
        config=DataPlaneConfig(chunk_size=64 << 10),
    ) as s:
        yield s


@pytest.fixture
def stub(session: Session) -> Iterator[workload_pb2_grpc.WorkloadServiceStub]:
    with grpc.insecure_channel(f"unix:{session.socket}", options=OPTIONS) as channel:
        yield workload_pb2_grpc.WorkloadServiceStub(channel)


def _read_all(
    stub: workload_pb2_grpc.WorkloadServiceStub, name: str
) -> list[workload_pb2.ReadInputResponse]:
    return list(stub.ReadInput(workload_pb2.ReadInputRequest(name=name)))


def test_socket_and_directory_are_private(session: Session) -> None:
    assert stat.S_IMODE(os.stat(session.socket_dir).st_mode) == 0o700
    st = os.lstat(session.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert session.server.environment() == {"CLEANROOM_WORKLOAD_SOCKET": session.socket}


def test_stop_removes_socket_and_created_directory(tmp_path: Path) -> None:
    with running_session(
        tmp_path, inputs={}, recipients=[ALICE], allowed_peer=only_this_process
    ) as s:
        sock, sock_dir = s.socket, s.socket_dir
    assert not os.path.exists(sock) and not sock_dir.exists()


def test_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test chowns a directory and needs root (the CI container is root)")
    with short_tempdir() as base:
        foreign = base / "s"
        foreign.mkdir(mode=0o777)
        os.chown(foreign, 4242, 4242)
        server = WorkloadServer(
            socket_dir=foreign,
            inputs=[],
            keyring=KeyRing(valid_until=None),
            outputs=LocalDirectoryOutput(tmp_path / "out"),
            recipients=[("alice", ALICE.recipient.public_key())],
            allowed_peer=only_this_process,
        )
        with pytest.raises(SocketSetupError, match="belongs to uid 4242"):
            server.start()
        assert not (foreign / "workload.sock").exists()


def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    with short_tempdir() as base:
        loose = base / "s"
        loose.mkdir(mode=0o755)
        os.chmod(loose, 0o755)
        with WorkloadServer(
            socket_dir=loose,
            inputs=[],
            keyring=KeyRing(valid_until=None),
            outputs=LocalDirectoryOutput(tmp_path / "out"),
            recipients=[("alice", ALICE.recipient.public_key())],
            allowed_peer=only_this_process,
        ):
            assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
        assert loose.exists(), "a directory the server did not create is left in place"


def test_list_inputs(stub: workload_pb2_grpc.WorkloadServiceStub) -> None:
    inputs = stub.ListInputs(workload_pb2.ListInputsRequest()).inputs
    assert [(i.name, i.owner_party, i.size) for i in inputs] == [
        ("a.bin", "alice", len(DATA)),
        ("b.bin", "bob", 11),
    ]


def test_read_input_streams_chunks_then_end(stub: workload_pb2_grpc.WorkloadServiceStub) -> None:
    messages = _read_all(stub, "a.bin")
    assert b"".join(m.chunk for m in messages) == DATA
    assert [m.end_of_input for m in messages] == [False] * (len(messages) - 1) + [True]
    assert max(len(m.chunk) for m in messages) == 64 << 10
    small = _read_all(stub, "b.bin")
    assert [(m.chunk, m.end_of_input) for m in small] == [(b"bob's rows\n", True)]


def test_unknown_input(stub: workload_pb2_grpc.WorkloadServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _read_all(stub, "nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _corrupt(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _read_until_error(
    stub: workload_pb2_grpc.WorkloadServiceStub, name: str
) -> tuple[list[workload_pb2.ReadInputResponse], grpc.RpcError]:
    got: list[workload_pb2.ReadInputResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stub.ReadInput(workload_pb2.ReadInputRequest(name=name)):
            got.append(m)
    return got, info.value


def test_tampered_input_ends_with_data_loss(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    path = session.input_dir / "input0.sealed"
    _corrupt(path, path.stat().st_size - 100_000)
    got, err = _read_until_error(stub, "a.bin")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "failed authentication" in (err.details() or "")
    assert not any(m.end_of_input for m in got)
    assert 0 < sum(len(m.chunk) for m in got) < len(DATA)


def test_truncated_input_ends_with_data_loss(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    path = session.input_dir / "input0.sealed"
    data = path.read_bytes()
    # Cut exactly at a segment boundary: everything left authenticates, only the end is missing.
    segment = 4 + (1 << 16) + 16
    # DATA is 4 full segments and a short final one.
    header_size = len(data) - (4 * segment + 4 + (len(DATA) - 4 * (1 << 16)) + 16)
    path.write_bytes(data[: header_size + 2 * segment])
    got, err = _read_until_error(stub, "a.bin")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "truncated" in (err.details() or "")
    assert b"".join(m.chunk for m in got) == DATA[: 2 << 16]
    assert not any(m.end_of_input for m in got)


def test_input_under_another_key_id_is_refused(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    # Storage swapped bob's stream in for alice's input.
    a, b = session.input_dir / "input0.sealed", session.input_dir / "input1.sealed"
    a.write_bytes(b.read_bytes())
    _, err = _read_until_error(stub, "a.bin")
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "key id 'bob-key'" in (err.details() or "")


def test_missing_input_file_is_a_failed_precondition(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    (session.input_dir / "input0.sealed").unlink()
    _, err = _read_until_error(stub, "a.bin")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot open" in (err.details() or "")


def test_expired_attestation_with_failed_reattest_stops_reads(tmp_path: Path) -> None:
    reattest = FailingReattest()
    # Readings: one when the stream opens, one when the key is borrowed, then one before each
    # chunk, so three chunks get out.
    clock = LapsingClock(lapse_after=5)
    ring = KeyRing(valid_until=clock.start + timedelta(minutes=1), reattest=reattest, clock=clock)
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE)},
            recipients=[ALICE],
            allowed_peer=only_this_process,
            keyring=ring,
            config=DataPlaneConfig(chunk_size=64 << 10),
        ) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
    ):
        clock.readings = 0
        stub = workload_pb2_grpc.WorkloadServiceStub(channel)
        got, err = _read_until_error(stub, "a.bin")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "re-attestation failed" in (err.details() or "")
        assert b"".join(m.chunk for m in got) == DATA[: 3 * (64 << 10)]
        assert not any(m.end_of_input for m in got)
        assert reattest.attempts == 1
        # New reads are refused from the start, each one trying to re-attest again.
        got, err = _read_until_error(stub, "a.bin")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert got == [] and reattest.attempts == 2


def test_key_not_released_is_a_failed_precondition(tmp_path: Path) -> None:
    ring = KeyRing(valid_until=None)
    with running_session(
        tmp_path,
        inputs={"a.bin": (DATA, ALICE)},
        recipients=[ALICE],
        allowed_peer=only_this_process,
        keyring=ring,
    ) as s:
        s.keyring.clear()
        with grpc.insecure_channel(f"unix:{s.socket}") as channel:
            _, err = _read_until_error(workload_pb2_grpc.WorkloadServiceStub(channel), "a.bin")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "alice-key" in (err.details() or "")


def test_a_key_dropped_by_reattestation_stops_a_stream_already_reading(tmp_path: Path) -> None:
    clock = LapsingClock(lapse_after=5)
    renewals = 0

    def reattest() -> datetime:
        # The broker renews the attestation but no longer releases alice's key (she revoked
        # her approval): the key ring then holds bob's key only, as Attester.attest leaves it.
        nonlocal renewals
        renewals += 1
        ring.clear()
        ring.add(BOB.key_id, BOB.data_key)
        return clock.start + timedelta(minutes=10)

    ring = KeyRing(valid_until=clock.start + timedelta(minutes=1), reattest=reattest, clock=clock)
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE), "b.bin": (b"bob's rows\n", BOB)},
            recipients=[ALICE],
            allowed_peer=only_this_process,
            keyring=ring,
            config=DataPlaneConfig(chunk_size=64 << 10),
        ) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
    ):
        stub = workload_pb2_grpc.WorkloadServiceStub(channel)
        # Readings: one when the stream opens, one when the key is borrowed, then one before
        # each chunk; the sixth lapses, the renewal drops alice's key, and the stream (whose
        # cipher still holds a copy of that key) must stop there.
        clock.readings = 0
        got, err = _read_until_error(stub, "a.bin")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "data key 'alice-key' is no longer in the key ring" in (err.details() or "")
        assert b"".join(m.chunk for m in got) == DATA[: 3 * (64 << 10)]
        assert not any(m.end_of_input for m in got)
        assert renewals == 1
        # Bob's input, whose key the renewal released, still reads.
        assert b"".join(m.chunk for m in _read_all(stub, "b.bin")) == b"bob's rows\n"

        # The same through the workload SDK: the read in progress raises InputUnavailableError.
        ring.add(ALICE.key_id, ALICE.data_key)
        ring.set_valid_until(clock.start + timedelta(minutes=1))
        clock.readings = 0
        with Client(s.socket) as client, client.open_input("a.bin") as f:
            with pytest.raises(InputUnavailableError, match="'alice-key' is no longer"):
                f.read()
            assert f.bytes_read == 3 * (64 << 10)
        assert renewals == 2


class SettableClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _wait_for_partial(directory: Path) -> None:
    """Waits until the sidecar has opened an output (its temporary file exists)."""
    deadline = time.monotonic() + 10
    while not any(p.name.startswith(".partial-") for p in directory.rglob("*")):
        assert time.monotonic() < deadline, "the output was never opened"
        time.sleep(0.01)


def test_outputs_are_refused_and_discarded_once_the_attestation_lapsed(tmp_path: Path) -> None:
    clock = SettableClock()
    start = clock.now
    renew = False
    attempts = 0

    def reattest() -> datetime:
        nonlocal attempts
        attempts += 1
        if not renew:
            raise ConnectionError("broker unreachable")
        return clock.now + timedelta(minutes=1)

    ring = KeyRing(valid_until=start + timedelta(minutes=1), reattest=reattest, clock=clock)
    with (
        running_session(
            tmp_path,
            inputs={},
            recipients=[ALICE],
            allowed_peer=only_this_process,
            keyring=ring,
        ) as s,
        Client(s.socket) as client,
    ):
        # An output being written when the attestation lapses, whose renewal then fails, is
        # discarded at its commit, not sealed and published.
        out = client.create_output("during.csv")
        out.write(b"a,b\n" * 1000)
        out.flush()
        _wait_for_partial(s.output_dir)
        clock.now = start + timedelta(minutes=2)
        with pytest.raises(OutputFailedError) as info:
            out.commit()
        assert "FAILED_PRECONDITION" in str(info.value)
        assert "output 'during.csv' was discarded: the sidecar's attestation is no longer " in str(
            info.value
        )
        assert "re-attestation failed" in str(info.value)
        assert attempts == 1

        # A new output is refused before anything is opened.
        with pytest.raises(OutputFailedError) as info:
            with client.create_output("after.csv") as late:
                late.write(b"late\n")
        assert "output 'after.csv' is not accepted: the sidecar's attestation is no longer" in (
            str(info.value)
        )
        assert attempts == 2
        assert settled_files(s.output_dir) == []

        # Once the broker renews the attestation, outputs are accepted again.
        renew = True
        with client.create_output("renewed.csv") as ok:
            ok.write(b"ok\n")
        assert attempts == 3
        sealed = s.output_dir / "renewed.csv.sealed"
        assert open_sealed(sealed, ALICE.recipient) == b"ok\n"
        assert settled_files(s.output_dir) == [sealed]


def _write(
    stub: workload_pb2_grpc.WorkloadServiceStub, messages: list[workload_pb2.WriteOutputRequest]
) -> workload_pb2.WriteOutputResponse:
    response: workload_pb2.WriteOutputResponse = stub.WriteOutput(iter(messages))
    return response


def test_write_output_with_closing_name_commits(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    req = workload_pb2.WriteOutputRequest
    response = _write(
        stub,
        [req(name="r/out.csv"), req(chunk=b"a,b\n"), req(chunk=b"1,2\n"), req(name="r/out.csv")],
    )
    assert (response.name, response.plaintext_bytes, list(response.recipients)) == (
        "r/out.csv",
        8,
        ["alice", "bob"],
    )
    sealed = session.output_dir / "r" / "out.csv.sealed"
    assert open_sealed(sealed, ALICE.recipient) == b"a,b\n1,2\n"
    assert open_sealed(sealed, BOB.recipient) == b"a,b\n1,2\n"
    with pytest.raises(NoMatchingRecipientError):
        open_sealed(sealed, Party("carol").recipient)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([("name", "x"), ("chunk", b"data")], "without repeating the name"),
        ([("chunk", b"data"), ("name", "x")], "first WriteOutput message must be the name"),
        ([("name", "x"), ("chunk", b"1"), ("name", "x"), ("chunk", b"2")], "after the closing"),
        ([("name", "x"), ("chunk", b"1"), ("name", "y")], "chunk or the closing name"),
        ([("name", "../x"), ("name", "../x")], r"'\.\.'"),
        ([("name", "/abs"), ("name", "/abs")], "absolute"),
    ],
)
def test_bad_output_streams_are_refused_and_leave_nothing(
    session: Session,
    stub: workload_pb2_grpc.WorkloadServiceStub,
    messages: list[tuple[str, object]],
    match: str,
) -> None:
    reqs = [workload_pb2.WriteOutputRequest(**{k: v}) for k, v in messages]  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        _write(stub, reqs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, info.value.details() or "")
    assert not session.output_dir.exists() or list(session.output_dir.rglob("*")) == []


def test_existing_output_name_is_already_exists(
    session: Session, stub: workload_pb2_grpc.WorkloadServiceStub
) -> None:
    req = workload_pb2.WriteOutputRequest
    _write(stub, [req(name="once"), req(name="once")])
    with pytest.raises(grpc.RpcError) as info:
        _write(stub, [req(name="once"), req(name="once")])
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_message_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    config = DataPlaneConfig(chunk_size=64 << 10, max_message_size=128 << 10)
    with (
        running_session(
            tmp_path, inputs={}, recipients=[ALICE], allowed_peer=only_this_process, config=config
        ) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
    ):
        stub = workload_pb2_grpc.WorkloadServiceStub(channel)
        req = workload_pb2.WriteOutputRequest
        with pytest.raises(grpc.RpcError) as info:
            _write(stub, [req(name="big"), req(chunk=bytes(200 << 10)), req(name="big")])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(s.output_dir.rglob("*")) == []


def test_refused_peer_gets_permission_denied_and_an_audit_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE)},
            recipients=[ALICE],
            allowed_peer=lambda pid, uid: False,
        ) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
        caplog.at_level(logging.WARNING, logger="sidecar.dataplane.audit"),
    ):
        stub = workload_pb2_grpc.WorkloadServiceStub(channel)
        for call in (
            lambda: stub.ListInputs(workload_pb2.ListInputsRequest()),
            lambda: _read_all(stub, "a.bin"),
            lambda: _write(stub, [workload_pb2.WriteOutputRequest(name="x")] * 2),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not part of the workload's process tree" in (info.value.details() or "")
    audit = [r.getMessage() for r in caplog.records if r.name == "sidecar.dataplane.audit"]
    assert len(audit) == 3
    assert all(f"pid={os.getpid()}" in line and "DENIED" in line for line in audit)
    assert list(s.output_dir.rglob("*")) == []


def test_predicate_that_raises_refuses(tmp_path: Path) -> None:
    def broken(pid: int, uid: int) -> bool:
        raise OSError("cannot read /proc")

    with (
        running_session(tmp_path, inputs={}, recipients=[ALICE], allowed_peer=broken) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
    ):
        with pytest.raises(grpc.RpcError) as info:
            workload_pb2_grpc.WorkloadServiceStub(channel).ListInputs(
                workload_pb2.ListInputsRequest()
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bypassing_the_gate_is_refused(session: Session) -> None:
    # Connecting to gRPC's internal socket directly: no credentials were recorded for it.
    internal = session.server._internal_dir
    assert internal is not None
    with grpc.insecure_channel(f"unix:{internal / 'grpc.sock'}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            workload_pb2_grpc.WorkloadServiceStub(channel).ListInputs(
                workload_pb2.ListInputsRequest()
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stat.S_IMODE(os.stat(internal).st_mode) == 0o700


def test_bad_construction(tmp_path: Path) -> None:
    common = {
        "socket_dir": tmp_path / "s",
        "keyring": KeyRing(valid_until=None),
        "outputs": LocalDirectoryOutput(tmp_path / "o"),
        "allowed_peer": only_this_process,
    }
    key = ALICE.recipient.public_key()
    with pytest.raises(ValueError, match="at least one recipient"):
        WorkloadServer(inputs=[], recipients=[], **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RecipientPublicKey"):
        WorkloadServer(inputs=[], recipients=[("alice", b"raw")], **common)  # type: ignore[arg-type, list-item]
    spec = InputSpec("a", "/x", "k")
    with pytest.raises(Exception, match="two inputs"):
        WorkloadServer(inputs=[spec, spec], recipients=[("a", key)], **common)  # type: ignore[arg-type]


def test_a_peer_that_leaves_the_tree_has_its_open_input_stream_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chunk = 64 << 10
    with (
        running_session(
            tmp_path,
            inputs={"a.bin": (DATA, ALICE)},
            recipients=[ALICE],
            # The call's own check, then two chunks' checks; the third chunk's check says no.
            allowed_peer=LeavesAfter(3),
            config=DataPlaneConfig(chunk_size=chunk),
        ) as s,
        grpc.insecure_channel(f"unix:{s.socket}") as channel,
        caplog.at_level(logging.WARNING, logger="sidecar.dataplane.audit"),
    ):
        got, err = _read_until_error(workload_pb2_grpc.WorkloadServiceStub(channel), "a.bin")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not part of the workload's process tree" in (err.details() or "")
    assert b"".join(m.chunk for m in got) == DATA[: 2 * chunk]
    audit = [r.getMessage() for r in caplog.records if r.name == "sidecar.dataplane.audit"]
    assert len(audit) == 1
    assert f"CUT ReadInput of 'a.bin' of pid={os.getpid()}" in audit[0]
    assert f"after {2 * chunk} bytes" in audit[0]
