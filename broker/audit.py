"""The audit log of limit violations: structured lines, bounded per key and per event.

At most a few lines per connection (or address) and per kind of event each second; what it
leaves out is counted and reported in one line per key when the second is over. It never logs
tokens or payloads. Part of the sans-I/O core: it is given the function that writes a line
(broker.server.logs.event in the server) and a clock. broker.limits.Guard holds one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

# The audit log's bounds: per second, lines per connection (or address) and per kind of event.
AUDIT_WINDOW_S = 1.0
AUDIT_PER_KEY = 5
AUDIT_PER_EVENT = 50


class AuditLog:
    """Structured log lines of limit violations, bounded: in each window of `window` seconds at
    most `per_key` lines per key (a connection, an address) and `per_event` lines per event
    name. When the window is over, one `audit_lines_skipped` line per key (with `kind`, the
    event) says how many of its lines were left out, and one more line per event counts the
    keys that got no line at all (`sources`)."""

    def __init__(
        self,
        emit: Callable[..., None],
        clock: Callable[[], float] = time.monotonic,
        *,
        per_key: int = AUDIT_PER_KEY,
        per_event: int = AUDIT_PER_EVENT,
        window: float = AUDIT_WINDOW_S,
        stats: Any = None,
    ) -> None:
        self.emit = emit
        self.clock = clock
        self.per_key = per_key
        self.per_event = per_event
        self.window = window
        self.stats = stats  # a broker.limits.LimitStats: lines left out are counted in it
        self.start = clock()
        self._keys: dict[Any, list] = {}  # key -> [event, summary fields, lines logged, lines left out]
        self._lines: dict[str, int] = {}  # event -> lines logged in this window

    def record(self, key: Any, event: str, summary: dict[str, Any], **fields: Any) -> bool:
        """Log `event` with `fields` unless `key` or `event` has had its lines in this window;
        `summary` holds the fields that identify the key in a summary line. True if logged."""
        now = self.clock()
        if now - self.start >= self.window:
            self.flush(now)
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = [event, summary, 0, 0]
        lines = self._lines.get(event, 0)
        if entry[2] < self.per_key and lines < self.per_event:
            entry[2] += 1
            self._lines[event] = lines + 1
            self.emit(logging.WARNING, event, **fields)
            return True
        entry[3] += 1
        if self.stats is not None:
            self.stats.audit_suppressed += 1
        return False

    def flush(self, now: float | None = None) -> None:
        """End the window: the summary lines of what was left out, then a new window."""
        now = self.clock() if now is None else now
        keys = self._keys
        self._keys = {}
        self._lines = {}
        self.start = now
        unnamed: dict[str, list[int]] = {}  # event -> [lines left out, keys] of keys that logged nothing
        for event, summary, logged, left_out in keys.values():
            if not left_out:
                continue
            if logged:
                self.emit(logging.WARNING, "audit_lines_skipped", kind=event, **summary, count=left_out)
            else:
                total = unnamed.setdefault(event, [0, 0])
                total[0] += left_out
                total[1] += 1
        for event, (left_out, count) in unnamed.items():
            self.emit(logging.WARNING, "audit_lines_skipped", kind=event, count=left_out, sources=count)
