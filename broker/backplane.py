"""The backplane seam: where a published message gets its sequence number and is kept.

The router hands every publish to its backplane and every emitted batch back to it; the
backplane decides when a message is sequenced and what history of each topic is retained,
and answers recovery questions ("what came after [epoch, seq]?"). Local and remote batches
reach subscribers the same way: stamped into a topic's pending batch, then emitted by the
router (`Router.deliver_remote` is the entry for batches sequenced elsewhere).

`Backplane` is the seam, a `Protocol` with the contract of each method. `MemoryBackplane` is
the embedded one: a message is sequenced the moment it is published (the compiled publish path
stamps it directly), and history lives in this process. A backplane that sequences later (one
shared through an external log, broker.cluster.streams) has one more ability, `Sequencer`: its
`publish` stamps with this process's count for now and returns None, the router hands the
tick's batches to its `stage` instead of emitting them, and acknowledges through
`on_sequenced` once the log numbered them; the numbered batches come back through
`Router.deliver_remote`. The router looks for that ability once, when it is made
(`Router.sequencer`).

History is kept per topic in chunks, one per topic per second at most (the batches of the
ticks within that second, the payload objects shared with the fan-out, not copied), bounded per
topic by messages and bytes by the compiled `HistoryStore` as the router emits each batch, and
in total by bytes and by age here; one time-ordered queue of every chunk makes the total and
age bounds cost O(1) per chunk.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any, Protocol, runtime_checkable

from .fastpath import HistoryLog, HistoryStore, TopicState, stamp


EPOCH_RANDOM_BITS = 20


def unique_epoch(after: int = 0) -> int:
    """A topic epoch: milliseconds since 1970 times 2^20 plus 20 random bits (so processes
    started in the same millisecond differ), and greater than `after`."""
    return max(after + 1, (int(time.time() * 1000) << EPOCH_RANDOM_BITS) | random.getrandbits(EPOCH_RANDOM_BITS))




class Backplane(Protocol):
    """What the router needs of a backplane: where a publish is sequenced, which topics this
    process gets, and the history recovery reads. Every method is called on the event loop's
    thread and returns at once (a backplane with I/O does it in its own tasks)."""

    accepting: bool  # False while some publishes are refused (then `refusal` says which, and why)
    store: Any  # the compiled HistoryStore the emit path retains through, or None (no history)
    total: int  # bytes counted over every topic's history
    trimmed: int  # messages dropped from history by any bound

    def now_ms(self) -> int:
        """The backplane's clock in milliseconds since 1970: history's ages and the dedupe
        window are measured on it."""
        ...

    def publish(self, state: TopicState, payload: bytes, dirty: list, on_sequenced: Any = None, on_failed: Any = None,
                msg_id: str = "") -> int | None:
        """Add `payload` to the topic's pending batch (listing the topic in `dirty`). Returns its
        sequence number, or None when it is sequenced later (`Sequencer`): then
        `on_sequenced(epoch, seq)` or `on_failed(code, text)` follows exactly once."""
        ...

    def reads(self, pattern: str) -> bool:
        """Whether this process has, and keeps getting, what a subscription to `pattern` needs.
        False: it starts getting it and calls `router.loaded()` once it has it."""
        ...

    def refusal(self, state: TopicState | None = None) -> str | None:
        """While `accepting` is False: why a publish to the topic is refused, or None when it is
        taken."""
        ...

    def topic_epoch(self, name: str) -> int | None:
        """The epoch every node gives a new topic of this name, or None: this process picks."""
        ...

    def retain(self, state: TopicState, first: int, payloads: list[bytes], now_ms: int | None = None) -> None:
        """Keep one batch of the topic (messages `first`...) in its history."""
        ...

    def retained(self) -> None:
        """Batches were retained through `store`: apply the bounds over all topics."""
        ...

    def sweep(self, now_ms: int | None = None) -> None:
        """A few times a second: forget history past its age."""
        ...

    def retains(self, state: TopicState, now_ms: int) -> bool:
        """True while history holds messages of the topic."""
        ...

    def forget(self, state: TopicState) -> None:
        """The topic retires: drop what history still counts for it."""
        ...

    def latest(self, state: TopicState) -> tuple[int, bytes] | None:
        """The newest retained message of the topic: (seq, payload), or None."""
        ...

    def since(self, state: TopicState, seq: int, max_bytes: int | None = None) -> tuple[int, list[tuple[int, list[bytes]]]]:
        """Retained messages after `seq` of the current epoch: (the first sequence number
        history holds, batches of (first seq, payloads)), at most about `max_bytes`."""
        ...

    def since_time(self, state: TopicState, time_ms: int) -> tuple[bool, int, list[tuple[int, list[bytes]]]]:
        """Retained messages published at or after `time_ms`: (whether some published then
        were dropped, the first sequence number held, the batches)."""
        ...


@runtime_checkable
class Sequencer(Protocol):
    """The optional ability of a backplane that sequences later, through a log shared with
    other processes: the router stages each tick's batches with it instead of emitting them;
    they come back numbered through `Router.deliver_remote`."""

    def stage(self, states: list[TopicState]) -> int:
        """Take the topics' pending batches for the log and give each topic back the sequence
        number it had. Returns the messages taken."""
        ...


class MemoryBackplane:
    """Sequencing in this process and history in its memory, within four bounds."""

    accepting = True  # publishes may take the compiled path (a backplane that cannot take them says False)

    def __init__(
        self,
        *,
        max_messages: int = 100,
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
        # The per-topic bounds are applied by the compiled store as batches are emitted; the
        # bounds by age and in total here, from its queue of every chunk, oldest first.
        self.store = HistoryStore(max_messages, max_bytes) if max_messages > 0 else None

    @property
    def total(self) -> int:
        """Bytes counted over every topic's history."""
        return self.store.total if self.store is not None else 0

    @property
    def trimmed(self) -> int:
        """Messages dropped from history by any bound."""
        return self.store.trimmed if self.store is not None else 0

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # sequencing

    def publish(self, state: TopicState, payload: bytes, dirty: list, on_sequenced=None, on_failed=None, msg_id: str = "") -> int | None:
        """Sequence `payload` and add it to the topic's pending batch (`dirty` lists the topics
        with pending messages). Returns its sequence number; a backplane that sequences later
        returns None and calls `on_sequenced(epoch, seq)` when it has one (or
        `on_failed(code, text)`). The router recognises a `msg_id` it saw (its dedupe window);
        a backplane shared by several processes may recognise one another process saw, and
        then give the first one's numbers without publishing it again."""
        stamp(state, payload, dirty)
        if on_sequenced is not None:
            on_sequenced(state.epoch, state.seq)
        return state.seq

    def reads(self, pattern: str) -> bool:
        """Whether this process has, and keeps getting, what a subscription to `pattern` needs
        (always, here). A backplane that reads only what its subscriptions need says False for
        a pattern it does not cover yet, starts getting it, and calls `router.loaded()` when it
        has it (or raises RequestError when it cannot)."""
        return True

    def refusal(self, state: TopicState | None = None) -> str | None:
        """While `accepting` is False (never, here): why a publish to the topic is refused,
        or None when the part of the backplane that takes this topic takes it."""
        return "the backplane does not take publishes now"

    def topic_epoch(self, name: str) -> int | None:
        """The epoch every node gives a new topic of this name, or None: this process picks."""
        return None

    # history

    def retain(self, state: TopicState, first: int, payloads: list[bytes], now_ms: int | None = None) -> None:
        """Keep one batch of the topic. The router's emit path retains through the store
        itself (`emit_all(..., history=store)`), then calls `retained()`."""
        if self.store is not None:
            self.store.retain(state, first, payloads, self.now_ms() if now_ms is None else now_ms)
            self.retained()

    def retained(self) -> None:
        """After batches were retained: apply the total bound and tidy the queue of chunks."""
        store = self.store
        if store is None:
            return
        order = store.order
        while order and order[0].log is None:  # chunks their topics dropped: mostly the oldest
            order.popleft()
            store.stale -= 1
        if store.total > self.max_total_bytes:
            self._trim_order(lambda chunk: store.total > self.max_total_bytes)
        self._compact_order()

    def sweep(self, now_ms: int | None = None) -> None:
        """Forget what passed the age bound (called periodically; reads check age as well).
        A chunk goes when its newest message is older than max_age_s: a message may outlive
        the bound by up to BUCKET_MS."""
        if self.store is None:
            return
        now = self.now_ms() if now_ms is None else now_ms
        horizon = now - self.max_age_ms
        self._trim_order(lambda chunk: chunk.last < horizon)
        self._compact_order()

    def _trim_order(self, should_drop) -> None:
        store = self.store
        order = store.order
        while order:
            chunk = order[0]
            log = chunk.log
            if log is None:
                order.popleft()  # trimmed earlier by its topic's own bounds
                store.stale -= 1
                continue
            if not should_drop(chunk):
                break
            order.popleft()
            store.drop_head(log)

    def _compact_order(self) -> None:
        """Drop the entries of chunks trimmed by their topic's bounds once they are most of
        the queue (so the queue stays proportional to what is retained)."""
        store = self.store
        if store.stale > 1024 and store.stale * 2 > len(store.order):
            store.order = deque(chunk for chunk in store.order if chunk.log is not None)
            store.stale = 0

    def _expire(self, log: HistoryLog, now: int) -> None:
        horizon = now - self.max_age_ms
        while log.chunks and log.chunks[0].last < horizon:
            self.store.drop_head(log)
            self.store.stale += 1

    def retains(self, state: TopicState, now_ms: int) -> bool:
        """True while history holds messages of the topic (expired ones are dropped first)."""
        log = state.history
        if log is None or self.store is None:
            return False
        self._expire(log, now_ms)
        return bool(log.chunks)

    def forget(self, state: TopicState) -> None:
        """The topic retires: drop what history still counts for it."""
        log = state.history
        if log is not None and self.store is not None:
            while log.chunks:
                self.store.drop_head(log)
                self.store.stale += 1
        state.history = None

    # recovery

    def latest(self, state: TopicState) -> tuple[int, bytes] | None:
        """The newest retained message of the topic: (seq, payload)."""
        log = self._log(state)
        if log is None:
            return None
        chunk = log.chunks[-1]
        return chunk.first + len(chunk.payloads) - 1, chunk.payloads[-1]

    def since(self, state: TopicState, seq: int, max_bytes: int | None = None) -> tuple[int, list[tuple[int, list[bytes]]]]:
        """Retained messages after `seq` (of the current epoch): (the first sequence number
        history still holds, or the next one when it holds nothing; the messages as one batch
        (first seq, payloads), or none). With `max_bytes`, only the oldest of them whose
        payloads pass that many bytes by at most one message."""
        log = self._log(state)
        if log is None:
            return state.seq + 1, []
        return log.first_seq(), self._collect(log, lambda chunk: chunk.first + len(chunk.payloads) - 1 > seq, seq + 1, max_bytes)

    def since_time(self, state: TopicState, time_ms: int) -> tuple[bool, int, list[tuple[int, list[bytes]]]]:
        """Retained messages published at or after `time_ms`: (whether history dropped some
        published then, the first sequence number it holds, the messages as one batch)."""
        log = self._log(state)
        if log is None:
            gone = state.history
            return gone is not None and gone.trimmed_time >= time_ms, state.seq + 1, []
        return log.trimmed_time >= time_ms, log.first_seq(), self._collect(log, lambda chunk: chunk.last >= time_ms, 0)

    def _log(self, state: TopicState) -> HistoryLog | None:
        """The topic's log with expired chunks dropped, or None when it retains nothing."""
        log = state.history
        if log is None or self.store is None:
            return None
        self._expire(log, self.now_ms())
        return log if log.chunks else None

    @staticmethod
    def _collect(log: HistoryLog, wanted, from_seq: int, max_bytes: int | None = None) -> list[tuple[int, list[bytes]]]:
        """The retained messages from the first chunk `wanted` accepts on, from `from_seq`
        on, as batches of consecutive sequence numbers (one, unless numbers were skipped);
        with `max_bytes`, up to the first message that takes their payloads past it."""
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
            if max_bytes is not None:
                for end in range(start, len(chunk.payloads)):
                    max_bytes -= len(chunk.payloads[end])
                    if max_bytes < 0:
                        payloads.extend(chunk.payloads[start : end + 1])
                        batches.append((first, payloads))
                        return batches
            payloads.extend(chunk.payloads[start:] if start else chunk.payloads)
            following = chunk.first + len(chunk.payloads)
        if payloads:
            batches.append((first, payloads))
        return batches
