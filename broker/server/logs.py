"""Structured lifecycle logs: one line per event, key=value text or JSON.

Only lifecycle events are logged (start, connect, disconnect with reason, errors, stop); the
delivery path never logs."""

from __future__ import annotations

import json
import logging
import sys
import time

log = logging.getLogger("broker")


def event(level: int, name: str, **fields: object) -> None:
    """Log one event with fields, if the level is enabled."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={record.getMessage()}",
        ]
        for key, value in getattr(record, "fields", {}).items():
            text = str(value)
            if not text or any(c in text for c in ' "='):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **{k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in getattr(record, "fields", {}).items()},
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send broker logs to stderr. picows (used by the client in the same process, e.g. the
    CLI) logs per connection: it is kept quiet unless the level is debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    logging.getLogger("picows").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
