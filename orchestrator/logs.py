"""Log lines: one JSON object per line (``LOG_FORMAT=json``, the default) or text.

Every JSON line has ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``;
``request_id``, ``job_id``, ``user_id`` and ``task_id`` when they are known,
and ``exc`` with the traceback of a logged exception. What is known comes from
the record's ``extra=`` and from *context providers*: the web registers one
that reads the current request (``web.logs``), the Celery workers one that
reads the current task (``tasks.logs``), so this module knows neither.

Nothing here adds to what a message says: a line carries the message and the
ids, never request headers, bodies or settings, so the rule that no secret is
logged stays the message's.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Callable, Mapping, TextIO

#: The ids a line carries when they are known, in this order.
CONTEXT_FIELDS = ("request_id", "job_id", "user_id", "task_id")
_EMPTY = (None, "", "-")

Provider = Callable[[logging.LogRecord], Mapping[str, Any]]
_providers: list[Provider] = []


def add_context(provider: Provider) -> None:
    """Add a source of ids for every line of this process (added once)."""
    if provider not in _providers:
        _providers.append(provider)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The ids known for this record: its ``extra=`` first, then the providers'."""
    found: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value not in _EMPTY:
            found[name] = value
    for provider in _providers:
        try:
            extra = provider(record)
        except Exception:  # noqa: BLE001 - a log line is never lost to its decoration
            continue
        for name, value in extra.items():
            if value not in _EMPTY and name not in found:
                found[name] = value
    return found


def _ts(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def json_line(level: str, logger: str, msg: str, **fields: Any) -> str:
    """One log line as JSON (for the rare line written before logging is set up)."""
    import time

    return json.dumps({"ts": _ts(time.time()), "level": level, "logger": logger, "msg": msg,
                       **fields}, default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _ts(record.created), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        out.update(context_of(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For humans: time, level, logger, message, then the ids in brackets."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        ids = context_of(record)
        return f"{line} [{' '.join(f'{k}={v}' for k, v in ids.items())}]" if ids else line


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(log_format: str, level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``.

    Replaces the root handlers (a process configures this once, at start).
    Python warnings become records too, so they are lines like any other.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def reformat(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of ``logger`` our formatter (loggers set up by a framework)."""
    for handler in logger.handlers:
        handler.setFormatter(formatter(log_format))
