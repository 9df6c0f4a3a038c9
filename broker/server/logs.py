"""Structured logging for the broker: a request id on every line, JSON on request.

Every call gets a request id (the caller's ``x-request-id`` metadata when it is a short token,
otherwise a random one) held in a context variable; :class:`RequestIdFilter` stamps it on every
record logged while the call runs, including the core's own log lines. Extra structured fields
travel in ``extra={"fields": {...}}``. Nothing logged here holds key material or plaintext: the
access log names the method, the caller's SPIFFE ID, the status code and the duration.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any, Final, TextIO

from cleanroom.logs import StderrHandler

NO_REQUEST: Final = "-"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "cleanroom_request_id", default=NO_REQUEST
)

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_request_id(offered: str | None = None) -> str:
    """``offered`` if it is a short token (letters, digits, ``._-``), else a fresh random id.

    The check keeps a caller from injecting newlines or megabytes into the logs.
    """
    if offered is not None and _REQUEST_ID_RE.fullmatch(offered):
        return offered
    return secrets.token_hex(8)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current call's id, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = NO_REQUEST
        text = super().format(record)
        fields = _fields(record)
        if fields:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            head, sep, tail = text.partition("\n")
            text = f"{head} {extra}{sep}{tail}"
        return text


#: The level of ``-vv``: debug logs and, below them, the Azure SDK's HTTP request and response
#: lines (headers included), which the broker otherwise keeps at WARNING.
SDK_DEBUG: Final = logging.DEBUG - 5


def configure_logging(
    *, json_output: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Replaces the root logger's handlers with one structured handler and returns it.

    Without ``stream`` the handler writes to the ``sys.stderr`` of the moment each record is
    emitted (:class:`StderrHandler`), so it never outlives a temporary ``sys.stderr`` and
    writes to it once closed. Records below ``level`` are dropped; gRPC's own chatty loggers
    stay at WARNING, and so does the Azure SDK unless ``level`` is :data:`SDK_DEBUG`.
    """
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else StderrHandler()
    )
    handler.setFormatter(JsonFormatter() if json_output else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("grpc").setLevel(max(level, logging.WARNING))
    logging.getLogger("azure").setLevel(logging.DEBUG if level <= SDK_DEBUG else logging.WARNING)
    return handler


__all__ = [
    "NO_REQUEST",
    "SDK_DEBUG",
    "JsonFormatter",
    "RequestIdFilter",
    "StderrHandler",
    "TextFormatter",
    "configure_logging",
    "new_request_id",
    "request_id_var",
]
