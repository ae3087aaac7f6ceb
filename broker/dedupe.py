"""The dedupe window of publishes: a msg_id seen on a topic lately is a repeat (sans-I/O).

A publish with a `msg_id` gets a `Seen` record of (topic, msg_id): the (epoch, seq) its message
got, or, while the backplane has not sequenced it yet, the requests waiting for that. A repeat
within `dedupe_window_s` is acknowledged with the original's position and not published again.
Records leave after the window, or oldest first past `dedupe_max_ids`. The router
(broker.router) holds one `Dedupe` as `router.dedupe` and asks it at each publish with a msg_id.
"""

from __future__ import annotations

from collections import deque


class Seen:
    """A msg_id in the dedupe window: the (epoch, seq) its message got, or, while the backplane
    has not sequenced it yet, the requests waiting for that (box, request id)."""

    __slots__ = ("epoch", "seq", "waiting")

    def __init__(self) -> None:
        self.epoch = 0
        self.seq = 0
        self.waiting: list | None = None


class Dedupe:
    """The records of the msg_ids seen within the window, and their order of arrival."""

    __slots__ = ("window_ms", "max_ids", "seen", "order")

    def __init__(self, window_s: float = 120.0, max_ids: int = 100_000) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_ids = max_ids
        self.seen: dict[tuple[str, str], Seen] = {}
        self.order: deque[tuple[int, tuple[str, str]]] = deque()  # (ms it came, key), oldest first

    def __len__(self) -> int:
        return len(self.seen)

    def record(self, topic: str, msg_id: str, now_ms: int) -> Seen:
        """The record of (topic, msg_id) in the dedupe window at `now_ms` (the backplane's
        clock), made if there is none. Records leave after the window, or oldest first past
        max_ids."""
        seen, order = self.seen, self.order
        horizon = now_ms - self.window_ms
        while order and (order[0][0] < horizon or len(order) >= self.max_ids):
            _, old = order.popleft()
            seen.pop(old, None)
        key = (topic, msg_id)
        record = seen.get(key)
        if record is None:
            record = seen[key] = Seen()
            order.append((now_ms, key))
        return record

    def forget(self, record: Seen) -> None:
        """The backplane could not publish the message of `record`: a retry with the same
        msg_id publishes it anew."""
        for key, seen in list(self.seen.items()):
            if seen is record:
                del self.seen[key]
                break
