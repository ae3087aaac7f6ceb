"""History: what a backplane keeps of each topic, within four bounds, and what recovery
reads of it (sans-I/O).

History is kept per topic in chunks, one per topic per second at most (the batches of the
ticks within that second, the payload objects shared with the fan-out, not copied), bounded per
topic by messages and bytes by the compiled `HistoryStore` as the router emits each batch, and
in total by bytes and by age here; one time-ordered queue of every chunk makes the total and
age bounds cost O(1) per chunk. Every backplane holds one (broker.backplane.MemoryBackplane,
broker.cluster.streams.RedisBackplane, which fills it from the streams) and answers the
router's history questions from it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .fastpath import HistoryLog, HistoryStore, TopicState


class History:
    """Per-topic history within bounds of messages and bytes per topic, bytes in all, and age;
    `now_ms` is the holder's clock (ages are measured on it)."""

    def __init__(
        self,
        now_ms: Callable[[], int],
        *,
        max_messages: int = 100,
        max_bytes: int = 1 << 20,
        max_age_s: float = 300.0,
        max_total_bytes: int = 256 << 20,
    ) -> None:
        self.now_ms = now_ms
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.max_total_bytes = max_total_bytes
        # The per-topic bounds are applied by the compiled store as batches are emitted; the
        # bounds by age and in total here, from its queue of every chunk, oldest first.
        self.store: HistoryStore | None = HistoryStore(max_messages, max_bytes) if max_messages > 0 else None

    @property
    def total(self) -> int:
        """Bytes counted over every topic's history."""
        return self.store.total if self.store is not None else 0

    @property
    def trimmed(self) -> int:
        """Messages dropped from history by any bound."""
        return self.store.trimmed if self.store is not None else 0

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
            self._trim_order(store, lambda chunk: store.total > self.max_total_bytes)
        self._compact_order(store)

    def sweep(self, now_ms: int | None = None) -> None:
        """Forget what passed the age bound (called periodically; reads check age as well).
        A chunk goes when its newest message is older than max_age_s: a message may outlive
        the bound by up to BUCKET_MS."""
        store = self.store
        if store is None:
            return
        now = self.now_ms() if now_ms is None else now_ms
        horizon = now - self.max_age_ms
        self._trim_order(store, lambda chunk: chunk.last < horizon)
        self._compact_order(store)

    @staticmethod
    def _trim_order(store: HistoryStore, should_drop: Callable[[Any], bool]) -> None:
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

    @staticmethod
    def _compact_order(store: HistoryStore) -> None:
        """Drop the entries of chunks trimmed by their topic's bounds once they are most of
        the queue (so the queue stays proportional to what is retained)."""
        if store.stale > 1024 and store.stale * 2 > len(store.order):
            store.order = deque(chunk for chunk in store.order if chunk.log is not None)
            store.stale = 0

    def _expire(self, store: HistoryStore, log: HistoryLog, now: int) -> None:
        horizon = now - self.max_age_ms
        while log.chunks and log.chunks[0].last < horizon:
            store.drop_head(log)
            store.stale += 1

    def retains(self, state: TopicState, now_ms: int) -> bool:
        """True while history holds messages of the topic (expired ones are dropped first)."""
        log = state.history
        store = self.store
        if log is None or store is None:
            return False
        self._expire(store, log, now_ms)
        return bool(log.chunks)

    def forget(self, state: TopicState) -> None:
        """The topic retires: drop what history still counts for it."""
        log = state.history
        store = self.store
        if log is not None and store is not None:
            while log.chunks:
                store.drop_head(log)
                store.stale += 1
        state.history = None

    # what recovery reads

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
        store = self.store
        if log is None or store is None:
            return None
        self._expire(store, log, self.now_ms())
        return log if log.chunks else None

    @staticmethod
    def _collect(
        log: HistoryLog, wanted: Callable[[Any], bool], from_seq: int, max_bytes: int | None = None
    ) -> list[tuple[int, list[bytes]]]:
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
