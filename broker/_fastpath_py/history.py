"""History: each topic's recent messages, for recovery and last values, in chunks of one time
bucket, bounded per topic by messages and bytes (`HistoryStore`). Part of the pure-Python fast
path (`broker._fastpath_py`); the compiled twin is `_fastpath_history.pxi`."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .topics import TopicState


MESSAGE_OVERHEAD = 48  # bytes counted per retained message on top of its payload
CHUNK_OVERHEAD = 120  # bytes counted per chunk (its record and its places in the queues)
BUCKET_MS = 1000  # a topic's batches retained within this many milliseconds share one chunk


class HistoryChunk:
    """Consecutive messages of one topic retained within one time bucket (BUCKET_MS from its
    first); `log` is None once it is no longer retained."""

    __slots__ = ("first", "payloads", "sizes", "time", "last", "log")

    def __init__(self, first: int, payloads: list, sizes: int, time_ms: int, log) -> None:
        self.first = first
        self.payloads = payloads  # its own list (the emitted batch's, extended by later ones)
        self.sizes = sizes  # bytes counted for what is still retained of it
        self.time = time_ms  # when its first message was retained
        self.last = time_ms  # when its newest message was
        self.log = log


class HistoryLog:
    """One topic's retained messages: chunks of consecutive sequence numbers, the first one
    possibly cut (`skip` messages of it are gone)."""

    __slots__ = ("chunks", "tail", "skip", "count", "size", "trimmed_time")

    def __init__(self) -> None:
        self.chunks: deque[HistoryChunk] = deque()
        self.tail: HistoryChunk | None = None  # the newest chunk, while it is retained
        self.skip = 0
        self.count = 0
        self.size = 0  # bytes counted (payloads and overheads)
        self.trimmed_time = -1  # when the newest message trimmed so far was retained (ms); -1: none

    def first_seq(self) -> int:
        """The sequence number of the oldest retained message (0 when none is)."""
        if not self.chunks:
            return 0
        return self.chunks[0].first + self.skip


class HistoryStore:
    """Every topic's HistoryLog (on `TopicState.history`), bounded per topic by messages and
    bytes as batches are retained.

    A batch joins the topic's newest chunk while that is younger than BUCKET_MS (so a topic
    costs one chunk per second however many ticks it is published in). Past the message
    bound, whole chunks go while the bound asks for at least that many, else the part of the
    first chunk it asks for, in one step (the cut part of a long-lived chunk is let go once it
    is most of it); past the byte bound, one message at a time. `order` holds every chunk,
    oldest first, for the bounds by age and in total its owner applies; `stale` counts the
    chunks in it that a topic's own bounds dropped already."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.order: deque[HistoryChunk] = deque()
        self.total = 0  # bytes counted over every topic
        self.stale = 0
        self.trimmed = 0  # messages dropped by any bound
        self.max_messages = max_messages
        self.max_bytes = max_bytes

    def retain(self, state: TopicState, first: int, payloads: list, now_ms: int) -> None:
        """Keep a batch of the topic (its list is kept, not copied: the caller lets go of it)."""
        log = state.history
        if log is None:
            log = state.history = HistoryLog()
        size = MESSAGE_OVERHEAD * len(payloads)
        for payload in payloads:
            if type(payload) is not bytes:
                raise TypeError("payloads must be bytes")
            size += len(payload)
        tail = log.tail
        if tail is not None and tail.log is not None and now_ms - tail.time < BUCKET_MS and tail.first + len(tail.payloads) == first:
            tail.payloads.extend(payloads)
            tail.sizes += size
            tail.last = now_ms
        else:
            size += CHUNK_OVERHEAD
            tail = HistoryChunk(first, payloads, size, now_ms, log)
            log.chunks.append(tail)
            log.tail = tail
            self.order.append(tail)
        log.count += len(payloads)
        log.size += size
        self.total += size
        if log.count > self.max_messages or log.size > self.max_bytes:
            self._trim(log)

    def _trim(self, log: HistoryLog) -> None:
        excess = log.count - self.max_messages
        while excess > 0:
            head = log.chunks[0]
            remaining = len(head.payloads) - log.skip
            if remaining <= excess:
                self.drop_head(log)
                self.stale += 1
                excess -= remaining
                continue
            self._cut(log, head, excess)
            excess = 0
        while log.size > self.max_bytes:
            head = log.chunks[0]
            if len(head.payloads) - log.skip == 1:
                self.drop_head(log)
                self.stale += 1
            else:
                self._cut(log, head, 1)

    def _cut(self, log: HistoryLog, head: HistoryChunk, count: int) -> None:
        """Drop the `count` oldest messages of the first chunk (fewer than it holds)."""
        skip = log.skip
        freed = MESSAGE_OVERHEAD * count + sum(map(len, head.payloads[skip : skip + count]))
        skip += count
        log.count -= count
        log.size -= freed
        head.sizes -= freed
        self.total -= freed
        self.trimmed += count
        if head.last > log.trimmed_time:
            log.trimmed_time = head.last
        if skip > 64 and 2 * skip > len(head.payloads):
            head.payloads = head.payloads[skip:]
            head.first += skip
            skip = 0
        log.skip = skip

    def drop_head(self, log: HistoryLog) -> None:
        """Forget the topic's oldest chunk (what is left of it)."""
        chunk = log.chunks.popleft()
        dropped = len(chunk.payloads) - log.skip
        log.skip = 0
        log.count -= dropped
        log.size -= chunk.sizes
        self.total -= chunk.sizes
        self.trimmed += dropped
        if chunk.last > log.trimmed_time:
            log.trimmed_time = chunk.last
        chunk.log = None
        if log.tail is chunk:
            log.tail = None
