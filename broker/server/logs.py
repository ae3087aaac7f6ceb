"""Structured lifecycle logs: one line per event, key=value text or JSON.

Only lifecycle events are logged (start, connect, disconnect with reason, errors, stop); the
delivery path never logs."""

from __future__ import annotations

import json
import logging
import sys
import time

from ..messages import MAX_SAFE_INTEGER

log = logging.getLogger("broker")


def event(level: int, name: str, **fields: object) -> None:
    """Log one event with fields, if the level is enabled."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})


def quoted(text: str) -> str:
    """A field's value as it stands in a text record: as it is when it is plain, else as a JSON
    string. Plain means printable ASCII without space, `"`, `=` or `\\`: a newline, any other
    control character or a line separator a client put in a field (a close reason, a path)
    is escaped, so that one record stays one line and no field can pose as another."""
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """key=value records, one line each (a traceback, when there is one, follows it)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={record.getMessage()}",
        ]
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={quoted(str(value))}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _json_value(value: object) -> object:
    """A field as a JSON record holds it: an integer beyond 2^53 as a string (JavaScript, and
    the log tools written in it, read a JSON number as a double: topic epochs are about 2^60)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **{k: _json_value(v) for k, v in getattr(record, "fields", {}).items()},
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send broker logs to stderr. picows (used by the client in the same process, e.g. the
    CLI) logs per connection: it is kept quiet unless the level is debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    logging.getLogger("picows").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
