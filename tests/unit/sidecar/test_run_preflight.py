"""The workload-tree and output checks ``sidecar run`` makes before it attests
(sidecar/run/preflight.py); the run itself, and that no nonce is asked for, is tested in
tests/integration/sidecar/test_run.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.dataplane.errors import OutputStoreError
from sidecar.run.errors import RunSetupError
from sidecar.run.preflight import check_blob_outputs, check_output_directory, check_workload_tree


def test_an_output_directory_with_outputs_is_refused_unless_replacing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "insights").mkdir(parents=True)
    (out / "insights" / "summary.txt.sealed").write_bytes(b"earlier")
    # Temporaries of an interrupted run and other files are not outputs.
    (out / ".partial-0123").write_bytes(b"x")
    (out / "notes.txt").write_bytes(b"x")
    with pytest.raises(RunSetupError) as info:
        check_output_directory(out, replace=False)
    assert str(info.value) == (
        f"output location {out} already holds outputs (insights/summary.txt.sealed): this run "
        "could not write its own; move them away, choose another [outputs] directory, or set "
        "[outputs] replace = true to replace them"
    )
    check_output_directory(out, replace=True)
    # The probe leaves nothing behind.
    assert sorted(p.name for p in out.iterdir()) == [".partial-0123", "insights", "notes.txt"]


def test_many_outputs_are_named_up_to_a_limit(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"o{i}.sealed").write_bytes(b"x")
    with pytest.raises(RunSetupError, match=r"\(o0.sealed, o1.sealed, o2.sealed, o3.sealed, "
                       r"o4.sealed, \.\.\.\)"):  # fmt: skip
        check_output_directory(tmp_path, replace=False)


def test_a_missing_output_directory_is_created_and_a_file_is_not_a_directory(
    tmp_path: Path,
) -> None:
    check_output_directory(tmp_path / "a" / "b", replace=False)
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(RunSetupError, match=r"cannot create the output directory .*file"):
        check_output_directory(tmp_path / "file", replace=False)
    with pytest.raises(RunSetupError, match="cannot create the output directory"):
        check_output_directory(tmp_path / "file" / "sub", replace=False)


def test_an_unwritable_directory_is_refused() -> None:
    # /proc/self is a directory that nobody, root included, can create files in.
    with pytest.raises(RunSetupError, match="cannot write to the output directory /proc/self: "):
        check_output_directory(Path("/proc/self"), replace=True)


class _Sink:
    def __init__(self, found: list[str] | OutputStoreError) -> None:
        self.found = found

    def existing_outputs(self, limit: int = 5) -> list[str]:
        if isinstance(self.found, OutputStoreError):
            raise self.found
        return self.found[:limit]


def test_blob_outputs() -> None:
    check_blob_outputs(_Sink([]), "azure://a/c/out", replace=False)
    there = _Sink(["azure://a/c/out/x.sealed"])
    with pytest.raises(RunSetupError, match=r"azure://a/c/out already holds outputs \(azure://"):
        check_blob_outputs(there, "azure://a/c/out", replace=False)
    check_blob_outputs(there, "azure://a/c/out", replace=True)
    missing = _Sink(OutputStoreError("output location azure://a/c: the container does not exist"))
    with pytest.raises(RunSetupError, match="the container does not exist"):
        check_blob_outputs(missing, "azure://a/c/out", replace=True)


def _tree(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")


def test_a_workload_root_of_exactly_the_measured_files_passes(tmp_path: Path) -> None:
    _tree(tmp_path, "run.py", "example/analysis.py", "example/deep/model.py")
    check_workload_tree(tmp_path, ["run.py", "example/analysis.py", "./example//deep/model.py"])


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("json.py", "json.py"),  # shadows the standard library's json
        ("lib/__init__.py", "lib/"),  # a package wins over the measured lib.py
        ("__pycache__/lib.cpython-311.pyc", "__pycache__/"),  # bytecode run instead of lib.py
        ("example/__pycache__/analysis.cpython-311.pyc", "example/__pycache__/"),
        ("example/helpers.py", "example/helpers.py"),
    ],
)
def test_anything_unmeasured_in_the_workload_root_is_refused(
    tmp_path: Path, extra: str, named: str
) -> None:
    _tree(tmp_path, "run.py", "lib.py", "example/analysis.py", extra)
    with pytest.raises(RunSetupError, match="did not approve") as info:
        check_workload_tree(tmp_path, ["run.py", "lib.py", "example/analysis.py"])
    assert f"approve: {named};" in str(info.value)


def test_a_symlinked_directory_is_not_followed_but_refused(tmp_path: Path) -> None:
    _tree(tmp_path / "root", "run.py")
    _tree(tmp_path / "elsewhere", "lib.py")
    (tmp_path / "root" / "lib").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunSetupError, match=r"approve: lib/;"):
        check_workload_tree(tmp_path / "root", ["run.py"])


def test_the_refusal_names_the_first_few_entries(tmp_path: Path) -> None:
    _tree(tmp_path, "run.py", *(f"m{i}.py" for i in range(8)))
    with pytest.raises(RunSetupError) as info:
        check_workload_tree(tmp_path, ["run.py"])
    assert "m0.py, m1.py, m2.py, m3.py, m4.py, ...;" in str(info.value)
