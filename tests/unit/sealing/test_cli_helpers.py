"""The CLI's progress bar and size parsing."""

from __future__ import annotations

import argparse
import io

import pytest

from cleanroom.progress import Progress
from sealing.cli import _parse_size


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_for_large_input() -> None:
    term = _Terminal()
    p = Progress(label="sealing", total=100 << 20, stream=term, threshold=64 << 20)
    p.update(50 << 20)
    p.finish()
    out = term.getvalue()
    assert out.startswith("\rsealing [")
    assert "50.0%" in out
    assert out.endswith("\n")


def test_progress_is_silent_for_small_input_or_no_terminal() -> None:
    term = _Terminal()
    p = Progress(label="sealing", total=1 << 20, stream=term, threshold=64 << 20)
    p.update(1 << 20)
    p.finish()
    assert term.getvalue() == ""
    pipe = io.StringIO()
    p = Progress(label="sealing", total=100 << 20, stream=pipe, threshold=64 << 20)
    p.update(100 << 20)
    p.finish()
    assert pipe.getvalue() == ""


def test_progress_of_unknown_size_starts_after_the_threshold() -> None:
    term = _Terminal()
    p = Progress(label="opening", total=None, stream=term, threshold=10)
    p.update(5)
    assert term.getvalue() == ""
    p.update(20)
    p.finish()
    assert "opening" in term.getvalue()
    assert "%" not in term.getvalue()


@pytest.mark.parametrize(
    ("text", "value"),
    [("65536", 65536), ("64K", 65536), ("64KiB", 65536), ("4M", 4 << 20), ("1mib", 1 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    assert _parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "4G", "four", "-"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_size(text)
