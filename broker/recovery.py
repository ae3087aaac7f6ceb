"""Recovery and replay: what a new subscription asks for from history (sans-I/O).

A subscription with `since` (a position) or `last` gets, after its ack and before anything
live, the messages history holds after that position (or each matching topic's latest), with
a gap notice for every range that cannot be replayed. A replay stops before its connection's
queue passes max_pending_bytes and continues from history as the connection drains
(`continue_replays`); meanwhile the topic's live batches pass the connection by and history
gives them to it in order. With a backplane that sequences later (a cluster), a position
beyond what this node delivered is awaited: the topic's next batch settles it.

`Recovery` is a part of broker.router.Router (the base of broker.arrival.Arrival, the
router's base): it works on the router's index, history (the backplane) and outboxes, and
keeps its own state, made by `init_recovery`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .fastpath import Index, Outbox, TopicState, emit_all, encode_batch
from .messages import Gap, GapNotice, encode
from .topics import is_pattern, key_matches

if TYPE_CHECKING:
    from .backplane import Backplane, Sequencer
    from .router import RouterStats

# Positions (since) beyond what a cluster node delivered that it keeps waiting for their topic's
# next batches: at most this many in all (past it, the oldest topic's are given up) and per
# connection (past it, its further positions are not waited for). A position given up is
# treated as this node's own: the connection may get again messages it had.
MAX_AWAITED = 100_000
MAX_AWAITED_PER_CONNECTION = 10_000


class _Resume:
    """A replay waiting for room on its connection: of topic `state`, from sequence number
    `next` on."""

    __slots__ = ("state", "next")

    def __init__(self, state: TopicState, next_seq: int) -> None:
        self.state = state
        self.next = next_seq


class Recovery:
    """Replays waiting for room, awaited positions, and the recovery of a new subscription.

    Some of its public names (`init_recovery`, `pass_positions`, `emit_passing`, `replay`,
    `send_gap`, `awaiting`, ...) are the internal API of the router's class family, used by
    broker.arrival and broker.router, not by the shell."""

    # What it uses of the router (broker.router.Router sets these up; annotations only).
    index: Index
    stats: RouterStats
    backplane: Backplane
    sequencer: Sequencer | None
    topics: dict[str, TopicState]
    touched: list[Outbox]  # outboxes to write at the end of the tick
    slow: list[Outbox]  # outboxes past their hard limit in this tick
    solo_nodes: list  # nodes whose solo members got pieces in this tick
    emission: int  # the number of the last emission (emit_all's)
    max_piece: int  # the largest piece a frame holds

    if TYPE_CHECKING:  # the router's methods it calls

        def send(self, box: Outbox, piece: bytes) -> None: ...

        def schedule_write(self, box: Outbox) -> None: ...

        def recovering(self, topics: int) -> None: ...

    def init_recovery(self) -> None:
        # With a backplane that sequences later: positions asked for beyond what this node
        # delivered, per topic (connection, epoch, seq), settled by the topic's next batch.
        self.awaiting: dict[str, list[tuple[Outbox, int, int]]] = {}
        self._awaited = 0
        self.awaits_of: dict[Outbox, int] = {}  # positions awaited per connection
        self._recovery: list[str] | None = None  # while a recovery runs: the causes of its gaps
        # Replays that did not fit in their connection's queue, oldest first: they continue
        # from history as it drains (continue_replays). Meanwhile the topic's live batches
        # pass the connection by (by topic id), and history gives them to it in order.
        self.replaying: dict[Outbox, deque[_Resume]] = {}
        self.replay_of: dict[int, list[Outbox]] = {}
        self._solo_before: dict[Outbox, str] = {}  # the node a replaying connection was a solo member of

    def _await_position(self, name: str, box: Outbox, epoch: int, seq: int) -> None:
        """Hold a position this node has not reached: the topic's batches up to it pass the
        connection by, the first one past it is cut for it (see pass_positions)."""
        held = self.awaits_of.get(box, 0)
        if held >= MAX_AWAITED_PER_CONNECTION:
            return
        awaiting = self.awaiting
        if self._awaited >= MAX_AWAITED:  # the oldest topic's positions are given up
            for other, _, _ in awaiting.pop(next(iter(awaiting))):
                self.release_position(other)
            held = self.awaits_of.get(box, 0)
        if not held:
            self._make_plain(box)
        self.awaits_of[box] = held + 1
        if self._recovery is not None and not self._recovery:
            self._recovery.append("awaited")
        awaiting.setdefault(name, []).append((box, epoch, seq))
        self._awaited += 1

    def _make_plain(self, box: Outbox) -> str | None:
        """Make `box` a plain member of its nodes for as long as it holds one extra count in
        nsubs (the caller takes it back), so that an emission can pass it by (`mark`).
        Returns the pattern of the node it was a solo member of (None: none)."""
        node = box.solo_node
        if node is None:
            box.nsubs += 1
            return None
        self.index.unsubscribe(node.pattern, box)  # what the node gave it this tick becomes its own
        box.nsubs += 1
        self.index.subscribe(node.pattern, box)
        return node.pattern

    def forget_positions(self, box: Outbox, pattern: str | None) -> None:
        """Drop the positions `box` awaits on topics of `pattern` (None: on every topic)."""
        awaiting = self.awaiting
        for name in [name for name in awaiting if pattern is None or key_matches(pattern, name)]:
            waiting = awaiting[name]
            still = [entry for entry in waiting if entry[0] is not box]
            for _ in range(len(waiting) - len(still)):
                self.release_position(box)
            if still:
                awaiting[name] = still
            else:
                del awaiting[name]

    def release_position(self, box: Outbox) -> None:
        self._awaited -= 1
        held = self.awaits_of[box] - 1
        if held:
            self.awaits_of[box] = held
        else:
            del self.awaits_of[box]
            box.nsubs -= 1  # it stays a plain member until its subscriptions change

    def pass_positions(self, states: list[TopicState]) -> list:
        """Before `states` are emitted: settle the positions awaited on them. A connection
        whose position the batch does not reach is passed by (its `mark` is set to the
        batch's emission number) and keeps waiting; one whose position falls inside the batch
        is passed by and gets the part after it (returned, to queue after the emission); one
        whose position the batch follows gets it as everyone does, with a gap notice for the
        numbers in between if any, or `ended` if the topic is in another epoch now."""
        awaiting = self.awaiting
        emission = self.emission
        cut = []
        for state in states:
            count = len(state.pending)
            if not count:
                continue
            emission += 1  # the number emit_all gives this batch
            waiting = awaiting.get(state.name)
            if waiting is None:
                continue
            name = state.name
            epoch = state.epoch
            first = state.first
            last = first + count - 1
            still = []
            for entry in waiting:
                box, position_epoch, seq = entry
                if box.closed or not any(box in node.members for node in state.nodes if not node.dead):
                    pass  # gone, or no longer subscribed to the topic
                elif position_epoch != epoch:
                    self.send_gap(
                        box,
                        Gap(
                            name,
                            position_epoch,
                            seq + 1,
                            0,
                            f"epoch {position_epoch} of the topic ended; it continues in epoch {epoch}",
                            "ended",
                        ),
                    )
                elif first > seq + 1:
                    self.send_gap(box, Gap(name, epoch, seq + 1, first - 1, "this node's history does not hold these messages", "history"))
                elif first <= seq:
                    box.mark = emission  # it has these
                    if last <= seq:
                        still.append(entry)
                        continue
                    cut.append((box, state, seq + 1, state.pending[seq + 1 - first :]))
                self.release_position(box)
            if still:
                awaiting[name] = still
            else:
                del awaiting[name]
        return cut

    # recovery

    def recover(self, pattern: str, box: Outbox, since: tuple | None, last: bool, within: list[str] | None = None) -> None:
        """Queue on `box` what a new subscription asked for from history, after its ack and
        before anything live: the messages after `since`, or the latest message of each
        matching topic (`last`), with a gap notice for every range that cannot be replayed.

        `since` is (epoch, seq) for a topic, (time_ms, {topic: (epoch, seq)}) for a pattern.
        `within`: the patterns the subscription holds when the connection's grants narrowed
        it; only their topics are recovered (a listed topic outside them is passed over).
        A replay stops before the connection's queue passes max_pending_bytes and continues
        as it drains (`continue_replays`)."""
        if since is None and not last:
            return
        self._recovery = []
        try:
            self._recover(pattern, box, since, last, within)
        finally:
            causes, self._recovery = self._recovery, None
            outcome = causes[0] if causes else "complete"
            recoveries = self.stats.recoveries
            recoveries[outcome] = recoveries.get(outcome, 0) + 1

    def _recover(self, pattern: str, box: Outbox, since: tuple | None, last: bool, within: list[str] | None) -> None:
        backplane = self.backplane
        if not is_pattern(pattern):
            state = self.topics.get(pattern)
            if since is not None:
                self._recover_topic(box, pattern, state, since[0], since[1])
            elif state is not None:
                self._send_latest(box, state)
            self.schedule_write(box)
            return
        if within is None:
            states = self.index.matching(pattern)
        else:
            found = {state.id: state for held in within for state in self.index.matching(held)}
            states = list(found.values())
        self.recovering(len(states))
        listed: dict = since[1] if since is not None else {}
        if within is not None and listed:
            listed = {name: position for name, position in listed.items() if any(key_matches(held, name) for held in within)}
        for state in states:
            position = listed.get(state.name)
            if position is not None:
                self._recover_topic(box, state.name, state, position[0], position[1])
            elif since is not None:
                trimmed, first, batches = backplane.since_time(state, since[0])
                if trimmed:
                    self.send_gap(
                        box,
                        Gap(
                            state.name,
                            state.epoch,
                            1,
                            first - 1,
                            "history no longer holds the messages before this one published since your subscription time (it may also have held older ones)",
                            "history",
                        ),
                    )
                self.replay(box, state, batches)
            elif last:
                self._send_latest(box, state)
        if listed:
            known = {state.name for state in states}
            unknown = [(name, position) for name, position in listed.items() if name not in known]
            self.recovering(len(unknown))
            for name, (epoch, seq) in unknown:
                self._recover_topic(box, name, None, epoch, seq)
        self.schedule_write(box)

    def _recover_topic(self, box: Outbox, name: str, state: TopicState | None, epoch: int, seq: int) -> None:
        cluster = self.sequencer is not None
        if state is None or (cluster and epoch == state.epoch and seq > state.seq):
            if not epoch:
                return
            if cluster and epoch == self.backplane.topic_epoch(name):
                # A cluster node that has not delivered the topic up to the position (it started
                # later, or it lags behind the node the client came from): the first batch it
                # delivers tells whether messages after the position are missing.
                self._await_position(name, box, epoch, seq)
            elif state is None:
                self.send_gap(
                    box, Gap(name, epoch, seq + 1, 0, "the topic has no messages in this broker any more: its epoch ended", "ended")
                )
            else:
                self.send_gap(
                    box, Gap(name, epoch, seq + 1, 0, f"epoch {epoch} of the topic ended; it continues in epoch {state.epoch}", "ended")
                )
            return
        if epoch and epoch != state.epoch:
            self.send_gap(
                box, Gap(name, epoch, seq + 1, 0, f"epoch {epoch} of the topic ended; it continues in epoch {state.epoch}", "ended")
            )
            seq = 0
        elif not epoch:
            seq = 0
        first, batches = self.backplane.since(state, seq)
        if seq + 1 < first:
            self.send_gap(box, Gap(name, state.epoch, seq + 1, first - 1, "history no longer holds these messages", "history"))
        self.replay(box, state, batches)

    def _send_latest(self, box: Outbox, state: TopicState) -> None:
        latest = self.backplane.latest(state)
        if latest is not None:
            self.replay(box, state, [(latest[0], [latest[1]])])

    def replay(self, box: Outbox, state: TopicState, batches: list) -> None:
        """Queue batches of one topic from history on `box`, oldest first, in pieces of at
        most max_outbound_frame_bytes, while the connection's queue stays within
        max_pending_bytes; the rest waits for room (behind any replay waiting already)."""
        if not batches:
            return
        if box.introduce(state):
            self.slow.append(box)
            return
        if box in self.replaying:
            self._wait(box, state, batches[0][0])
            return
        rest = self._push_within(box, state, batches, False)
        if rest:
            self._wait(box, state, rest)

    def _push_within(self, box: Outbox, state: TopicState, batches: list, progress: bool) -> int:
        """Queue what fits of `batches` within max_pending_bytes (with `progress`, at least one
        message); returns the sequence number of the first message left (0: none left)."""
        limit = box.limit
        max_piece = self.max_piece
        replayed = 0
        rest = 0
        for first, payloads in batches:
            start = size = 0
            for i, payload in enumerate(payloads):
                n = len(payload) + 5
                if box.pending + size + n > limit and not (progress and not replayed and i == start):
                    replayed += self._push_replay(box, state, first + start, payloads[start:i])
                    rest = first + i
                    break
                if i > start and size + n > max_piece:
                    replayed += self._push_replay(box, state, first + start, payloads[start:i])
                    start, size = i, 0
                size += n
            if rest:
                break
            replayed += self._push_replay(box, state, first + start, payloads[start:])
        self.stats.replayed += replayed
        return rest

    def _push_replay(self, box: Outbox, state: TopicState, first: int, payloads: list) -> int:
        if payloads and box.push(encode_batch(state.id, first, payloads)):
            self.slow.append(box)
        return len(payloads)

    def _wait(self, box: Outbox, state: TopicState, next_seq: int) -> None:
        """Let the replay of `state` from `next_seq` wait for room on `box`; the topic's live
        batches pass the connection by until it caught up."""
        waiting = self.replaying.get(box)
        if waiting is None:
            waiting = self.replaying[box] = deque()
            pattern = self._make_plain(box)
            if pattern is not None:
                self._solo_before[box] = pattern
        waiting.append(_Resume(state, next_seq))
        self.replay_of.setdefault(state.id, []).append(box)

    def emit_passing(self, states: list[TopicState], store, now_ms: int) -> tuple[int, int, int]:
        """emit_all, passing by the connections whose replay of a topic waits (history gives
        them its batches, in order, after what they wait for): such a topic is emitted on its
        own, right after its connections were marked as reached by that emission (a mark
        holds for one emission). Returns (messages emitted, batches, deliveries)."""
        replay_of = self.replay_of
        totals = [0, 0, 0]
        run: list[TopicState] = []

        def emit(group: list[TopicState]) -> None:
            self.emission, published, batches, delivered = emit_all(
                group,
                self.emission,
                self.max_piece,
                self.touched,
                self.slow,
                self.solo_nodes,
                store,
                now_ms,
            )
            totals[0] += published
            totals[1] += batches
            totals[2] += delivered

        for state in states:
            boxes = replay_of.get(state.id)
            if boxes is None or not state.pending:
                run.append(state)
                continue
            if run:
                emit(run)
                run = []
            for box in boxes:
                box.mark = self.emission + 1  # the number emit_all gives this batch
            emit([state])
        if run:
            emit(run)
        return totals[0], totals[1], totals[2]

    def continue_replays(self) -> None:
        """Continue the waiting replays of the connections whose transport takes data (it did
        not pause writing) and whose backlog is below max_pending_bytes, each up to
        max_pending_bytes (at least a message), from what history holds now: a range it no
        longer holds is a gap (cause `history`), an epoch that ended meanwhile ends the replay
        with a gap (`ended`). A replay that reached the topic's last emitted message is done:
        its live batches reach the connection again. The shell calls this once per loop
        iteration that wrote, and from its sweep."""
        for box in list(self.replaying):
            if box.closed:
                self.end_replays(box)
            elif not box.paused and box.pending < box.limit:
                self._continue(box)
                self.schedule_write(box)

    def _continue(self, box: Outbox) -> None:
        waiting = self.replaying[box]
        progress = True
        while waiting:
            resume = waiting[0]
            state = resume.state
            if self.topics.get(state.name) is not state:
                self.send_gap(
                    box,
                    Gap(
                        state.name, state.epoch, resume.next, 0, f"epoch {state.epoch} of the topic ended while its replay waited", "ended"
                    ),
                )
            else:
                first, batches = self.backplane.since(state, resume.next - 1, box.limit)  # what one turn may send, at most
                if first > resume.next:
                    self.send_gap(
                        box,
                        Gap(
                            state.name,
                            state.epoch,
                            resume.next,
                            first - 1,
                            "history no longer holds these messages (they left it while the replay waited for room)",
                            "history",
                        ),
                    )
                    resume.next = first
                if batches:
                    if box.introduce(state):
                        self.slow.append(box)
                        return
                    rest = self._push_within(box, state, batches, progress)
                    progress = False
                    if rest:
                        resume.next = rest
                        return
                    resume.next = batches[-1][0] + len(batches[-1][1])
                    continue  # history may hold more than one turn reads
            self._replayed(box, waiting)

    def _replayed(self, box: Outbox, waiting: deque) -> None:
        """The oldest waiting replay of `box` is done."""
        state = waiting.popleft().state
        boxes = self.replay_of[state.id]
        boxes.remove(box)
        if not boxes:
            del self.replay_of[state.id]
        if not waiting:
            del self.replaying[box]
            box.nsubs -= 1
            pattern = self._solo_before.pop(box, None)
            if pattern is not None and not box.closed:
                self.index.settle(pattern, box)  # a solo member again, if that is still its only subscription

    def end_replays(self, box: Outbox) -> None:
        """`box` closed: its waiting replays are dropped."""
        waiting = self.replaying[box]
        while waiting:
            self._replayed(box, waiting)

    def send_gap(self, box: Outbox, gap: Gap) -> None:
        stats = self.stats
        stats.gaps += 1
        stats.gap_causes[gap.cause] = stats.gap_causes.get(gap.cause, 0) + 1
        if self._recovery is not None:
            self._recovery.append(gap.cause)
        self.send(box, encode(GapNotice(*gap)))
