"""One error root: every package's root error derives from CleanroomError, and the ``cleanroom``
command catches that one class, printing one line and exiting non-zero."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom.app import cli
from cleanroom.errors import CleanroomError

ROOT = Path(__file__).resolve().parents[3]
BUILTIN = {"Exception", "ValueError", "OSError", "RuntimeError", "TypeError", "KeyError"}
PACKAGES = ("broker", "sidecar", "workload", "evidence", "sealing", "pki", "blobstore", "cleanroom")


def _package_roots() -> list[type[BaseException]]:
    from blobstore.errors import BlobStoreError
    from broker.errors import BrokerError
    from cleanroom.app.demo.errors import DemoError
    from cleanroom.app.devtpm import DevTpmError
    from cleanroom.app.emulators import EmulatorError
    from cleanroom.config import ConfigError
    from evidence.errors import EvidenceError
    from pki.errors import PKIError
    from sealing.errors import SealingError
    from sidecar.errors import SidecarError
    from workload.errors import WorkloadError

    return [
        BrokerError,
        SidecarError,
        WorkloadError,
        EvidenceError,
        SealingError,
        PKIError,
        BlobStoreError,
        ConfigError,
        DemoError,
        EmulatorError,
        DevTpmError,
    ]


@pytest.mark.parametrize("root", _package_roots(), ids=lambda c: c.__name__)
def test_every_package_root_derives_from_the_project_root(root: type[BaseException]) -> None:
    assert issubclass(root, CleanroomError)


def test_blob_errors_stay_os_errors() -> None:
    """Readers and writers are file objects: their failures must still be OSErrors."""
    from blobstore.errors import BlobNotFoundError

    error = BlobNotFoundError("azure://a/c/x: not found")
    assert isinstance(error, OSError)
    assert isinstance(error, CleanroomError)
    assert str(error) == "azure://a/c/x: not found"


def _classes() -> Iterator[tuple[Path, ast.ClassDef]]:
    """Every class defined in our packages (the generated code aside), with its file."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "cleanroom/v1" in path.as_posix():
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    yield path, node


def test_every_error_class_of_ours_has_the_project_root() -> None:
    """No error class defined in our packages derives from a built-in exception alone (private
    control-flow exceptions, named with a leading underscore, aside)."""
    loose = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
        for path, node in _classes()
        if not node.name.startswith("_")
        and node.name != "CleanroomError"
        and node.bases
        and all(isinstance(b, ast.Name) and b.id in BUILTIN for b in node.bases)
    ]
    assert not loose, "error classes outside CleanroomError:\n" + "\n".join(loose)


def _error_classes() -> list[tuple[str, Path, int]]:
    """(name, file, line) of every public class named ``...Error`` in our packages."""
    return [
        (node.name, path.relative_to(ROOT), node.lineno)
        for path, node in _classes()
        if node.name.endswith("Error")
    ]


def test_error_names_are_unique_across_the_project() -> None:
    """Two error classes of one name (``sidecar.errors.MeasurementError`` and
    ``evidence.errors.MeasurementError``, say) make an ``except`` clause or a log line ambiguous
    and force import aliases; each error name has one class."""
    where: dict[str, list[str]] = {}
    for name, path, line in _error_classes():
        where.setdefault(name, []).append(f"{path}:{line}")
    clashes = {name: places for name, places in where.items() if len(places) > 1}
    assert not clashes, "error names defined more than once:\n" + "\n".join(
        f"{name}: {', '.join(places)}" for name, places in sorted(clashes.items())
    )


#: The broker's errors modules: the core's tree, the client's status-code errors and the gRPC
#: layer's own refusals.
BROKER_ERROR_MODULES = {
    Path("broker/errors.py"),
    Path("broker/client_errors.py"),
    Path("broker/server/errors.py"),
}


def test_the_broker_defines_errors_only_in_its_errors_modules() -> None:
    """A caller finds every broker error in one of three modules, never in the module that
    happens to raise it."""
    elsewhere = [
        f"{path}:{line} {name}"
        for name, path, line in _error_classes()
        if path.parts[0] == "broker" and path not in BROKER_ERROR_MODULES
    ]
    assert not elsewhere, "broker errors outside its errors modules:\n" + "\n".join(elsewhere)


def test_the_command_catches_the_root_and_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class SomeNewError(CleanroomError):
        """A package's error that the command has never heard of."""

    def handler(args: argparse.Namespace) -> int:
        raise SomeNewError("the input file is missing")

    real = cli.build_parser

    def build_parser(command: str | None = None) -> argparse.ArgumentParser:
        parser = real(command)
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        sub.add_parser("explode").set_defaults(func=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    assert cli.main(["explode"]) == 1
    assert capsys.readouterr().err == "cleanroom: error: the input file is missing\n"


def test_an_error_without_a_message_shows_its_summary() -> None:
    class QuietError(CleanroomError):
        """The thing could not be done."""

    assert QuietError().user_message == "The thing could not be done"
    assert QuietError("exact reason").user_message == "exact reason"
