"""Input specs, sources by URL scheme, and the advisory plaintext size."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from sealing.envelope import SealWriter, new_data_key, read_header
from sidecar.dataplane import (
    InputSource,
    InputSourceError,
    InputSpec,
    LocalFileInput,
    input_source_for,
    register_input_scheme,
)
from sidecar.dataplane.inputs import plaintext_size


def test_plain_paths_and_file_urls_are_local_files(tmp_path: Path) -> None:
    f = tmp_path / "in put.sealed"
    f.write_bytes(b"ciphertext")
    for url in (str(f), f"file://{f}".replace(" ", "%20"), f"file://localhost{f}"):
        source = input_source_for(InputSpec("x", url, "k"))
        assert isinstance(source, LocalFileInput) and isinstance(source, InputSource)
        assert source.size == 10
        with source.open() as stream:
            assert stream.read() == b"ciphertext"


def test_relative_paths_with_colons_are_paths() -> None:
    source = input_source_for(InputSpec("x", "data:v1/x.sealed", "k"))
    assert isinstance(source, LocalFileInput)
    assert source.path == Path("data:v1/x.sealed")


def test_remote_file_url_is_refused() -> None:
    with pytest.raises(InputSourceError, match="only local files"):
        input_source_for(InputSpec("x", "file://fileserver/share/x.sealed", "k"))


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(InputSourceError, match="no input source for URL scheme 'gopher'"):
        input_source_for(InputSpec("x", "gopher://host/x", "k"))


class MemorySource:
    """Another real source, as a registered scheme would provide."""

    def __init__(self, spec: InputSpec) -> None:
        self.name = spec.name
        self.size: int | None = 3
        self.url = spec.url

    def open(self) -> io.BytesIO:
        return io.BytesIO(b"abc")


def test_registered_schemes_are_used() -> None:
    register_input_scheme("memtest", MemorySource)
    source = input_source_for(InputSpec("x", "memtest://bucket/x", "k"))
    assert isinstance(source, MemorySource) and source.url == "memtest://bucket/x"
    with pytest.raises(ValueError, match="already registered"):
        register_input_scheme("MEMTEST", MemorySource)


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    source = LocalFileInput(name="x", path=tmp_path / "absent")
    assert source.size is None
    with pytest.raises(InputSourceError, match="cannot open"):
        source.open()


@pytest.mark.parametrize(
    ("name", "url", "key_id"),
    [("", "/x", "k"), ("a\x00b", "/x", "k"), ("a", "", "k"), ("a", "/x", "")],
)
def test_bad_specs(name: str, url: str, key_id: str) -> None:
    with pytest.raises(ValueError):
        InputSpec(name, url, key_id)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 100_000])
def test_plaintext_size_of_a_sealed_stream(size: int) -> None:
    out = io.BytesIO()
    with SealWriter(out, data_key=new_data_key(), key_id="k", chunk_size=4096) as w:
        w.write(os.urandom(size))
    sealed = out.getvalue()
    header = read_header(io.BytesIO(sealed))
    assert plaintext_size(header, len(sealed)) == size
    # Sizes no sealed stream can have are reported as unknown, not guessed.
    assert plaintext_size(header, header.size + 3) is None
