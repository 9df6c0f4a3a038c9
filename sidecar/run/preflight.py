"""What ``sidecar run`` checks about its workload tree and its outputs before it attests.

The workload root must hold exactly the measured files (:func:`check_workload_tree`): an
interpreter loads code from the workload's directory that no manifest lists, so an unlisted file
there would run unmeasured with the released keys' plaintext (see the function).

A run that cannot write its outputs should fail before the broker is asked for a nonce, not after
the keys were released and the workload ran: :func:`check_output_directory` (a local directory,
before anything is contacted) and :func:`check_blob_outputs` (an Azure Blob prefix, once the blob
store is set up) refuse a location that already holds outputs, unless ``[outputs] replace`` says
to replace them, and a location that cannot be written.

Output names are chosen by the workload while it runs, so "already holds outputs" means any
sealed output (``*.sealed``) at the location, not only the names this run will write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

from sidecar.dataplane.errors import DataPlaneError
from sidecar.dataplane.outputs import SEALED_SUFFIX
from sidecar.run.errors import RunSetupError

__all__ = ["MAX_LISTED", "check_blob_outputs", "check_output_directory", "check_workload_tree"]

#: How many existing outputs an error names (the first ones found).
MAX_LISTED = 5

_PROBE_PREFIX = ".cleanroom-preflight-"


class ListsOutputs(Protocol):
    """An output sink that can list the outputs already at its location (the blob sink)."""

    def existing_outputs(self, limit: int = MAX_LISTED) -> list[str]: ...


def check_workload_tree(root: Path, measured: Sequence[str]) -> None:
    """Refuses a workload root that holds anything besides the measured files and the
    directories that lead to them.

    The measurement covers the listed files, but an interpreter started in the root loads more
    from it than what it was told to run: Python puts the script's directory first on its
    module path, so an unlisted ``json.py`` shadows the standard library's, a package directory
    ``lib/`` is imported instead of a measured ``lib.py``, and a ``__pycache__/*.pyc`` whose
    header matches a measured source's size and modification time is run instead of that
    source. Whoever starts the sidecar controls the disk, so each of these would put unmeasured
    code next to the plaintext. Symbolic links are not followed (a link to a directory that
    leads to no measured file is refused like any other entry).

    Raises:
        RunSetupError: an entry that no measured path explains, naming the first few.
    """
    files = {PurePosixPath(name) for name in measured}
    directories = {parent for name in files for parent in name.parents}
    extra: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        kept = []
        for name in sorted(dirnames):
            if here / name in directories and not os.path.islink(os.path.join(dirpath, name)):
                kept.append(name)
            else:
                extra.append(f"{here / name}/")
        dirnames[:] = kept  # only the directories that lead to measured files are walked
        extra.extend(str(here / name) for name in sorted(filenames) if here / name not in files)
    if extra:
        shown = ", ".join(extra[:MAX_LISTED]) + (", ..." if len(extra) > MAX_LISTED else "")
        raise RunSetupError(
            f"workload root {root} holds what the parties did not approve: {shown}; an "
            "interpreter would load it unmeasured (a module or package that shadows an import, "
            "a __pycache__ of bytecode): remove it, or list it in [workload] files and have the "
            "parties approve it (run Python with -B, so that it writes no __pycache__ there)"
        )


def _refusal(where: str, found: Sequence[str]) -> RunSetupError:
    shown = ", ".join(found[:MAX_LISTED]) + (", ..." if len(found) > MAX_LISTED else "")
    return RunSetupError(
        f"output location {where} already holds outputs ({shown}): this run could not write "
        "its own; move them away, choose another [outputs] directory, or set [outputs] "
        "replace = true to replace them"
    )


def _sealed_files(directory: Path, limit: int) -> list[str]:
    """Up to ``limit`` sealed outputs under ``directory``, as paths relative to it (symlinked
    directories are not followed: the sink refuses to write through them anyway)."""
    found: list[str] = []
    for parent, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(SEALED_SUFFIX):
                found.append(os.path.relpath(os.path.join(parent, name), directory))
                if len(found) >= limit:
                    return found
    return found


def check_output_directory(directory: Path, *, replace: bool) -> None:
    """Checks that a run can write its outputs into the local ``directory``.

    The directory is created if it is missing (the output sink would create it anyway); a file
    is then created in it and removed, which is the one check of writability that holds for
    every user, root included, and for read-only file systems.

    Raises:
        RunSetupError: the directory cannot be created, is not a directory, cannot be written,
            or (unless ``replace``) already holds sealed outputs.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunSetupError(
            f"cannot create the output directory {directory}: {e.strerror or e}"
        ) from e
    if not directory.is_dir():
        raise RunSetupError(f"output location {directory} is not a directory")
    if not replace:
        found = _sealed_files(directory, MAX_LISTED + 1)
        if found:
            raise _refusal(str(directory), found)
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=_PROBE_PREFIX)
    except OSError as e:
        raise RunSetupError(
            f"cannot write to the output directory {directory}: {e.strerror or e}"
        ) from e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as e:
        raise RunSetupError(
            f"cannot remove a file from the output directory {directory}: {e.strerror or e}"
        ) from e


def check_blob_outputs(sink: ListsOutputs, where: str, *, replace: bool) -> None:
    """Checks an Azure Blob output location: the container must be there and readable with the
    configured credentials, and (unless ``replace``) hold no sealed outputs under the prefix.
    Whether the credentials may also write is known only when the first output is written.

    Raises:
        RunSetupError: the container is missing or unreachable, the credentials are refused,
            or outputs are there.
    """
    try:
        found = sink.existing_outputs(MAX_LISTED + 1)
    except DataPlaneError as e:
        raise RunSetupError(str(e)) from e
    if found and not replace:
        raise _refusal(where, found)
