"""Back-pressure: the bound on queued bytes and the slow-consumer rule, sans-I/O.

The rule is redis's client-output-buffer-limit triple, per connection: a soft limit
(`max_pending_bytes`, the outbox's `limit`) that a backlog may pass for at most
`slow_consumer_timeout_s`, and a hard limit (`HARD_LIMIT_FACTOR` times the soft one) that
closes at once. Over all connections, `max_total_pending_bytes` bounds the bytes queued for
connections that are behind: past it the publishers are held (not read), below three quarters
of it they are read again, and held for `slow_consumer_timeout_s` the connections the most
behind are slow consumers, the largest backlog first, until the total is below that mark.

`Pressure` only counts and judges: the I/O shell (broker.server.app) measures each backlog
(its outbox plus its transport's buffer), calls `account` and `judge` from its tick and its
sweep with the time, and does what they return (close a connection, hold or release the
publishers). It never reads a clock or a socket itself, so it is tested with plain calls.
"""

from __future__ import annotations

from typing import Any

# A connection may queue up to this many times max_pending_bytes while it catches up with a
# burst; past it, it is closed at once (the softer bound is judged over time by `judge`).
HARD_LIMIT_FACTOR = 4

# What `memory` asks the shell to do with the publishers.
KEEP = 0
HOLD = 1
RELEASE = 2


class Pressure:
    """The backlogs of the connections that are behind, their total, whether the publishers
    are held, and which connections stayed above their soft limit (`behind`). A connection is
    its outbox (`limit`, `over_since`, `closed`): any hashable object with those attributes."""

    __slots__ = ("max_total", "low", "timeout_s", "lagging", "total", "holding", "holding_since", "holds", "behind")

    def __init__(self, max_total_bytes: int, timeout_s: float) -> None:
        self.max_total = max_total_bytes
        self.low = max_total_bytes * 3 // 4  # held publishers are read again below this
        self.timeout_s = timeout_s
        self.lagging: dict[Any, int] = {}  # outbox -> its backlog as last seen (non-zero only)
        self.total = 0  # their sum
        self.holding = False  # publishers are not read: total passed max_total
        self.holding_since = 0.0
        self.holds = 0  # times that happened
        self.behind: set[Any] = set()  # outboxes above their soft limit since `over_since`

    def account(self, box: Any, backlog: int) -> None:
        """Record a connection's backlog (0: it has none, or it is gone) in the total."""
        if box.closed:
            backlog = 0  # its queue is dropped
        self.total += backlog - self.lagging.pop(box, 0)
        if backlog:
            self.lagging[box] = backlog

    def judge(self, box: Any, backlog: int, now: float) -> bool:
        """The slow-consumer rule, at `now`, for a connection whose backlog (outbox and
        transport, what its policies hold left out) is `backlog`: True when it is a slow
        consumer, above the hard limit or above the soft one for `timeout_s`. The tick calls it
        for a connection above its soft limit or that was (`over_since`), the sweep for those
        that stay `behind`: one timer, started the first time it is seen above."""
        limit = box.limit
        if backlog <= limit:
            if box.over_since:
                box.over_since = 0.0
                self.behind.discard(box)
            return False
        if backlog > limit * HARD_LIMIT_FACTOR:
            self.behind.discard(box)
            return True
        if not box.over_since:
            box.over_since = now
            self.behind.add(box)
            return False
        if now - box.over_since >= self.timeout_s:
            self.behind.discard(box)
            return True
        return False

    def forget(self, box: Any) -> None:
        """The connection is closed: it is no longer behind and its backlog no longer counts."""
        self.behind.discard(box)
        if box in self.lagging:
            self.account(box, 0)

    def over(self) -> bool:
        """True when `memory` has something to decide (cheap: the tick asks it every time)."""
        return self.holding or self.total > self.max_total

    def memory(self, now: float) -> int:
        """HOLD when the total just passed max_total (the shell stops reading every connection
        that publishes), RELEASE when held and it fell below three quarters of it, else KEEP."""
        if not self.holding and self.total > self.max_total:
            self.holding = True
            self.holding_since = now
            self.holds += 1
            return HOLD
        if self.holding and self.total < self.low:
            self.holding = False
            return RELEASE
        return KEEP

    def overdue(self, now: float) -> list[Any]:
        """Held for `timeout_s`: the connections to close as slow consumers, the largest
        backlog first, until the total is below three quarters of max_total (their backlogs
        no longer count). Empty when the publishers are not held or not for that long."""
        if not self.holding or now - self.holding_since < self.timeout_s:
            return []
        lagging = self.lagging
        chosen = []
        for box in sorted(lagging, key=lagging.__getitem__, reverse=True):
            if self.total < self.low:
                break
            chosen.append(box)
            self.behind.discard(box)
            self.account(box, 0)
        return chosen
