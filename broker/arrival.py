"""Cluster arrival: batches a backplane numbered elsewhere, and what a subscription waits
for from it (sans-I/O).

A backplane that sequences in another process (one with the `Sequencer` ability,
broker.cluster.streams) hands the router every numbered batch, this node's and every other
node's, in its log's order (`deliver_remote`): each is stamped into its topic's pending batch
with its numbers (the compiled `arrive` for a batch that follows its topic's last number) and
emitted at once, so local and remote messages reach subscribers by one path. Numbers skipped
are a gap (cause `backplane`); a new epoch ends the old one for every receiver (cause
`ended`, `end_epochs`). A subscription that needs what this node does not read yet waits for
the backplane to load it (`interest`, `loaded`).

`Arrival` is a part of broker.router.Router (its base class, over broker.recovery.Recovery):
it works on the router's topics, index and emit path, and keeps its own state, made by
`init_arrival`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ErrorCode, RequestError
from .fastpath import Outbox, TopicState, arrive
from .messages import Gap
from .recovery import Recovery

if TYPE_CHECKING:
    from .topic_ids import TopicIds


class Arrival(Recovery):
    """Batches numbered by the backplane, epochs it ends, subscriptions waiting for it.

    `init_arrival` is the internal API of the router's class family (broker.router calls it).
    """

    # What it uses of the router beyond Recovery's (broker.router.Router sets these up).
    dirty: list[TopicState]  # topics with a pending batch in this tick
    topic_ids: TopicIds

    if TYPE_CHECKING:  # the router's methods it calls

        def topic(self, name: str) -> TopicState: ...

        def emit(self, states: list[TopicState]) -> None: ...

        def emit_now(self, states: list[TopicState]) -> None: ...

        def want_flush(self) -> None: ...

    def init_arrival(self, request_resume: Callable[[Outbox], object] | None) -> None:
        # the I/O shell carries on with a connection whose subscription waited for the backplane
        self._request_resume = request_resume or (lambda box: None)
        self._parked: list[Outbox] = []
        self._unserved: dict[Outbox, str] = {}  # parked connections whose subscription the backplane could not serve

    def forget_waiting(self, box: Outbox) -> None:
        """A closing connection: its subscription no longer waits for the backplane."""
        self._unserved.pop(box, None)

    def deliver_remote(self, entries: list[tuple[int, list[tuple[str, list[bytes]]], list[int]]]) -> int:
        """Entries of a backplane's log, in its order, each (epoch, [(topic, payloads), ...],
        [first seq of each batch, ...]): the batches of messages it numbered (published on
        this node or another), delivered and retained at once, one encoded piece per topic,
        written with the rest of this tick.

        What this node published in this tick and has not handed over yet goes to the
        backplane first, so a pending batch never mixes numbered and unnumbered messages. A
        batch at or before a topic's last sequence number is a repeat and skipped (the part
        after it is kept). Numbers a batch skips after ones this node delivered are announced
        to the topic's receivers as a gap (cause `backplane`); a new epoch ends the old one with
        a gap (cause `ended`) and the topic continues under a new id. Returns the messages
        taken."""
        if self.dirty:
            dirty = self.dirty
            self.dirty = []
            self.emit(dirty)
        arrived: list[TopicState] = []
        try:
            return self._stamp_entries(entries, arrived)
        finally:  # what was stamped goes out even if an entry broke the loop
            if arrived:
                self.emit_now(arrived)
                self.want_flush()

    def _stamp_entries(self, entries: list, arrived: list[TopicState]) -> int:
        # the compiled `arrive` stamps each batch that follows its topic's last number; the
        # others (a new topic or epoch, a repeat, numbers skipped) come to `_stamp_out_of_line`
        return arrive(
            entries,
            self.topics,
            arrived,
            lambda name, epoch, payloads, first: self._stamp_out_of_line(name, epoch, payloads, first, arrived),
        )

    def _stamp_out_of_line(self, name: str, epoch: int, payloads: list[bytes], first: int, arrived: list[TopicState]) -> int:
        """A batch that does not simply follow its topic's last number: the topic is made (or
        renewed in a new epoch), a repeat is skipped (the part after the last number kept),
        numbers skipped after ones delivered are a gap. Returns the messages taken."""
        state = self.topics.get(name)
        if state is None or state.epoch != epoch:
            state = self._arrival_state(name, epoch)
            if state is None:
                return 0
        count = len(payloads)
        seq = state.seq
        if first != seq + 1:
            if first + count - 1 <= seq:
                return 0  # delivered already
            if first <= seq:
                payloads = payloads[seq + 1 - first :]
                first = seq + 1
                count = len(payloads)
            else:
                if state.pending:
                    self.emit_now([state])
                if seq:
                    self._gap_all(
                        state,
                        Gap(
                            name,
                            epoch,
                            seq + 1,
                            first - 1,
                            "this node did not get these messages from the cluster backplane (they were trimmed from its stream, or lost by it)",
                            "backplane",
                        ),
                    )
        if state.dirty:
            state.pending.extend(payloads)
        else:
            state.dirty = True
            state.first = first
            state.pending = payloads
            arrived.append(state)
        state.seq = first + count - 1
        return count

    def interest(self, pattern: str, box: Outbox) -> bool:
        """Whether a subscription to `pattern` may be made now: the backplane has what it needs
        (its topics' numbers and history). If not, the backplane starts getting it and the
        connection waits: `request_resume(box)` once it has it. Raises RequestError (for the
        subscription that waited) when the backplane could not get it."""
        refused = self._unserved.pop(box, None)
        if refused is not None:
            raise RequestError(ErrorCode.UNAVAILABLE, refused)
        if self.backplane.reads(pattern):
            return True
        if box not in self._parked:
            self._parked.append(box)
        return False

    def subscribed(self) -> tuple[bool, list[str]]:
        """What the subscriptions of this process cover: (whether any is a pattern, the
        concrete topics subscribed to)."""
        index = self.index
        return bool(index.patterns or index.excluding), [name for name, node in index.exact.items() if not node.dead]

    def loaded(self, refused: str | None = None) -> None:
        """The backplane got what subscriptions waited for, or, with `refused`, gave up: they
        go on, or are refused with that text (err 18)."""
        parked, self._parked = self._parked, []
        for box in parked:
            if not box.closed:
                if refused is not None:
                    self._unserved[box] = refused
                self._request_resume(box)

    def _arrival_state(self, name: str, epoch: int) -> TopicState | None:
        """The state a batch from the backplane goes to: made for a topic new to this node
        (None past max_topics), or renewed for a new epoch."""
        state = self.topics.get(name)
        if state is None:
            try:
                return self.topic(name)
            except RequestError:
                self.stats.unknown_topics += 1  # past max_topics (or a name this node refuses)
                return None
        if state.pending:
            self.emit_now([state])
        return self._new_epoch(state, epoch)

    def end_epochs(self, states: list[TopicState], epoch: int) -> None:
        """The backplane numbers these topics in `epoch` from now on (it lost messages of their
        epoch, or went back in time): their epochs end now for every receiver, with a gap
        (cause `ended`) from the receiver's next number, and positions awaited in them are
        answered the same way; each topic continues under a new id, its numbers from 1."""
        if self.dirty:  # what this node published in this tick goes to the backplane first
            dirty = self.dirty
            self.dirty = []
            self.emit(dirty)
        for state in states:
            if state.epoch == epoch:
                continue
            if state.pending:
                self.emit_now([state])
            self._new_epoch(state, epoch)
            waiting = self.awaiting.pop(state.name, None)
            if waiting:
                still = [entry for entry in waiting if entry[1] == epoch]
                for box, position_epoch, seq in waiting:
                    if position_epoch != epoch:
                        if not box.closed:
                            self.send_gap(
                                box,
                                Gap(
                                    state.name,
                                    position_epoch,
                                    seq + 1,
                                    0,
                                    f"epoch {position_epoch} of the topic ended; it continues in epoch {epoch}",
                                    "ended",
                                ),
                            )
                        self.release_position(box)
                if still:
                    self.awaiting[state.name] = still
        self.want_flush()

    def _new_epoch(self, state: TopicState, epoch: int) -> TopicState:
        """The backplane numbers a topic in a new epoch (it lost its counters): the old epoch
        ends for every receiver (from the first number, if this node delivered none of it:
        messages it had not read yet may have been acknowledged); a new state with a new id
        carries the topic on."""
        self._gap_all(
            state,
            Gap(
                state.name,
                state.epoch,
                state.seq + 1,
                0,
                f"epoch {state.epoch} of the topic ended (the cluster backplane lost its sequence numbers or went back in time); it continues in epoch {epoch}",
                "ended",
            ),
        )
        self.backplane.forget(state)
        self.stats.retired += 1  # connections drop what they cached about the old state
        return self.index.renew(state, epoch, self.topic_ids.next())

    def _gap_all(self, state: TopicState, gap: Gap) -> None:
        """A gap notice to every connection receiving the topic now."""
        for box in self.index.receivers(state.name):
            if not box.closed:
                self.send_gap(box, gap)
