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

Every backplane holds its history (broker.history.History) and answers the history part of
the seam from it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .fastpath import TopicState, stamp
from .history import History

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

    @property
    def total(self) -> int:
        """Bytes counted over every topic's history."""
        ...

    @property
    def trimmed(self) -> int:
        """Messages dropped from history by any bound."""
        ...

    def now_ms(self) -> int:
        """The backplane's clock in milliseconds since 1970: history's ages and the dedupe
        window are measured on it."""
        ...

    def publish(
        self, state: TopicState, payload: bytes, dirty: list, on_sequenced: Any = None, on_failed: Any = None, msg_id: str = ""
    ) -> int | None:
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
    """Sequencing in this process; history in its memory, within four bounds (a held
    broker.history.History)."""

    accepting = True  # publishes may take the compiled path (a backplane that cannot take them says False)

    def __init__(
        self,
        *,
        max_messages: int = 100,
        max_bytes: int = 1 << 20,
        max_age_s: float = 300.0,
        max_total_bytes: int = 256 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.history = History(
            self.now_ms, max_messages=max_messages, max_bytes=max_bytes, max_age_s=max_age_s, max_total_bytes=max_total_bytes
        )
        self.store = self.history.store  # the emit path retains through it (None: no history)

    @property
    def total(self) -> int:
        """Bytes counted over every topic's history."""
        return self.history.total

    @property
    def trimmed(self) -> int:
        """Messages dropped from history by any bound."""
        return self.history.trimmed

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

    # history (broker.history)

    def retain(self, state: TopicState, first: int, payloads: list[bytes], now_ms: int | None = None) -> None:
        self.history.retain(state, first, payloads, now_ms)

    def retained(self) -> None:
        self.history.retained()

    def sweep(self, now_ms: int | None = None) -> None:
        self.history.sweep(now_ms)

    def retains(self, state: TopicState, now_ms: int) -> bool:
        return self.history.retains(state, now_ms)

    def forget(self, state: TopicState) -> None:
        self.history.forget(state)

    def latest(self, state: TopicState) -> tuple[int, bytes] | None:
        return self.history.latest(state)

    def since(self, state: TopicState, seq: int, max_bytes: int | None = None) -> tuple[int, list[tuple[int, list[bytes]]]]:
        return self.history.since(state, seq, max_bytes)

    def since_time(self, state: TopicState, time_ms: int) -> tuple[bool, int, list[tuple[int, list[bytes]]]]:
        return self.history.since_time(state, time_ms)
