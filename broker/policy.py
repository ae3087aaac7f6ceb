"""Slow-consumer policies: what the broker does with a connection whose backlog passed
max_pending_bytes.

- `disconnect` (the default): nothing is dropped; a connection that stays behind is closed
  (1013) and recovers from history when it comes back.
- `drop`: the oldest queued batches are dropped, and the connection is told exactly which
  messages of which topic it lost (a `gap` with cause `dropped`).
- `conflate`: only the newest queued message of each topic is kept; a `gap` with cause
  `conflated` covers the ones skipped and comes right before the newest.

Each subscription may choose its own; a topic that several subscriptions of one connection
match gets the most careful of their policies (disconnect before drop before conflate).

Shedding works on the pieces a connection has queued in the broker and not yet written (what
its transport holds is out of reach), and brings its backlog down to half max_pending_bytes,
so a connection that stays behind is shed about once per half-bound of new data: each piece
is looked at a bounded number of times. So that what it cannot take stays within reach, such
a connection is handed at most half its bound at a time (`take_within`) and its transport
pauses as soon as it holds anything: what the socket did not take waits in the broker.
Shedding is the slow path; nothing of it runs for a connection that keeps up.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable

import msgspec

from .fastpath import assemble, encode_batch, is_batch
from .messages import GapNotice, encode

DISCONNECT, DROP, CONFLATE = 0, 1, 2
NAMES = ("disconnect", "drop", "conflate")
BY_NAME = {name: value for value, name in enumerate(NAMES)}

DROPPED_REASON = "dropped: the connection stayed more than max_pending_bytes behind (policy drop)"
CONFLATED_REASON = "conflated: while the connection was behind only the newest message was kept (policy conflate)"


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


def take_within(box, budget: int, max_frame: int, shared: dict, sizes: dict) -> bytes:
    """What to write now to a connection whose policy sheds, as frames (b"" when nothing is
    queued): all it has queued when that is at most `budget` bytes (assembled once for the
    connections that get the same, as `Outbox.take` does), else its oldest pieces within
    `budget` (at least one message; a batch that does not fit is cut at a message), the rest
    staying queued, where shedding reaches it. `sizes` (one dict per loop iteration) keeps the
    bytes of each subscription node's pieces of the iteration, added up once."""
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
    pieces = box.pieces
    taken: list[bytes] = []
    used = 0
    rest: list[bytes] = []
    for i, piece in enumerate(pieces):
        room = budget - used
        if len(piece) <= room:
            taken.append(piece)
            used += len(piece)
            continue
        parts = split_batch(piece, room) if is_batch(piece) else None
        if parts is not None and (not taken or len(parts[0]) <= room):
            taken.append(parts[0])
            rest = [parts[1], *pieces[i + 1 :]]
        elif not taken:
            taken.append(piece)  # one message (or reply) larger than the budget goes alone
            rest = pieces[i + 1 :]
        else:
            rest = pieces[i:]
        break
    box.replace(rest)
    return assemble(taken, max_frame)


class _Loss:
    """What one topic loses in one shedding pass."""

    __slots__ = ("first", "last", "at", "conflated", "messages")

    def __init__(self, first: int, last: int, at: int, conflated: bool, messages: int) -> None:
        self.first = first
        self.last = last
        self.at = at  # index of the first removed piece: the notice goes there
        self.conflated = conflated
        self.messages = messages

    def add(self, first: int, last: int, at: int, conflated: bool, messages: int) -> None:
        self.first = min(self.first, first)
        self.last = max(self.last, last)
        self.at = min(self.at, at)
        self.conflated = self.conflated and conflated
        self.messages += messages


class Shed:
    """One connection's shedding state: the gap notices it created that are still queued
    (found again by identity, so a later pass merges their range instead of adding another
    notice for the same topic)."""

    __slots__ = ("notices",)

    def __init__(self) -> None:
        self.notices: dict[int, tuple] = {}  # id(piece) -> (piece, topic_id, epoch, first, last, conflated)

    def shed(self, box, policy_of: Callable[[int], int], states: list, target: int) -> tuple[int, int]:
        """Drop or conflate `box`'s queued batches of topics whose policy allows it, until its
        queued pieces are within `target` bytes (or nothing more may go). Returns (messages
        dropped, messages conflated)."""
        pieces = box.pieces
        count = len(pieces)
        notices = self.notices
        size = box.size
        kinds: list = [None] * count  # (topic_id, first, last, policy, notice entry or None) or None
        for i, piece in enumerate(pieces):
            if is_batch(piece):
                topic_id, first, n = batch_head(piece)
                kinds[i] = (topic_id, first, first + n - 1, policy_of(topic_id), None)
            else:
                entry = notices.get(id(piece))
                if entry is not None and entry[0] is piece:
                    kinds[i] = (entry[1], entry[3], entry[4], CONFLATE if entry[5] else DROP, entry)
        removed = [False] * count
        replaced: dict[int, bytes] = {}
        losses: dict[int, _Loss] = {}
        epochs: dict[int, int] = {}

        def lose(i: int, topic_id: int, first: int, last: int, conflated: bool, messages: int, entry) -> None:
            if entry is not None:
                epochs[topic_id] = entry[2]
                conflated = entry[5]
                messages = 0  # counted when that notice was made
            loss = losses.get(topic_id)
            if loss is None:
                losses[topic_id] = _Loss(first, last, i, conflated, messages)
            else:
                loss.add(first, last, i, conflated, messages)

        # conflate: keep each conflating topic's newest message, newest piece first
        newest: set[int] = set()
        for i in range(count - 1, -1, -1):
            kind = kinds[i]
            if kind is None or kind[3] != CONFLATE:
                continue
            topic_id, first, last, _, entry = kind
            if entry is None and topic_id not in newest:
                newest.add(topic_id)
                if last > first:
                    piece = encode_batch(topic_id, last, [_last_payload(pieces[i])])
                    size += len(piece) - len(pieces[i])
                    replaced[i] = piece
                    lose(i, topic_id, first, last - 1, True, last - first, None)
                continue
            removed[i] = True
            size -= len(pieces[i])
            lose(i, topic_id, first, last, True, last - first + 1, entry)
        # drop: the oldest first, until the queue is within target
        if size > target:
            for i in range(count):
                kind = kinds[i]
                if removed[i] or kind is None or kind[3] == DISCONNECT:
                    continue
                conflated_before = i in replaced
                piece = replaced.pop(i, pieces[i])
                removed[i] = True
                size -= len(piece)
                topic_id, first, last, _, entry = kind
                if conflated_before:
                    first = last  # only its newest message was left; the rest is counted above
                lose(i, topic_id, first, last, False, last - first + 1, entry)
                if size <= target:
                    break
        if not losses:
            return 0, 0
        at: dict[int, list[int]] = {}
        for topic_id, loss in losses.items():
            at.setdefault(loss.at, []).append(topic_id)
        kept: list[bytes] = []
        fresh: dict[int, tuple] = {}
        dropped = conflated = 0
        for i in range(count):
            for topic_id in at.get(i, ()):
                loss = losses[topic_id]
                if loss.conflated:
                    conflated += loss.messages
                else:
                    dropped += loss.messages
                state = states[topic_id] if topic_id < len(states) else None
                if state is None:
                    continue  # retired: no subscription of this connection matches it any more
                epoch = epochs.get(topic_id, state.epoch)
                notice = encode(
                    GapNotice(
                        state.name, epoch, loss.first, loss.last,
                        CONFLATED_REASON if loss.conflated else DROPPED_REASON,
                        "conflated" if loss.conflated else "dropped",
                    )
                )
                fresh[id(notice)] = (notice, topic_id, epoch, loss.first, loss.last, loss.conflated)
                kept.append(notice)
            if not removed[i]:
                piece = replaced.get(i, pieces[i])
                kind = kinds[i]
                if kind is not None and kind[4] is not None:
                    fresh[id(piece)] = kind[4]
                kept.append(piece)
        self.notices = fresh
        box.replace(kept)
        return dropped, conflated
