"""Local paths through blobstore: files appear whole on close, never after an abort."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import pytest

from blobstore import (
    BlobExistsError,
    BlobNotFoundError,
    BlobStore,
    open_reader,
    open_writer,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_a_written_file_appears_only_on_close(tmp_path: Path) -> None:
    target = tmp_path / "out.sealed"
    with open_writer(target) as w:
        w.write(b"a" * 1000)
        w.write(memoryview(b"b" * 10))
        assert not target.exists()
    assert target.read_bytes() == b"a" * 1000 + b"b" * 10
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []
    with open_reader(str(target)) as r:
        assert r.read() == b"a" * 1000 + b"b" * 10


def test_an_exception_in_the_block_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.sealed"
    with pytest.raises(RuntimeError), open_writer(target) as w:
        w.write(b"partial")
        raise RuntimeError("the producer failed")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_an_aborted_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.sealed"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), open_writer(target, overwrite=True) as w:
        w.write(b"new")
        raise RuntimeError("stop")
    assert target.read_bytes() == b"old"
    with open_writer(target, overwrite=True) as w:
        w.write(b"new")
    assert target.read_bytes() == b"new"


def test_a_dropped_writer_does_not_commit(tmp_path: Path) -> None:
    target = tmp_path / "out.sealed"
    w = open_writer(target)
    w.write(b"half")
    del w
    gc.collect()
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_no_overwrite_by_default_even_when_the_file_appears_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "out.sealed"
    target.write_bytes(b"first")
    with pytest.raises(BlobExistsError):
        open_writer(target)
    other = tmp_path / "race.sealed"
    w = open_writer(other)
    w.write(b"second")
    other.write_bytes(b"someone else")
    with pytest.raises(BlobExistsError, match="appeared meanwhile"):
        w.close()
    assert other.read_bytes() == b"someone else"
    assert _leftovers(tmp_path) == []


def test_missing_files_and_directories(tmp_path: Path) -> None:
    with pytest.raises(BlobNotFoundError):
        open_reader(tmp_path / "nope")
    with pytest.raises(BlobNotFoundError, match="directory"):
        open_writer(tmp_path / "no" / "such" / "dir.sealed")
    with BlobStore() as store:
        assert not store.exists(tmp_path / "nope")
        with pytest.raises(BlobNotFoundError):
            store.delete(tmp_path / "nope")
        (tmp_path / "f").write_bytes(b"12345")
        assert store.size(f"file://{tmp_path / 'f'}") == 5
        store.delete(str(tmp_path / "f"))
        assert not os.path.exists(tmp_path / "f")
