"""The launch event's canonical encoding, its digests, replay binding and the command parsing."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import pytest

from cleanroom.v1 import common_pb2
from evidence.errors import EventLogError, LaunchError, MeasurementError
from evidence.launch import (
    Launch,
    digest_executable,
    encode_launch,
    launch_difference,
    launch_digests,
    launch_from_json,
    launch_to_json,
    parse_command,
    parse_env_assignments,
)
from evidence.pcr import (
    MeasurementEvent,
    check_event_size,
    launch_event,
    measure_files,
    replay,
)
from evidence.proto import event_log_from_pb, event_log_to_pb

DIGEST = hashlib.sha256(b"python").digest()
LAUNCH = Launch.create(
    argv=("/usr/bin/python3", "run.py", "--name", "é ü"),
    executable_sha256=DIGEST,
    env={"PYTHONHASHSEED": "0", "LANG": "C.UTF-8"},
    cwd="/srv/workload",
)


def _independent_encoding() -> bytes:
    """docs/measurement.md's layout, written out by hand for LAUNCH."""

    def s(text: str) -> bytes:
        data = text.encode()
        return struct.pack(">I", len(data)) + data

    return (
        b"cleanroom launch v1\x00"
        + struct.pack(">I", 4)
        + s("/usr/bin/python3")
        + s("run.py")
        + s("--name")
        + s("é ü")
        + s("/usr/bin/python3")
        + DIGEST
        + struct.pack(">I", 2)
        + s("LANG")
        + s("C.UTF-8")
        + s("PYTHONHASHSEED")
        + s("0")
        + s("/srv/workload")
    )


def test_the_encoding_is_the_documented_layout() -> None:
    assert encode_launch(LAUNCH) == _independent_encoding()
    assert launch_digests(LAUNCH, ["sha1", "sha256"]) == {
        "sha1": hashlib.new("sha1", _independent_encoding()).digest(),  # noqa: S324 (the TPM bank)
        "sha256": hashlib.sha256(_independent_encoding()).digest(),
    }


def test_the_environment_is_sorted_by_name_whatever_the_order_given() -> None:
    assert LAUNCH.env == (("LANG", "C.UTF-8"), ("PYTHONHASHSEED", "0"))
    with pytest.raises(LaunchError, match="sorted by name"):
        replace(LAUNCH, env=(("PYTHONHASHSEED", "0"), ("LANG", "C.UTF-8")))


def test_an_argument_boundary_is_part_of_the_encoding() -> None:
    # "a b" as one argument and "a", "b" as two must not measure the same.
    one = replace(LAUNCH, argv=("/usr/bin/python3", "a b"))
    two = replace(LAUNCH, argv=("/usr/bin/python3", "a", "b"))
    assert encode_launch(one) != encode_launch(two)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"argv": ()}, "needs a command"),
        ({"executable": "python3"}, "must be an absolute path"),
        ({"executable": "/usr/bin/python3.12"}, "argv\\[0\\] '/usr/bin/python3' must be the"),
        ({"executable_sha256": b"short"}, "must be 32 bytes"),
        ({"cwd": "srv"}, "working directory 'srv' must be an absolute path"),
        ({"argv": ("/usr/bin/python3", "a\x00b")}, "NUL"),
        ({"env": (("A", "1"), ("A", "2"))}, "twice"),
        ({"env": (("A=B", "1"),)}, "not a valid environment variable name"),
        ({"env": (("CLEANROOM_WORKLOAD_SOCKET", "/x"),)}, "set by the sidecar itself"),
        ({"argv": ("/usr/bin/python3", "x" * 300_000)}, "more than"),
    ],
)
def test_a_malformed_launch_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        replace(LAUNCH, **changes)  # type: ignore[arg-type]


def test_replay_binds_every_field_of_the_launch() -> None:
    event = launch_event(LAUNCH, ["sha256"])
    assert replay([event], ["sha256"]) == {
        "sha256": hashlib.sha256(
            bytes(32) + hashlib.sha256(_independent_encoding()).digest()
        ).digest()
    }
    # The digests of the approved launch reported with another launch: refused.
    forged = MeasurementEvent(
        path=event.path,
        size=0,
        digests=event.digests,
        launch=replace(LAUNCH, argv=("/usr/bin/python3", "-c", "steal()")),
    )
    with pytest.raises(EventLogError, match="not its launch's"):
        replay([forged], ["sha256"])


def test_measure_files_ends_with_the_launch_and_the_protobuf_round_trip_keeps_it(
    tmp_path: pytest.TempPathFactory,
) -> None:
    path = tmp_path / "run.py"  # type: ignore[operator]
    path.write_bytes(b"print(1)")
    measured = measure_files([path], ["sha1", "sha256"], names=["run.py"], launch=LAUNCH)
    assert [e.launch for e in measured.events] == [None, LAUNCH]
    log = event_log_to_pb(measured.events)
    assert event_log_from_pb(log) == measured.events
    bad = common_pb2.EventLog()
    bad.CopyFrom(log)
    bad.events[1].launch.argv[0] = "python3"
    bad.events[1].launch.executable = "python3"
    with pytest.raises(EventLogError, match="event 1: malformed launch"):
        event_log_from_pb(bad)


def test_the_executable_digest_is_the_files_sha256(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "prog"  # type: ignore[operator]
    path.write_bytes(b"#!/bin/sh\n")
    assert digest_executable(path) == hashlib.sha256(b"#!/bin/sh\n").digest()
    with pytest.raises(MeasurementError, match="cannot measure the executable"):
        digest_executable(tmp_path / "missing")  # type: ignore[operator]
    with pytest.raises(MeasurementError, match="not a regular file"):
        digest_executable(tmp_path)  # type: ignore[arg-type]


def test_commands_are_split_like_a_shell_and_must_start_with_an_absolute_path() -> None:
    assert parse_command("/usr/bin/python3 run.py --x 'a b'") == (
        "/usr/bin/python3",
        "run.py",
        "--x",
        "a b",
    )
    with pytest.raises(LaunchError, match="'python' must be an absolute path"):
        parse_command("python run.py")
    with pytest.raises(LaunchError, match="cannot split"):
        parse_command("/bin/sh -c 'unclosed")
    with pytest.raises(LaunchError, match="empty"):
        parse_command("   ")
    assert parse_env_assignments(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


def test_the_difference_names_each_field_that_differs() -> None:
    assert launch_difference(LAUNCH, LAUNCH) is None
    other = replace(
        LAUNCH,
        env=(("LANG", "C.UTF-8"), ("PYTHONPATH", "/tmp/x")),
        cwd="/tmp",
    )
    assert launch_difference(LAUNCH, other) == (
        "environment: not approved PYTHONPATH, missing PYTHONHASHSEED; working directory: "
        "approved '/srv/workload', measured '/tmp'"
    )


def test_the_json_form_round_trips_through_the_brokers_event_log_reader(
    tmp_path: pytest.TempPathFactory,
) -> None:
    from broker.errors import EventLogReplayError
    from broker.quote import event_log_from_json, event_log_to_json

    assert launch_from_json(launch_to_json(LAUNCH)) == LAUNCH
    path = tmp_path / "run.py"  # type: ignore[operator]
    path.write_bytes(b"print(1)")
    events = measure_files([path], ["sha256"], names=["run.py"], launch=LAUNCH).events
    assert event_log_from_json(event_log_to_json(events)) == events
    doc = launch_to_json(LAUNCH)
    doc["executable"] = "/bin/sh"
    with pytest.raises(LaunchError, match="must be its argv"):
        launch_from_json(doc)
    broken = event_log_to_json(events).replace(b'"/srv/workload"', b'"srv"')
    with pytest.raises(EventLogReplayError, match="event 1: the working directory 'srv'"):
        event_log_from_json(broken)


def test_a_launch_events_size_is_zero_and_not_checked_against_its_digests() -> None:
    # A launch measures no file: its digests are never those of empty data, and the size
    # check that holds file events to their digests must neither refuse it nor accept a size.
    event = launch_event(LAUNCH, ["sha1", "sha256"])
    check_event_size(2, event)
    with pytest.raises(EventLogError, match=r"event 2 \(the launch\) has size 5"):
        check_event_size(2, replace(event, size=5))
