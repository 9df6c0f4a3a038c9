"""Output names stay inside the output directory; outputs appear only when committed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sealing.envelope import OpenReader
from sealing.errors import NoMatchingRecipientError, TruncatedError
from sealing.keys import RecipientPrivateKey, generate_recipient_key
from sidecar.dataplane import (
    LocalDirectoryOutput,
    OutputExistsError,
    OutputNameError,
    OutputStoreError,
    Recipient,
    check_output_name,
)
from sidecar.dataplane.outputs import OutputSink, OutputWriter


@pytest.fixture(scope="module")
def alice() -> RecipientPrivateKey:
    return generate_recipient_key()


@pytest.fixture(scope="module")
def bob() -> RecipientPrivateKey:
    return generate_recipient_key()


@pytest.fixture
def recipients(alice: RecipientPrivateKey, bob: RecipientPrivateKey) -> list[Recipient]:
    return [Recipient("alice", alice.public_key()), Recipient("bob", bob.public_key())]


def _open(path: Path, key: RecipientPrivateKey) -> bytes:
    with open(path, "rb") as f, OpenReader(f, private_key=key) as r:
        return r.read()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../escape", r"'\.\.'"),
        ("a/../../escape", r"'\.\.'"),
        ("a/./b", r"'\.'"),
        (".", r"'\.'"),
        ("..", r"'\.\.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("nul\x00byte", "NUL"),
        ("line\nbreak", "control"),
        ("x" * 300, "too long"),
        ("/".join(["d"] * 20), "deep"),
        ("a/" * 600 + "b", "longer"),
        (".partial-abc", "reserved"),
    ],
)
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(OutputNameError, match=why):
        check_output_name(name)


@pytest.mark.parametrize("name", ["out.csv", "insights/summary.csv", "a b/ü.txt", "..data", "x.."])
def test_good_names(name: str) -> None:
    assert "/".join(check_output_name(name)) == name


def test_commit_makes_a_sealed_file_each_recipient_opens(
    tmp_path: Path,
    recipients: list[Recipient],
    alice: RecipientPrivateKey,
    bob: RecipientPrivateKey,
) -> None:
    sink = LocalDirectoryOutput(tmp_path / "out")
    assert isinstance(sink, OutputSink)
    writer = sink.open_output("reports/summary.csv", recipients=recipients)
    assert isinstance(writer, OutputWriter)
    writer.write(b"a,b\n")
    writer.write(memoryview(b"1,2\n" * 50_000))
    receipt = writer.commit()
    final = tmp_path / "out" / "reports" / "summary.csv.sealed"
    assert receipt.location == str(final)
    assert receipt.recipients == ("alice", "bob")
    assert receipt.plaintext_bytes == 4 + 200_000
    assert receipt.sealed_bytes == final.stat().st_size
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    expected = b"a,b\n" + b"1,2\n" * 50_000
    assert _open(final, alice) == expected
    assert _open(final, bob) == expected
    with pytest.raises(NoMatchingRecipientError):
        _open(final, generate_recipient_key())
    # Nothing else is left in the directory: no temporary file.
    assert sorted(p.name for p in final.parent.iterdir()) == ["summary.csv.sealed"]


def test_abort_leaves_nothing(tmp_path: Path, recipients: list[Recipient]) -> None:
    sink = LocalDirectoryOutput(tmp_path)
    writer = sink.open_output("partial.bin", recipients=recipients)
    writer.write(b"secret plaintext" * 10_000)
    writer.abort()
    writer.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputStoreError, match="already finished"):
        writer.write(b"more")
    with pytest.raises(OutputStoreError, match="already finished"):
        writer.commit()
    # The name is free again.
    sink.open_output("partial.bin", recipients=recipients).commit()
    assert (tmp_path / "partial.bin.sealed").exists()


def test_unfinished_output_does_not_look_complete(
    tmp_path: Path, recipients: list[Recipient], alice: RecipientPrivateKey
) -> None:
    # As if the sidecar died mid-stream: neither commit nor abort ran.
    sink = LocalDirectoryOutput(tmp_path)
    writer = sink.open_output("crash.bin", recipients=recipients)
    writer.write(os.urandom(300_000))
    files = list(tmp_path.iterdir())
    assert not any(p.name.endswith(".sealed") for p in files)
    [partial] = files
    assert partial.name.startswith(".partial-")
    assert stat.S_IMODE(partial.stat().st_mode) == 0o600
    with pytest.raises(TruncatedError):
        _open(partial, alice)
    writer.abort()


def test_existing_output_is_not_replaced(tmp_path: Path, recipients: list[Recipient]) -> None:
    (tmp_path / "x.sealed").write_bytes(b"earlier output")
    sink = LocalDirectoryOutput(tmp_path)
    with pytest.raises(OutputExistsError, match="existing output"):
        sink.open_output("x", recipients=recipients)
    assert (tmp_path / "x.sealed").read_bytes() == b"earlier output"


def test_an_existing_output_is_replaced_when_told_to(
    tmp_path: Path, recipients: list[Recipient], alice: RecipientPrivateKey
) -> None:
    (tmp_path / "x.sealed").write_bytes(b"earlier output")
    (tmp_path / "y.sealed").symlink_to(tmp_path / "elsewhere")
    sink = LocalDirectoryOutput(tmp_path, replace=True)
    writer = sink.open_output("x", recipients=recipients)
    writer.write(b"this run's output")
    # Until the commit, the earlier output is still there, whole.
    assert (tmp_path / "x.sealed").read_bytes() == b"earlier output"
    writer.commit()
    assert _open(tmp_path / "x.sealed", alice) == b"this run's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sealed", "y.sealed"]
    # A symlink is still not written through, replace or not.
    with pytest.raises(OutputExistsError, match="symlink"):
        sink.open_output("y", recipients=recipients)
    assert not (tmp_path / "elsewhere").exists()


def test_output_appearing_meanwhile_is_not_replaced(
    tmp_path: Path, recipients: list[Recipient]
) -> None:
    sink = LocalDirectoryOutput(tmp_path)
    writer = sink.open_output("race", recipients=recipients)
    writer.write(b"data")
    (tmp_path / "race.sealed").write_bytes(b"someone else")
    with pytest.raises(OutputExistsError, match="appeared"):
        writer.commit()
    assert (tmp_path / "race.sealed").read_bytes() == b"someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.sealed"]


def test_same_name_twice_at_once_is_refused(tmp_path: Path, recipients: list[Recipient]) -> None:
    sink = LocalDirectoryOutput(tmp_path)
    first = sink.open_output("dup", recipients=recipients)
    with pytest.raises(OutputExistsError, match="being written"):
        sink.open_output("dup", recipients=recipients)
    first.commit()
    with pytest.raises(OutputExistsError):
        sink.open_output("dup", recipients=recipients)


def test_symlinked_directory_is_refused(tmp_path: Path, recipients: list[Recipient]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    sink = LocalDirectoryOutput(out)
    with pytest.raises(OutputNameError, match="symlink"):
        sink.open_output("link/escape.csv", recipients=recipients)
    assert list(outside.iterdir()) == []


def test_symlink_as_the_output_itself_is_refused(
    tmp_path: Path, recipients: list[Recipient]
) -> None:
    target = tmp_path / "target"
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.sealed").symlink_to(target)
    sink = LocalDirectoryOutput(out)
    with pytest.raises(OutputExistsError, match="symlink"):
        sink.open_output("result", recipients=recipients)
    assert not target.exists()


def test_file_in_the_way_of_a_directory_is_refused(
    tmp_path: Path, recipients: list[Recipient]
) -> None:
    (tmp_path / "a").write_bytes(b"")
    with pytest.raises(OutputNameError, match="not a directory"):
        LocalDirectoryOutput(tmp_path).open_output("a/b", recipients=recipients)


def test_no_recipients_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputStoreError, match="no recipients"):
        LocalDirectoryOutput(tmp_path).open_output("x", recipients=[])


def test_output_location_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputStoreError):
        LocalDirectoryOutput(tmp_path / "file")
