"""The backplane seam: where a published message gets its sequence number and is kept.

The router hands every publish to its backplane and every emitted batch back to it; the
backplane decides when a message is sequenced and what history of each topic is retained,
and answers recovery questions ("what came after [epoch, seq]?"). Local and remote batches
reach subscribers the same way: stamped into a topic's pending batch, then emitted by the
router once per tick (`Router.deliver` is the entry for batches sequenced elsewhere).

`MemoryBackplane` is the embedded one: a message is sequenced the moment it is published (the
compiled publish path stamps it directly, which is why `sequences_at_once` is True), and
history lives in this process. A backplane that sequences later (one shared through an
external log) sets `sequences_at_once` to False: its `publish` returns None, the router then
acknowledges the publish when the batch comes back through `Router.deliver`.

History is kept per topic in chunks, one per topic per second at most (the batches of the
ticks within that second, the payload objects shared with the fan-out, not copied), bounded per
topic by messages and bytes, in total by bytes and by age; one time-ordered queue of every
chunk makes the total and age bounds cost O(1) per chunk.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from .fastpath import TopicState, stamp

# Bytes counted per retained message on top of its payload (the bytes object and its slot).
MESSAGE_OVERHEAD = 48
# Bytes counted per retained chunk (its record and its place in the queues).
CHUNK_OVERHEAD = 120
# A topic's batches retained within this many milliseconds share one chunk.
BUCKET_MS = 1000


class Gap(NamedTuple):
    """Messages `first` ... `last` of `topic` in `epoch` that a client will not get.
    `last` 0: up to the end of that epoch (not known here)."""

    topic: str
    epoch: int
    first: int
    last: int
    reason: str


class Replay(NamedTuple):
    """What recovery found for one topic: batches (first seq, payloads) of the current epoch,
    oldest first, and the gaps before them."""

    state: TopicState
    batches: list[tuple[int, list[bytes]]]
    gaps: list[Gap]


class _Chunk:
    """Consecutive messages of one topic retained within one time bucket (BUCKET_MS from its
    first); `log` is None once it is no longer retained."""

    __slots__ = ("first", "payloads", "sizes", "time", "last", "log")

    def __init__(self, first: int, payloads: list[bytes], sizes: int, time_ms: int, log: "_Log") -> None:
        self.first = first
        self.payloads = payloads  # its own list (the emitted batch's, extended by later ones)
        self.sizes = sizes  # bytes counted for what is still retained of it
        self.time = time_ms  # when its first message was retained
        self.last = time_ms  # when its newest message was
        self.log: _Log | None = log


class _Log:
    """One topic's retained messages: chunks of consecutive sequence numbers, the first one
    possibly cut (`skip` messages of it are gone)."""

    __slots__ = ("chunks", "skip", "count", "size", "trimmed_time")

    def __init__(self) -> None:
        self.chunks: deque[_Chunk] = deque()
        self.skip = 0
        self.count = 0
        self.size = 0  # bytes counted (payloads and overheads)
        self.trimmed_time = -1  # when the newest message trimmed so far was retained (ms); -1: none

    def first_seq(self) -> int:
        """The sequence number of the oldest retained message (0 when none is)."""
        if not self.chunks:
            return 0
        return self.chunks[0].first + self.skip


class MemoryBackplane:
    """Sequencing in this process and history in its memory, within four bounds."""

    sequences_at_once = True

    def __init__(
        self,
        *,
        max_messages: int = 1000,
        max_bytes: int = 1 << 20,
        max_age_s: float = 300.0,
        max_total_bytes: int = 256 << 20,
        clock=time.time,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.max_total_bytes = max_total_bytes
        self.clock = clock
        self.logs: dict[int, _Log] = {}  # by topic id
        self.total = 0  # bytes counted over every log
        self._order: deque[_Chunk] = deque()  # every retained chunk, oldest first
        self._stale = 0  # chunks of _order already trimmed by their own topic's bounds
        self.trimmed = 0  # messages dropped from history by any bound

    @property
    def enabled(self) -> bool:
        return self.max_messages > 0

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # sequencing

    def publish(self, state: TopicState, payload: bytes, dirty: list, on_sequenced=None) -> int | None:
        """Sequence `payload` and add it to the topic's pending batch (`dirty` lists the topics
        with pending messages). Returns its sequence number; a backplane that sequences later
        returns None, calls `on_sequenced(epoch, seq)` when it has one and hands the batch
        to `Router.deliver`."""
        stamp(state, payload, dirty)
        if on_sequenced is not None:
            on_sequenced(state.epoch, state.seq)
        return state.seq

    # history

    def retain(self, emitted: list, now_ms: int | None = None) -> None:
        """Keep the batches the router just emitted: (state, first seq, payloads) each. A
        batch joins its topic's newest chunk while that is younger than BUCKET_MS, so a topic
        costs one chunk per second however many ticks it is published in."""
        if not self.enabled:
            return
        now = self.now_ms() if now_ms is None else now_ms
        logs = self.logs
        max_messages, max_bytes = self.max_messages, self.max_bytes
        for state, first, payloads in emitted:
            log = logs.get(state.id)
            if log is None:
                log = logs[state.id] = _Log()
            n = len(payloads)
            size = MESSAGE_OVERHEAD * n + sum(map(len, payloads))
            chunks = log.chunks
            tail = chunks[-1] if chunks else None
            if tail is not None and now - tail.time < BUCKET_MS and tail.first + len(tail.payloads) == first:
                tail.payloads += payloads
                tail.sizes += size
                tail.last = now
            else:
                size += CHUNK_OVERHEAD
                chunk = _Chunk(first, payloads, size, now, log)
                chunks.append(chunk)
                self._order.append(chunk)
            log.count += n
            log.size += size
            self.total += size
            if log.count > max_messages or log.size > max_bytes:
                self._trim_log(log)
        if self.total > self.max_total_bytes:
            self._trim_order(lambda chunk: self.total > self.max_total_bytes)
        self._compact_order()

    def sweep(self, now_ms: int | None = None) -> None:
        """Forget what passed the age bound (called periodically; reads check age as well).
        A chunk goes when its newest message is older than max_age_s: a message may outlive
        the bound by up to BUCKET_MS."""
        now = self.now_ms() if now_ms is None else now_ms
        horizon = now - self.max_age_ms
        self._trim_order(lambda chunk: chunk.last < horizon)
        self._compact_order()

    def _trim_order(self, should_drop) -> None:
        order = self._order
        while order:
            chunk = order[0]
            log = chunk.log
            if log is None:
                order.popleft()  # trimmed earlier by its topic's own bounds
                self._stale -= 1
                continue
            if not should_drop(chunk):
                break
            order.popleft()
            self._drop_head(log)

    def _trim_log(self, log: _Log) -> None:
        """Drop the oldest messages until the topic is within its message and byte bounds:
        whole chunks, or the part of the first one that the message bound asks for, in one
        step; one by one only while the byte bound still asks for more."""
        chunks = log.chunks
        excess = log.count - self.max_messages
        while excess > 0:
            head = chunks[0]
            remaining = len(head.payloads) - log.skip
            if remaining <= excess:
                self._drop_head(log)
                self._stale += 1
                excess -= remaining
                continue
            self._cut(log, head, excess)
            excess = 0
        while log.size > self.max_bytes:
            head = chunks[0]
            if len(head.payloads) - log.skip == 1:
                self._drop_head(log)
                self._stale += 1
            else:
                self._cut(log, head, 1)

    def _cut(self, log: _Log, head: _Chunk, count: int) -> None:
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
            # the dropped part of a long-lived chunk would otherwise stay referenced
            head.payloads = head.payloads[skip:]
            head.first += skip
            skip = 0
        log.skip = skip

    def _drop_head(self, log: _Log) -> None:
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

    def _compact_order(self) -> None:
        """Drop the entries of chunks trimmed by their topic's bounds once they are most of
        the queue (so the queue stays proportional to what is retained)."""
        if self._stale > 1024 and self._stale * 2 > len(self._order):
            self._order = deque(chunk for chunk in self._order if chunk.log is not None)
            self._stale = 0

    def _expire(self, log: _Log, now: int) -> None:
        horizon = now - self.max_age_ms
        while log.chunks and log.chunks[0].last < horizon:
            self._drop_head(log)
            self._stale += 1

    # recovery

    def latest(self, state: TopicState) -> tuple[int, bytes] | None:
        """The newest retained message of the topic: (seq, payload)."""
        log = self._log(state)
        if log is None:
            return None
        chunk = log.chunks[-1]
        return chunk.first + len(chunk.payloads) - 1, chunk.payloads[-1]

    def since(self, state: TopicState, seq: int) -> tuple[int, list[tuple[int, list[bytes]]]]:
        """Retained messages after `seq` (of the current epoch): (the first sequence number
        history still holds, or the next one when it holds nothing; the messages as one batch
        (first seq, payloads), or none)."""
        log = self._log(state)
        if log is None:
            return state.seq + 1, []
        return log.first_seq(), self._collect(log, lambda chunk: chunk.first + len(chunk.payloads) - 1 > seq, seq + 1)

    def since_time(self, state: TopicState, time_ms: int) -> tuple[bool, int, list[tuple[int, list[bytes]]]]:
        """Retained messages published at or after `time_ms`: (whether history dropped some
        published then, the first sequence number it holds, the messages as one batch)."""
        log = self._log(state)
        if log is None:
            gone = self.logs.get(state.id)
            return gone is not None and gone.trimmed_time >= time_ms, state.seq + 1, []
        return log.trimmed_time >= time_ms, log.first_seq(), self._collect(log, lambda chunk: chunk.last >= time_ms, 0)

    def _log(self, state: TopicState) -> _Log | None:
        """The topic's log with expired chunks dropped, or None when it retains nothing."""
        log = self.logs.get(state.id)
        if log is None:
            return None
        self._expire(log, self.now_ms())
        return log if log.chunks else None

    @staticmethod
    def _collect(log: _Log, wanted, from_seq: int) -> list[tuple[int, list[bytes]]]:
        """The retained messages from the first chunk `wanted` accepts on, from `from_seq`
        on, as batches of consecutive sequence numbers (one, unless numbers were skipped)."""
        batches: list[tuple[int, list[bytes]]] = []
        payloads: list[bytes] = []
        first = following = 0
        for i, chunk in enumerate(log.chunks):
            if not batches and not payloads and not wanted(chunk):
                continue
            start = max(log.skip if i == 0 else 0, from_seq - chunk.first)
            if start >= len(chunk.payloads):
                continue
            if payloads and chunk.first + start != following:
                batches.append((first, payloads))
                payloads = []
            if not payloads:
                first = chunk.first + start
            payloads.extend(chunk.payloads[start:] if start else chunk.payloads)
            following = chunk.first + len(chunk.payloads)
        if payloads:
            batches.append((first, payloads))
        return batches
