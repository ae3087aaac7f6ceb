"""Slow-consumer policies: what the broker does with a connection whose backlog passed
max_pending_bytes.

- `disconnect` (the default): nothing is dropped; a connection that stays behind is closed
  (1013) and recovers from history when it comes back.
- `drop`: the oldest queued batches are dropped, and the connection is told exactly which
  messages of which topic it lost (a `gap` with cause `dropped`).
- `conflate`: only the newest message of each topic waits; a `gap` with cause `conflated`
  covers the ones skipped and comes right before the newest, which always arrives.

Each subscription may choose its own; a topic that several subscriptions of one connection
match gets the most careful of their policies (disconnect before drop before conflate).

Shedding works on the pieces a connection has queued in the broker and not yet written (what
its transport holds is out of reach). A pass takes every batch of a conflating topic out of
the queue into that topic's one held message (`Held`): what a conflating connection keeps is
bounded by its number of topics, not by bytes, and a held message is the delivered piece
itself (shared with the other subscribers) when it is alone in its batch. Held messages are
written after the queue, each after its gap. Then it drops the oldest batches of dropping
topics until the queue is at half max_pending_bytes, so a connection that stays behind is shed
about once per half-bound of new data: each piece is looked at a bounded number of times. So
that what it cannot take stays within reach, such a connection is handed at most half its
bound at a time (`Shed.take`) and its transport pauses as soon as it holds anything: what the
socket did not take waits in the broker. Shedding is the slow path; nothing of it runs for a
connection that keeps up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice

import msgspec

from .fastpath import assemble, encode_batch, is_batch
from .messages import GapNotice, encode

DISCONNECT, DROP, CONFLATE = 0, 1, 2
NAMES = ("disconnect", "drop", "conflate")
BY_NAME = {name: value for value, name in enumerate(NAMES)}

DROPPED_REASON = "dropped: the connection stayed more than max_pending_bytes behind (policy drop)"
CONFLATED_REASON = "conflated: while the connection was behind only the newest message was kept (policy conflate)"

# What a held message is counted for besides its piece (its record, its gap notice to come).
HELD_OVERHEAD = 96


def _uint(piece: bytes, pos: int) -> tuple[int, int]:
    """A MessagePack unsigned integer at `pos`: (value, position after it)."""
    head = piece[pos]
    if head < 0x80:
        return head, pos + 1
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[head]
    return int.from_bytes(piece[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def batch_head(piece: bytes) -> tuple[int, int, int]:
    """(topic_id, first seq, number of payloads) of a delivery batch piece."""
    head = piece[0]
    if head < 0xDC:
        length, pos = head & 0x0F, 1
    elif head == 0xDC:
        length, pos = int.from_bytes(piece[1:3], "big"), 3
    else:
        length, pos = int.from_bytes(piece[1:5], "big"), 5
    topic_id, pos = _uint(piece, pos)
    first, pos = _uint(piece, pos)
    return topic_id, first, length - 2


def _last_payload(piece: bytes) -> bytes:
    """The last payload of a batch piece."""
    return msgspec.msgpack.decode(piece)[-1]


# What a batch piece holds besides its payloads at most (array header, topic id, first seq),
# and each payload besides its bytes (its bin header): a split part is counted with these.
_BATCH_HEAD = 23
_PAYLOAD_HEAD = 5


def split_batch(piece: bytes, room: int) -> tuple[bytes, bytes] | None:
    """A batch piece cut in two at a message boundary, the first part within `room` bytes and
    at least one message: (first part, the rest), or None when it holds one message only."""
    topic_id, first, *payloads = msgspec.msgpack.decode(piece)
    if len(payloads) < 2:
        return None
    used = _BATCH_HEAD
    count = 0
    for payload in payloads[:-1]:
        used += len(payload) + _PAYLOAD_HEAD
        if count and used > room:
            break
        count += 1
    return encode_batch(topic_id, first, payloads[:count]), encode_batch(topic_id, first + count, payloads[count:])


def _prefix(pieces: list, budget: int) -> tuple[list, list, int]:
    """The oldest of `pieces` within `budget` bytes (at least one message; a batch that does
    not fit is cut at a message): (taken, the rest, bytes taken)."""
    taken: list[bytes] = []
    used = 0
    for i, piece in enumerate(pieces):
        room = budget - used
        if len(piece) <= room:
            taken.append(piece)
            used += len(piece)
            continue
        parts = split_batch(piece, room) if is_batch(piece) else None
        if parts is not None and (not taken or len(parts[0]) <= room):
            taken.append(parts[0])
            return taken, [parts[1], *pieces[i + 1 :]], used + len(parts[0])
        if not taken:  # one message (or reply) larger than the budget goes alone
            return [piece], pieces[i + 1 :], len(piece)
        return taken, pieces[i:], used
    return taken, [], used


class Held:
    """A conflating topic's newest message waiting out of the queue (`piece`, a batch of one,
    sequence number `seq`), and the messages skipped before it, `first` ... `seq` - 1 (`first`
    0: none)."""

    __slots__ = ("piece", "seq", "first")

    def __init__(self, piece: bytes, seq: int, first: int) -> None:
        self.piece = piece
        self.seq = seq
        self.first = first


class _Loss:
    """What one dropping topic loses in one shedding pass."""

    __slots__ = ("first", "last", "at", "messages")

    def __init__(self, first: int, last: int, at: int, messages: int) -> None:
        self.first = first
        self.last = last
        self.at = at  # index of the first removed piece: the notice goes there
        self.messages = messages

    def add(self, first: int, last: int, at: int, messages: int) -> None:
        self.first = min(self.first, first)
        self.last = max(self.last, last)
        self.at = min(self.at, at)
        self.messages += messages


class Shed:
    """One connection's shedding state: the `dropped` gap notices it queued that are still
    queued (found again by identity, so a later pass merges their range instead of adding
    another notice for the same topic), and the messages of conflating topics it holds out of
    the queue, oldest topic first.

    `policy_of(topic_id)` is the connection's policy of a topic; `states` the router's topic
    states by id (None: retired); `stats` (RouterStats, or None) counts the passes that shed
    and the messages they dropped and conflated."""

    __slots__ = ("policy_of", "states", "stats", "notices", "held", "order", "held_bytes", "_recheck")

    def __init__(self, policy_of: Callable[[int], int], states: list, stats=None) -> None:
        self.policy_of = policy_of
        self.states = states
        self.stats = stats
        self.notices: dict[int, tuple] = {}  # id(piece) -> (piece, topic_id, epoch, first, last)
        self.held: dict[int, Held] = {}  # topic id -> its newest message
        self.order: deque[int] = deque()  # the topics of `held`, in the order they were first held
        self.held_bytes = 0  # what the held messages are counted for
        self._recheck = False

    def policies_changed(self) -> None:
        """The connection's subscriptions changed: a held topic may not conflate any more."""
        self._recheck = True

    def shed(self, box, target: int | None) -> tuple[int, int]:
        """Take the batches of conflating topics out of `box`'s queue into the held messages,
        then drop the oldest batches of dropping topics until the queue is within `target`
        bytes (None: drop nothing). The caller moved its node's pieces of this iteration into
        its own (`keep`). Returns (messages dropped, messages conflated)."""
        policy_of = self.policy_of
        notices = self.notices
        queue: list[bytes] = []
        # per queued piece: (topic_id, first, last, notice entry or None) when it may be dropped
        kinds: list = []
        size = box.size
        conflated = 0
        for piece in box.pieces:
            if is_batch(piece):
                topic_id, first, n = batch_head(piece)
                policy = policy_of(topic_id)
                if policy == CONFLATE:
                    conflated += self._hold(topic_id, first, first + n - 1, piece)
                    size -= len(piece)
                    continue
                kinds.append((topic_id, first, first + n - 1, None) if policy == DROP else None)
            else:
                entry = notices.get(id(piece))
                kinds.append((entry[1], entry[3], entry[4], entry) if entry is not None and entry[0] is piece else None)
            queue.append(piece)
        if self._recheck:
            self._recheck = False
            size += self._release(queue, kinds, lambda topic_id: policy_of(topic_id) != CONFLATE)
        dropped = 0
        losses: dict[int, _Loss] = {}
        removed = [False] * len(queue)
        if target is not None and size > target:
            for i, kind in enumerate(kinds):
                if kind is None:
                    continue
                topic_id, first, last, entry = kind
                removed[i] = True
                size -= len(queue[i])
                messages = 0 if entry is not None else last - first + 1  # a notice's were counted when it was made
                loss = losses.get(topic_id)
                if loss is None:
                    losses[topic_id] = _Loss(first, last, i, messages)
                else:
                    loss.add(first, last, i, messages)
                if size <= target:
                    break
        if not losses:
            self.notices = {id(queue[i]): kind[3] for i, kind in enumerate(kinds) if kind is not None and kind[3] is not None}
            box.replace(queue)
            return self._count(0, conflated)
        at: dict[int, list[int]] = {}
        for topic_id, loss in losses.items():
            at.setdefault(loss.at, []).append(topic_id)
            dropped += loss.messages
        kept: list[bytes] = []
        fresh: dict[int, tuple] = {}
        for i, piece in enumerate(queue):
            for topic_id in at.get(i, ()):
                loss = losses[topic_id]
                state = self.states[topic_id] if topic_id < len(self.states) else None
                if state is None:
                    continue  # retired: no subscription of this connection matches it any more
                entry = notices.get(id(queue[loss.at]))
                epoch = entry[2] if entry is not None and entry[0] is queue[loss.at] else state.epoch
                notice = encode(GapNotice(state.name, epoch, loss.first, loss.last, DROPPED_REASON, "dropped"))
                fresh[id(notice)] = (notice, topic_id, epoch, loss.first, loss.last)
                kept.append(notice)
            if not removed[i]:
                kind = kinds[i]
                if kind is not None and kind[3] is not None:
                    fresh[id(piece)] = kind[3]
                kept.append(piece)
        self.notices = fresh
        box.replace(kept)
        return self._count(dropped, conflated)

    def _count(self, dropped: int, conflated: int) -> tuple[int, int]:
        stats = self.stats
        if stats is not None and (dropped or conflated):
            stats.sheds += 1
            stats.dropped += dropped
            stats.conflated += conflated
        return dropped, conflated

    def _hold(self, topic_id: int, first: int, last: int, piece: bytes) -> int:
        """A batch of a conflating topic: its newest message replaces the held one; returns how
        many messages that skipped."""
        newest = piece if first == last else encode_batch(topic_id, last, [_last_payload(piece)])
        held = self.held.get(topic_id)
        if held is None:
            self.held[topic_id] = Held(newest, last, first if last > first else 0)
            self.order.append(topic_id)
            self.held_bytes += len(newest) + HELD_OVERHEAD
            return last - first
        if not held.first:
            held.first = held.seq
        self.held_bytes += len(newest) - len(held.piece)
        held.piece = newest
        held.seq = last
        return last - first + 1

    def _release(self, queue: list, kinds: list, which: Callable[[int], bool]) -> int:
        """Put the held messages of the topics `which` picks back into the queue, each with its
        gap, before the topic's first queued piece or at the end (for a topic retired, drop
        them); returns the bytes added."""
        added = 0
        before: dict[int, list[bytes]] = {}
        at_end: list[bytes] = []
        released = [topic_id for topic_id in self.held if which(topic_id)]
        if not released:
            return 0
        first_at: dict[int, int] = {}  # topic id -> where its first queued batch is
        for i, piece in enumerate(queue):
            if is_batch(piece):
                first_at.setdefault(batch_head(piece)[0], i)
        for topic_id in released:
            held = self.held.pop(topic_id)
            self.held_bytes -= len(held.piece) + HELD_OVERHEAD
            pieces = self._written(topic_id, held)
            if not pieces:
                continue
            added += sum(map(len, pieces))
            index = first_at.get(topic_id)
            if index is None:
                at_end.extend(pieces)
            else:
                before.setdefault(index, []).extend(pieces)
        if before:
            merged: list[bytes] = []
            merged_kinds: list = []
            for i, piece in enumerate(queue):
                for extra in before.get(i, ()):
                    merged.append(extra)
                    merged_kinds.append(None)
                merged.append(piece)
                merged_kinds.append(kinds[i])
            queue[:] = merged
            kinds[:] = merged_kinds
        queue.extend(at_end)
        kinds.extend([None] * len(at_end))
        return added

    def _written(self, topic_id: int, held: Held) -> list[bytes]:
        """A held message as it is written: its gap (if it skipped any), then itself; nothing
        for a topic retired since."""
        state = self.states[topic_id] if topic_id < len(self.states) else None
        if state is None:
            return []
        if not held.first:
            return [held.piece]
        notice = encode(GapNotice(state.name, state.epoch, held.first, held.seq - 1, CONFLATED_REASON, "conflated"))
        return [notice, held.piece]

    def release(self, box) -> None:
        """Queue every held message on `box`, each after its gap (the connection is closed
        with what it was sent)."""
        queue = list(box.pieces)
        self._release(queue, [None] * len(queue), lambda topic_id: True)
        self.order.clear()
        box.replace(queue)

    def take(self, box, budget: int, max_frame: int, shared: dict, sizes: dict) -> bytes:
        """What to write now, as frames (b"" when nothing waits): all that is queued when it
        is at most `budget` bytes and nothing is held (assembled once for the connections that
        get the same, as `Outbox.take` does); else the oldest pieces within `budget`, the
        queue first, then held messages, each after its gap. What is not taken stays where
        shedding reaches it. `sizes` (one dict per loop iteration) keeps the bytes of each
        subscription node's pieces of the iteration, added up once."""
        if not self.held:
            queued = box.size
            node = box.solo_node
            if node is not None:
                key = (id(node), box.offset)
                extra = sizes.get(key)
                if extra is None:
                    extra = sizes[key] = sum(map(len, islice(node.pieces, box.offset, None)))
                queued += extra
            if queued <= budget:
                return box.take(max_frame, shared)
        box.keep()  # the node's pieces of this iteration become its own, to split
        if self.held:
            self.shed(box, None)  # later batches of held topics join them: written after the queue
        taken, rest, used = _prefix(box.pieces, budget)
        box.replace(rest)
        if not rest and self.held:
            self._take_held(taken, budget - used)
        return assemble(taken, max_frame) if taken else b""

    def _take_held(self, taken: list, room: int) -> None:
        """Add held messages (each after its gap) to `taken`, oldest topic first, within
        `room` bytes (at least one when nothing else is taken)."""
        held, order = self.held, self.order
        while order:
            topic_id = order[0]
            entry = held.get(topic_id)
            if entry is None:
                order.popleft()  # released already
                continue
            pieces = self._written(topic_id, entry)
            cost = sum(map(len, pieces))
            if cost > room and taken:
                return
            order.popleft()
            del held[topic_id]
            self.held_bytes -= len(entry.piece) + HELD_OVERHEAD
            taken.extend(pieces)
            room -= cost
