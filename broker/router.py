"""Stamping, per-tick batching, encode-once fan-out (sans-I/O).

The router never touches a socket. The I/O shell gives it `request_flush`, a callable that
arranges for `flush()` to run once at the end of the current loop iteration (`loop.call_soon`).
The first piece of work in a tick calls it; everything else in the same tick joins the batch.
`flush()` encodes each dirty topic's batch once and queues that same piece on every connection
that receives the topic; the shell then writes each connection once, everything of the tick in
as few frames as possible (`Outbox.take`).

The router also keeps the budget of one loop iteration, in bytes: the client bytes handled,
their decoding, and the subscription-index work done (each step counted as TICK_WORK_BYTES):
trie nodes visited and topic lists changed, positions of `since` maps, and the fan-out a
publish starts (the subscription nodes of each topic it makes dirty). Past the budget, the
shell stops reading (and a session stops applying) until the next iteration, and a connection
whose frame cost more sits out, unread, for the time that work is worth (TICK_BUDGET_S per
budget), so no client can keep the iterations long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from .arrival import Arrival
from .backplane import Backplane, MemoryBackplane, Sequencer, unique_epoch
from .config import Config
from .dedupe import Dedupe, Seen
from .errors import ErrorCode, RequestError
from .fastpath import Index, Outbox, TopicState, emit_all, end_tick, fanout_steps, schedule_solo
from .messages import Ack, Err, encode
from .requests import Requests
from .topic_ids import TopicIds
from .topics import is_pattern, parts_of, validate_pattern, validate_topic

# The work one loop iteration does before reading pauses until the next one, in bytes of
# client frames; subscription-index steps (trie nodes visited, topic lists changed, nodes a
# publish fans out to) count TICK_WORK_BYTES each: 65,536 of them fill an iteration (a step
# costs 50 to 90 ns compiled, so about as much time as a MiB of frames).
TICK_INPUT_BYTES = 1 << 20
# Topics the retirement scan looks at per call (once a second): with N topics, each is seen
# every N / RETIRE_SCAN_BUDGET seconds.
RETIRE_SCAN_BUDGET = 1000
TICK_INDEX_WORK = 1 << 16
TICK_WORK_BYTES = TICK_INPUT_BYTES // TICK_INDEX_WORK
# A connection whose frame cost more than one iteration's budget sits out, unread, this long
# per budget it owes: about twice what that work takes compiled (3 to 5 ms), so a client that
# sends nothing but expensive frames gets at most about a third of the loop's time.
TICK_BUDGET_S = 0.01
# Index steps one topic of a recovery counts for: a position of a `since` map checked (its
# name, the pattern, the position), and a topic whose history is looked up and replayed, or
# reported as a gap. Measured at 40 to 100 steps' time for the two together, compiled.
RECOVERY_WORK = 48
# A MessagePack value decoded on the general path counts as this many bytes of input: decoding
# costs per value (10 to 40 ns with msgspec), not per byte, so a frame of many small values
# costs far more than the same bytes of payloads. 65,536 values fill an iteration.
TICK_VALUE_BYTES = 16
# A token's signature check (an `auth` message) counts as this many bytes of input: an ES256
# check takes 70 to 170 us, about what decoding an eighth of an iteration's bytes does, so at
# most eight tokens are checked per iteration whoever sends them.
TICK_TOKEN_CHECK_BYTES = TICK_INPUT_BYTES // 8

# What a frame adds around its pieces at most (headers of the frame, the message array, a
# `msg` message and a batch): pieces are cut so that a frame stays within its cap.
_FRAME_OVERHEAD = 64


class RouterSettings(Protocol):
    """The settings the router reads (broker.config.Config has them; docs/operations.md
    describes each)."""

    max_topics: int
    max_topic_length: int
    max_outbound_frame_bytes: int
    dedupe_window_s: float
    dedupe_max_ids: int
    max_open_requests: int
    dead_letters_max: int


class RouterStats:
    """Counters the router keeps; read by tests, logs and metrics."""

    __slots__ = (
        "published",
        "delivered",
        "batches",
        "slow_consumers",
        "errors",
        "closes",
        "replayed",
        "gaps",
        "gap_causes",
        "duplicates",
        "requests",
        "replies",
        "timeouts",
        "dead_letters",
        "retired",
        "sheds",
        "dropped",
        "conflated",
        "denied",
        "unknown_topics",
        "recoveries",
    )

    def __init__(self) -> None:
        self.published = 0  # messages accepted from publishers (counted when their batch is emitted)
        self.delivered = 0  # messages queued to subscribers (one per message per subscriber)
        self.batches = 0  # batch pieces encoded (one per topic per tick with subscribers)
        self.slow_consumers = 0  # connections closed as slow consumers (counted by the shell)
        self.errors: dict[int, int] = {}  # err replies sent, by ErrorCode
        self.closes: dict[int, int] = {}  # connections closed by the broker, by close code
        self.replayed = 0  # messages sent from history (recovery and last values)
        self.gaps = 0  # gap notices sent (those of recovery, ended epochs and the backplane)
        # of those, by cause (the slow-consumer policies' gaps are counted by the messages they
        # skip: dropped, conflated)
        self.gap_causes: dict[str, int] = {"history": 0, "ended": 0, "backplane": 0}
        self.duplicates = 0  # publishes dropped as repeats of a msg_id in the dedupe window
        self.requests = 0  # requests passed to a responder
        self.replies = 0  # replies passed back to a requester
        self.timeouts = 0  # requests that got no reply in time
        self.dead_letters = 0  # client messages that could not be processed (see Router.dead_letters)
        self.retired = 0  # topics forgotten after staying quiet
        self.denied = 0  # subscribes, publishes and requests refused for want of a grant
        self.sheds = 0  # times a connection's queue was shed by its drop or conflate policy
        self.dropped = 0  # messages dropped for connections behind (policy drop), each announced by a gap
        self.conflated = 0  # messages skipped for connections behind (policy conflate), each announced by a gap
        self.unknown_topics = 0  # batches from the backplane for topics this node could not take (past max_topics)
        # subscriptions with since or last, by outcome: complete (everything asked for was
        # replayed, or is as the connection drains), awaited (a cluster node waits for a
        # position it has not reached), or the cause of the first gap notice it got (history,
        # ended)
        self.recoveries: dict[str, int] = {}

    def count_error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_close(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1


class Router(Arrival):
    """Topics, publish and fan-out; cluster arrival comes from `Arrival` (broker.arrival),
    recovery and replay from `Recovery` (its base), requests and dedupe are held (`requests`,
    `dedupe`). `emit`, `emit_now`, `want_flush` and the tick's lists (`touched`, `slow`,
    `solo_nodes`, `emission`, `max_piece`) are the internal API its parts use."""

    def __init__(
        self,
        request_flush: Callable[[], object],
        config: RouterSettings | None = None,
        *,
        epoch: int | None = None,
        backplane: Backplane | None = None,
        clock: Callable[[], float] = time.monotonic,
        request_resume: Callable[[Outbox], object] | None = None,
    ) -> None:
        """`config`: the settings the router reads (the server's Config; the defaults without
        one). `request_flush` and `request_resume` are the shell's (see the module's doc)."""
        settings = Config() if config is None else config
        self._request_flush = request_flush
        self.init_arrival(request_resume)  # subscriptions waiting for the backplane (broker.arrival)
        self.max_topics = settings.max_topics
        self.max_topic_length = max_topic_length = settings.max_topic_length
        self.max_outbound_frame_bytes = settings.max_outbound_frame_bytes
        self.max_piece = max(1, settings.max_outbound_frame_bytes - _FRAME_OVERHEAD)
        # Epoch: unique per topic lifetime (see unique_epoch). Every topic created before the
        # first retirement shares the broker's; later ones get their own.
        self._fixed_epoch = epoch is not None
        self.epoch = unique_epoch() if epoch is None else epoch
        self._last_epoch = self.epoch
        self._retired_any = False
        self._scan = 0  # where the retirement scan goes on in index.states
        self._quiet: dict[int, tuple[int, int]] = {}  # topic id -> (seq, ms) when it was seen quiet
        self.use_backplane(MemoryBackplane() if backplane is None else backplane)
        self.dedupe = Dedupe(settings.dedupe_window_s, settings.dedupe_max_ids)  # msg_ids seen lately (broker.dedupe)
        self.clock = clock
        self.index = Index()
        self.topic_ids = TopicIds()  # small, unique, and in an order that tells a client little
        self.topics: dict[str, TopicState] = self.index.topics
        self.topics_by_key: dict[bytes, TopicState] = self.index.by_key
        self.stats = RouterStats()
        # requests waiting for replies, the responders, and the dead letters (broker.requests)
        self.requests = Requests(self.send, self.stats, clock, settings.max_open_requests, max_topic_length, settings.dead_letters_max)
        self.dirty: list[TopicState] = []
        self.touched: list[Outbox] = []
        self.slow: list[Outbox] = []
        self.solo_nodes: list = []  # nodes whose solo members got pieces in this tick
        self.init_recovery()  # replays and awaited positions (broker.recovery)
        self._flush_requested = False
        self.emission = 0
        self.input_bytes = 0  # client frame bytes handled in this loop iteration
        self._work_mark = 0  # index.work when this iteration began

    def use_backplane(self, backplane: Backplane) -> None:
        """Publish through `backplane` (before any topic is made). Its abilities are looked at
        here, once: `sequencer` is it when it sequences later (broker.backplane.Sequencer)."""
        self.backplane = backplane
        self.sequencer: Sequencer | None = backplane if isinstance(backplane, Sequencer) else None

    # the budget of one loop iteration

    def new_tick(self) -> None:
        """Start the budget of a new loop iteration."""
        self.input_bytes = 0
        self._work_mark = self.index.work

    def decoded(self, values: int) -> None:
        """Count the decoding of a client frame of `values` MessagePack values in this
        iteration's budget (its bytes are counted as they are read)."""
        self.input_bytes += values * TICK_VALUE_BYTES

    def token_checked(self) -> None:
        """Count a token's signature check in this iteration's budget."""
        self.input_bytes += TICK_TOKEN_CHECK_BYTES

    def spent(self) -> int:
        """This iteration's budget used so far, in bytes: client bytes, decoding, index work."""
        return self.input_bytes + (self.index.work - self._work_mark) * TICK_WORK_BYTES

    @property
    def busy(self) -> bool:
        """True once this iteration has used its budget (client bytes, decoding, index work)."""
        return self.input_bytes + (self.index.work - self._work_mark) * TICK_WORK_BYTES >= TICK_INPUT_BYTES

    def recovering(self, topics: int) -> None:
        """Count in the budget `topics` topics of a recovery (positions of a since map checked,
        topics whose history a recovery looks up): RECOVERY_WORK steps each."""
        self.index.work += topics * RECOVERY_WORK

    def fanned_out(self, start: int) -> None:
        """Count in the budget the fan-out of the topics that became dirty since `dirty` held
        `start` of them: one step per subscription node of each. What a publish costs at the
        end of the tick grows with the distinct subscriptions matching its topic (one client
        may hold many overlapping patterns), not only with its receivers."""
        self.index.work += fanout_steps(self.dirty, start)

    # publishing

    def topic(self, name: str) -> TopicState:
        """The state of a concrete topic, created (after validation) on first use."""
        state = self.topics.get(name)
        if state is None:
            if is_pattern(name):
                validate_pattern(name, self.max_topic_length)
                raise RequestError(ErrorCode.PATTERN_NOT_ALLOWED, f"cannot publish to pattern {name!r}; name a concrete topic")
            validate_topic(name, self.max_topic_length)
            if len(self.topics) >= self.max_topics:
                raise RequestError(ErrorCode.TOO_MANY_TOPICS, f"the broker holds {self.max_topics} topics, its limit")
            state = TopicState(self.topic_ids.next(), name, self._topic_epoch(name))
            self.index.add_topic(state)
        return state

    def _topic_epoch(self, name: str) -> int:
        epoch = self.backplane.topic_epoch(name)
        if epoch is not None:
            return epoch  # the backplane's, the same on every node
        if not self._retired_any:
            return self.epoch
        self._last_epoch = self._last_epoch + 1 if self._fixed_epoch else unique_epoch(self._last_epoch)
        return self._last_epoch

    # topics retire

    def retire_idle(self, idle_ms: int, budget: int = RETIRE_SCAN_BUDGET) -> int:
        """Look at up to `budget` topics (going round all of them over successive calls; the
        server's sweep calls it once a second, well under a millisecond each time) and
        forget those that had no live subscription and no publish for `idle_ms` and hold
        nothing pending and no retained history. The idle time runs from the first scan that
        saw the topic's last publish (history does not hold it back: a topic goes once both
        its history expired and it was idle for `idle_ms`, whichever comes later). A forgotten
        name comes back as a new topic, with a new id and a new epoch, its sequence from 1.
        Returns how many were forgotten."""
        states = self.index.states
        count = len(states)
        if not count:
            return 0
        now = self.backplane.now_ms()
        quiet = self._quiet
        retired = 0
        for _ in range(min(budget, count)):
            if self._scan >= count:
                self._scan = 0
            state = states[self._scan]
            self._scan += 1
            if state is None:
                continue
            if state.pending or any(not node.dead for node in state.nodes):
                quiet.pop(state.id, None)
                continue
            mark = quiet.get(state.id)
            if mark is None or mark[0] != state.seq:
                quiet[state.id] = (state.seq, now)
            elif now - mark[1] >= idle_ms and not self.backplane.retains(state, now):
                del quiet[state.id]
                self.backplane.forget(state)
                self.index.retire(state)
                self._retired_any = True
                self.stats.retired += 1
                retired += 1
        return retired

    def publish(self, name: str, payload: bytes, box: Outbox | None = None, request_id: int = 0, msg_id: str = "") -> TopicState:
        """Hand `payload` to the backplane, which gives it the topic's next sequence number.

        With a request id, `box` gets the ack (`["ack", id, epoch, seq]`) once the message is
        sequenced: at once with a backplane that sequences at once, otherwise when the batch
        comes back through `deliver`. A `msg_id` seen on the same topic within the dedupe
        window makes this a duplicate: acknowledged with the original's sequence number (once
        it has one), not published again. Returns the topic state."""
        state = self._publishing(name)
        backplane = self.backplane
        record = None
        if msg_id:
            record = self.dedupe.record(name, msg_id, backplane.now_ms())
            if record.seq:
                self.stats.duplicates += 1
                if request_id:
                    assert box is not None  # a publish with a request id names the outbox its ack goes to
                    self.send(box, encode(Ack(request_id, record.epoch, record.seq)))
                return state
            if record.waiting is not None:  # the original is not sequenced yet
                self.stats.duplicates += 1
                if request_id:
                    record.waiting.append((box, request_id))
                return state
            record.waiting = [(box, request_id)] if request_id else []
        dirty = len(self.dirty)
        if self.sequencer is None:
            backplane.publish(state, payload, self.dirty)
            if len(self.dirty) > dirty:
                self.fanned_out(dirty)
            if record is not None:
                record.epoch, record.seq, record.waiting = state.epoch, state.seq, None
            if request_id:
                assert box is not None
                self.send(box, encode(Ack(request_id, state.epoch, state.seq)))
            self.published_since_flush()
        else:
            if record is not None:
                backplane.publish(
                    state,
                    payload,
                    self.dirty,
                    lambda epoch, seq: self._sequenced(record, epoch, seq),
                    lambda code, text: self._refused(record, code, text),
                    msg_id,
                )
            elif request_id:
                assert box is not None
                backplane.publish(
                    state,
                    payload,
                    self.dirty,
                    lambda epoch, seq: self._ack_later(box, request_id, epoch, seq),
                    lambda code, text: self._fail_later(box, request_id, code, text),
                )
            else:
                backplane.publish(state, payload, self.dirty)
            self.published_since_flush()
        return state

    def _fail_later(self, box: Outbox, request_id: int, code: int, text: str) -> None:
        if not box.closed:
            self.stats.count_error(code)
            self.send(box, encode(Err(request_id, int(code), text)))

    def _refused(self, record: Seen, code: int, text: str) -> None:
        """The backplane could not publish a message with a msg_id: those waiting get the
        error, and a retry with the same msg_id publishes it anew."""
        waiting = record.waiting or ()
        record.waiting = None
        self.dedupe.forget(record)
        for box, request_id in waiting:
            self._fail_later(box, request_id, code, text)

    def publish_for(self, name: str, payload: bytes, done: Callable[[int, int], object], failed: Callable[[int, str], object]) -> None:
        """A publish that comes from no connection (the admin API): the same topic checks and
        sequence numbers as any other; `done(epoch, seq)` once it is sequenced (at once with
        the memory backplane), or `failed(code, text)` when the backplane could not take it.
        Raises RequestError for a topic the broker refuses."""
        state = self._publishing(name)
        backplane = self.backplane
        if self.sequencer is None:
            dirty = len(self.dirty)
            backplane.publish(state, payload, self.dirty)
            if len(self.dirty) > dirty:
                self.fanned_out(dirty)
            done(state.epoch, state.seq)
        else:
            backplane.publish(state, payload, self.dirty, done, failed)
        self.published_since_flush()

    def _publishing(self, name: str) -> TopicState:
        """The state of the topic a publish goes to, after the checks every publish passes: a
        topic the broker takes, and a backplane that takes publishes now."""
        state = self.topics.get(name)
        if state is None:
            state = self.topic(name)
        if not self.backplane.accepting:
            refused = self.backplane.refusal(state)
            if refused is not None:  # None: this topic's part of the backplane takes it
                raise RequestError(ErrorCode.UNAVAILABLE, refused)
        return state

    def _ack_later(self, box: Outbox, request_id: int, epoch: int, seq: int) -> None:
        if not box.closed:
            self.send(box, encode(Ack(request_id, epoch, seq)))

    def _sequenced(self, record: Seen, epoch: int, seq: int) -> None:
        waiting = record.waiting or ()
        record.epoch, record.seq, record.waiting = epoch, seq, None
        for box, request_id in waiting:
            self._ack_later(box, request_id, epoch, seq)

    def published_since_flush(self) -> None:
        """Called after messages were stamped: the first time in a tick, ask for a flush."""
        if self.dirty:
            self.want_flush()

    def want_flush(self) -> None:
        if not self._flush_requested:
            self._flush_requested = True
            self._request_flush()

    # subscriptions

    def subscribe(self, pattern: str, box: Outbox) -> bool:
        """Validate and add a subscription (a pattern, or one with exclusions: broker.topics);
        False when `box` already holds it."""
        validate_pattern(parts_of(pattern)[0], self.max_topic_length)
        # Messages published earlier in this tick go out without the new subscriber, so it
        # receives exactly the messages after the sequence number its ack reports.
        self._emit_matching(pattern)
        added = self.index.subscribe(pattern, box)
        if box.size:
            self.schedule_write(box)  # what it got as a solo member in this tick is its own now
        return added

    def unsubscribe(self, pattern: str, box: Outbox, remaining: str | None = None) -> bool:
        """Drop a subscription; messages published before it in this tick are still delivered.

        `remaining`: the connection's only subscription left, if exactly one is."""
        validate_pattern(parts_of(pattern)[0], self.max_topic_length)
        self._emit_matching(pattern)
        removed = self.index.unsubscribe(pattern, box)
        if box in self.awaits_of:
            self.forget_positions(box, pattern)
        if remaining is not None:
            self.index.settle(remaining, box)
        if box.size:
            self.schedule_write(box)
        return removed

    def _emit_matching(self, pattern: str) -> None:
        """Emit this tick's pending batches before a subscription change.

        An exact topic emits only its own batch; a pattern emits them all (one pass, after which
        nothing is pending), so a frame full of subscription changes costs O(1) each."""
        if not self.dirty:
            return
        if not is_pattern(pattern):
            state = self.topics.get(pattern)
            if state is not None and state.pending:
                self.emit([state])
            return
        dirty = self.dirty
        self.dirty = []
        self.emit(dirty)

    # outbound

    def send(self, box: Outbox, piece: bytes) -> None:
        """Queue one encoded message (a reply) on one connection; written with the rest of this tick."""
        if box.push(piece):
            self.slow.append(box)
        self.schedule_write(box)

    def schedule_write(self, box: Outbox) -> None:
        """Ask for `box` to be written at the end of this tick (after the transport resumed)."""
        if not box.scheduled:
            box.scheduled = True
            self.touched.append(box)
            self.want_flush()

    def flush(self) -> tuple[list[Outbox], list[Outbox]]:
        """Encode and fan out every dirty topic's batch.

        Returns (outboxes to write, each once; outboxes that passed their hard limit). The
        caller resets `scheduled` on each outbox it writes (`take`, or `keep` while its
        transport is paused), then calls `end_tick`."""
        self._flush_requested = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            self.emit(dirty)
        touched, slow = self.touched, self.slow
        if self.solo_nodes:
            schedule_solo(self.solo_nodes, touched)
        self.touched = []
        self.slow = []
        return touched, slow

    def end_tick(self) -> None:
        """After every outbox of the tick was written or kept: nodes forget this tick's pieces."""
        nodes = self.solo_nodes
        if nodes:
            self.solo_nodes = []
            end_tick(nodes)

    def emit(self, states: list[TopicState]) -> None:
        """Encode each topic's pending batch once and queue it on every connection that
        receives it; with a backplane that sequences later, hand the batches to it instead
        (they come back numbered through `deliver_remote`)."""
        sequencer = self.sequencer
        if sequencer is not None:
            self.stats.published += sequencer.stage(states)
            return
        self.emit_now(states)

    def emit_now(self, states: list[TopicState]) -> None:
        backplane = self.backplane
        store = backplane.store
        cut = self.pass_positions(states) if self.awaiting else None
        now_ms = backplane.now_ms() if store is not None else 0
        if self.replay_of:
            published, batches, delivered = self.emit_passing(states, store, now_ms)
        else:
            self.emission, published, batches, delivered = emit_all(
                states,
                self.emission,
                self.max_piece,
                self.touched,
                self.slow,
                self.solo_nodes,
                store,
                now_ms,
            )
        if cut:
            for box, state, first, payloads in cut:
                self.replay(box, state, [(first, payloads)])
                self.schedule_write(box)
        if store is not None:
            backplane.retained()
        stats = self.stats
        if self.sequencer is None:  # else counted when staged, on the node they were published on
            stats.published += published
        stats.batches += batches
        stats.delivered += delivered

    def remove_all(self, box: Outbox, patterns: Iterable[str]) -> None:
        """Drop every subscription of a closing connection."""
        for pattern in patterns:
            self.index.unsubscribe(pattern, box)
        if box in self.awaits_of:
            self.forget_positions(box, None)
        if box in self.replaying:
            self.end_replays(box)
        self.forget_waiting(box)
