"""Log handlers follow ``sys.stderr``: none outlives a temporary stream it was installed under.

Regression: ``cleanroom.app.cli.main`` (and :func:`broker.server.logs.configure_logging`) bound the
root handler to the ``sys.stderr`` of the moment. Under pytest's ``capsys`` that is a capture
stream closed after the test, so every record logged later in the session (a servicer test's
gRPC thread, say) printed a "--- Logging error ---" traceback instead of the record.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator

import pytest

from broker.server.logs import StderrHandler, configure_logging
from cleanroom.app.cli import main


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _install_under_temporary_stderr(install: Callable[[], object]) -> None:
    """Runs ``install`` while ``sys.stderr`` is a temporary stream, then closes that stream."""
    temporary = io.StringIO()
    with contextlib.redirect_stderr(temporary):
        install()
    temporary.close()


def _cli_main() -> None:
    # No subcommand: main() sets logging up, prints its help and returns 2; nothing else runs.
    assert main([]) == 2


def _configure_json() -> None:
    configure_logging(json_output=True)


@pytest.mark.parametrize("install", [_cli_main, _configure_json], ids=["cli-main", "configure"])
def test_records_logged_after_the_stream_closed_reach_the_current_stderr(
    install: Callable[[], object], capsys: pytest.CaptureFixture[str]
) -> None:
    # Twice, as a test session runs main() again and again, each time under a new capture.
    _install_under_temporary_stderr(install)
    _install_under_temporary_stderr(install)
    logging.getLogger("cleanroom.test").warning("after the capture closed")
    err = capsys.readouterr().err
    assert "Logging error" not in err
    assert "after the capture closed" in err
    assert len(logging.getLogger().handlers) == 1


def test_configure_logging_writes_json_to_the_stderr_of_the_moment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(json_output=True)
    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        logging.getLogger("cleanroom.test").info("one", extra={"fields": {"n": 1}})
    logging.getLogger("cleanroom.test").info("two")
    assert json.loads(first.getvalue())["message"] == "one"
    assert json.loads(capsys.readouterr().err)["message"] == "two"


def test_an_explicit_stream_is_kept_and_a_stderr_handler_cannot_be_rebound() -> None:
    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    logging.getLogger("cleanroom.test").warning("kept")
    assert "kept" in stream.getvalue()
    follower = StderrHandler()
    assert follower.stream is sys.stderr
    with pytest.raises(AttributeError):
        follower.setStream(io.StringIO())
    assert not isinstance(handler, StderrHandler)


def test_the_azure_sdk_http_lines_show_only_at_the_sdk_debug_level() -> None:
    from broker.server.logs import SDK_DEBUG

    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("azure").level)
    try:
        for level, shown in ((logging.INFO, False), (logging.DEBUG, False), (SDK_DEBUG, True)):
            configure_logging(level=level, stream=io.StringIO())
            assert sdk.isEnabledFor(logging.INFO) is shown, level
            assert sdk.isEnabledFor(logging.WARNING)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("azure").setLevel(saved[2])
