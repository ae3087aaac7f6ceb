"""Request/reply between connections, and the dead letters (sans-I/O).

A `req` goes to one connection that responds to its topic (chosen at random) as a `request`
with a number of the broker's; the responder's `reply` with that number goes back to the
requester with its own request id. Each request has a deadline (one heap for all of them:
the I/O shell arms one timer at `next_deadline` and calls `expire_requests`); a request whose
requester or responder leaves is dropped or fails at once. Dead letters are the client
messages the broker could not process, the newest `dead_letters_max` of them.

The router (broker.router) holds one `Requests` as `router.requests` and hands it its `send`
(queue an encoded message on a connection, written with the rest of the tick) and its stats.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .errors import ErrorCode, RequestError
from .fastpath import Outbox
from .messages import Err, Reply, Request, encode
from .topics import is_pattern, validate_pattern, validate_topic


class DeadLetter(NamedTuple):
    """A client message the broker could not process: when (s since 1970), from which
    connection, its request id, the error code and reason it was answered with, and the hex of
    its first bytes."""

    time: float
    conn: object
    peer: str
    request_id: int
    code: int
    reason: str
    head: str


class _Open:
    """A request waiting for its reply."""

    __slots__ = ("requester", "request_id", "responder", "deadline", "topic")

    def __init__(self, requester: Outbox, request_id: int, responder: Outbox, deadline: float, topic: str) -> None:
        self.requester = requester
        self.request_id = request_id
        self.responder = responder
        self.deadline = deadline
        self.topic = topic


class Requests:
    """The requests waiting for replies (by the number passed to the responder), the
    connections that respond to each topic, and the dead letters."""

    def __init__(
        self,
        send: Callable[[Outbox, bytes], None],
        stats,
        clock: Callable[[], float],
        max_open_requests: int,
        max_topic_length: int,
        dead_letters_max: int,
    ) -> None:
        self.send = send
        self.stats = stats  # the router's RouterStats: requests, replies, timeouts, dead_letters, errors
        self.clock = clock
        self.max_open_requests = max_open_requests
        self._max_topic_length = max_topic_length
        self._requests: dict[int, _Open] = {}  # by the number passed to the responder
        self._deadlines: list[tuple[float, int]] = []  # (deadline, number), a heap
        self._open: dict[Outbox, int] = {}  # requests waiting, by requester
        self._involved: dict[Outbox, set[int]] = {}  # the requests a connection made or answers
        self._next_request = 0
        self._pick = random.Random()
        self.responders: dict[str, list[Outbox]] = {}  # concrete topic -> connections answering its requests
        self.dead_letters: deque[DeadLetter] = deque(maxlen=dead_letters_max)  # the newest, oldest first

    @property
    def waiting(self) -> int:
        """Requests waiting for their replies."""
        return len(self._requests)

    @property
    def involved(self) -> int:
        """Connections that made or answer a waiting request."""
        return len(self._involved)

    def dead_letter(self, box: Outbox, request_id: int, code: int, reason: str, head: bytes) -> None:
        """Keep a client message the broker could not process (undecodable, or a publish it
        refused) among the newest `dead_letters_max`; counted in stats.dead_letters."""
        self.stats.dead_letters += 1
        owner = box.owner
        self.dead_letters.append(
            DeadLetter(
                time.time(), getattr(owner, "id", owner), getattr(owner, "peer", ""), request_id, int(code), reason, bytes(head).hex()
            )
        )

    def request(self, box: Outbox, request_id: int, topic: str, data: bytes, timeout_ms: int, user: str | None = None) -> None:
        """Pass a request to one connection responding to `topic` (chosen at random), as
        `["request", number, topic, data, user]` (`user`: the requester's, None without one);
        its reply goes back to `box` with `request_id`.
        No responder: NO_RESPONDERS at once; no reply within `timeout_ms`: REQUEST_TIMEOUT."""
        if is_pattern(topic):
            validate_pattern(topic, self._max_topic_length)
            raise RequestError(ErrorCode.PATTERN_NOT_ALLOWED, f"cannot send a request to pattern {topic!r}; name a concrete topic")
        validate_topic(topic, self._max_topic_length)
        if self._open.get(box, 0) >= self.max_open_requests:
            raise RequestError(ErrorCode.TOO_MANY_REQUESTS, f"this connection has {self.max_open_requests} requests waiting, the limit")
        responders = [r for r in self.responders.get(topic, ()) if not r.closed and not r.over]
        if not responders:
            raise RequestError(ErrorCode.NO_RESPONDERS, f"no connection responds to {topic!r}")
        responder = responders[self._pick.randrange(len(responders))] if len(responders) > 1 else responders[0]
        self._next_request += 1
        number = self._next_request
        deadline = self.clock() + timeout_ms / 1000
        self._requests[number] = _Open(box, request_id, responder, deadline, topic)
        heapq.heappush(self._deadlines, (deadline, number))
        self._open[box] = self._open.get(box, 0) + 1
        self._involved.setdefault(box, set()).add(number)
        self._involved.setdefault(responder, set()).add(number)
        self.stats.requests += 1
        self.send(responder, encode(Request(number, topic, data, user)))

    def add_responder(self, topic: str, box: Outbox) -> None:
        self.responders.setdefault(topic, []).append(box)

    def remove_responder(self, topic: str, box: Outbox) -> None:
        boxes = self.responders.get(topic)
        if boxes is not None and box in boxes:
            boxes.remove(box)
            if not boxes:
                del self.responders[topic]

    def withdraw_responder(self, topic: str, box: Outbox) -> None:
        """`box` no longer answers `topic` (its grants stopped covering it): it gets no more
        requests to it, and those passed to it and not yet answered fail at once with
        NO_RESPONDERS (its reply to one of them is refused as unknown)."""
        self.remove_responder(topic, box)
        numbers = self._involved.get(box)
        if not numbers:
            return
        for number in list(numbers):
            pending = self._requests.get(number)
            if pending is not None and pending.responder is box and pending.topic == topic:
                self._close_request(number, pending)
                self._fail_request(pending, ErrorCode.NO_RESPONDERS, "the responder is no longer allowed to answer this topic")

    def reply(self, box: Outbox, number: int, data: bytes) -> None:
        """A responder's reply: back to the requester, if the request still waits for it."""
        pending = self._requests.get(number)
        if pending is None or pending.responder is not box:
            raise RequestError(
                ErrorCode.UNKNOWN_REQUEST,
                f"no request {number} waits for a reply from this connection (it timed out, or was never passed to it)",
            )
        self._close_request(number, pending)
        self.stats.replies += 1
        if not pending.requester.closed:
            self.send(pending.requester, encode(Reply(pending.request_id, data)))

    @property
    def next_deadline(self) -> float | None:
        """When the earliest waiting request times out (on `clock`), or None."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._requests:
            heapq.heappop(deadlines)  # answered already
        return deadlines[0][0] if deadlines else None

    def expire_requests(self) -> None:
        """Answer every request past its deadline with REQUEST_TIMEOUT."""
        now = self.clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, number = heapq.heappop(deadlines)
            pending = self._requests.get(number)
            if pending is None:
                continue
            self._close_request(number, pending)
            self.stats.timeouts += 1
            self._fail_request(pending, ErrorCode.REQUEST_TIMEOUT, "no reply within the request's timeout")

    def forget_requests(self, box: Outbox) -> None:
        """A connection closes: its own requests are dropped; those it was to answer fail at
        once with NO_RESPONDERS."""
        numbers = self._involved.pop(box, None)
        if not numbers:
            return
        for number in numbers:
            pending = self._requests.get(number)
            if pending is None:
                continue
            if pending.requester is box:
                self._close_request(number, pending)
            elif pending.responder is box:
                self._close_request(number, pending)
                self._fail_request(pending, ErrorCode.NO_RESPONDERS, "the responder's connection closed before it replied")

    def _close_request(self, number: int, pending: _Open) -> None:
        del self._requests[number]
        left = self._open[pending.requester] - 1
        if left:
            self._open[pending.requester] = left
        else:
            del self._open[pending.requester]
        for box in (pending.requester, pending.responder):
            numbers = self._involved.get(box)
            if numbers is not None:
                numbers.discard(number)
                if not numbers:
                    del self._involved[box]

    def _fail_request(self, pending: _Open, code: ErrorCode, text: str) -> None:
        if not pending.requester.closed:
            self.stats.count_error(code)
            self.send(pending.requester, encode(Err(pending.request_id, int(code), text)))
