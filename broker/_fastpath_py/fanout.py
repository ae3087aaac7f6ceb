"""Fan-out: `Outbox`, one connection's pieces of a loop iteration, and `emit`, which encodes a
topic's batch once and queues it on every receiving outbox (solo members of a node through the
node's own list). Part of the pure-Python fast path (`broker._fastpath_py`); the compiled twin
is `_fastpath_fanout.pxi`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .pieces import assemble, encode_batch
from .topics import TopicState, compact_nodes

if TYPE_CHECKING:
    from .history import HistoryStore
    from .index import Node


_SIG_SEED = 0xCBF29CE484222325
_SIG_PRIME = 0x100000001B3
_SIG_MASK = (1 << 64) - 1


class Outbox:
    """One connection's pieces of this loop iteration (or of every iteration while its
    transport is paused), counted in bytes, and the topics announced on it.

    `transport_bytes` is what the transport still held after the last write. `hard_limit`
    bounds pieces plus transport bytes at every push: past it the outbox takes nothing more and
    is reported (the connection is closed as a slow consumer). The softer `limit` is judged
    by the server over time.

    An outbox with exactly one subscription is a solo member of that node (`solo_node`): this
    tick's batches of the node are read from the node's list, from `offset` on."""

    __slots__ = (
        "owner",
        "pieces",
        "size",
        "transport_bytes",
        "limit",
        "hard_limit",
        "scheduled",
        "paused",
        "closed",
        "over",
        "mark",
        "sig",
        "known",
        "over_since",
        "nsubs",
        "solo_node",
        "offset",
    )

    def __init__(self, owner: Any, limit: int, hard_limit: int | None = None) -> None:
        self.owner: Any = owner  # the shell's object for the connection (the core never reads it)
        self.pieces: list[bytes] = []
        self.size = 0
        self.transport_bytes = 0
        self.limit = limit
        self.hard_limit = limit if hard_limit is None else hard_limit
        self.scheduled = False  # already in this tick's list of connections to write
        self.paused = False  # the transport asked us to stop writing
        self.closed = False  # no more pieces are accepted
        self.over = False  # passed its hard limit; reported once
        self.mark = 0  # the last emission that reached this outbox (one delivery per emission)
        self.sig = _SIG_SEED  # a hash of the pieces' identities, to share equal frames
        self.known: set[int] = set()  # topic ids announced on this connection (see Node.known)
        self.over_since = 0.0  # when its backlog was first seen above `limit` (0: it is not)
        self.nsubs = 0  # subscriptions held in the index
        self.solo_node: Node | None = None  # the node of its only subscription
        self.offset = 0  # where its share of solo_node.pieces starts in this tick

    def push(self, piece: bytes) -> bool:
        """Queue a piece; True when this push took the connection past its hard limit.

        Once past it (or closed) the outbox takes nothing more: the connection is being closed."""
        if type(piece) is not bytes:
            raise TypeError("piece must be bytes")
        if self.closed or self.over:
            return False
        self._add(piece)
        if self.size + self.transport_bytes > self.hard_limit:
            self.over = True
            return True
        return False

    def _add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.size += len(piece)
        self.sig = ((self.sig ^ id(piece)) * _SIG_PRIME) & _SIG_MASK

    def knows(self, topic_id: int) -> bool:
        node = self.solo_node
        return topic_id in self.known or (node is not None and topic_id in node.known)

    def introduce(self, state: TopicState) -> bool:
        """Queue the topic's announcement unless this connection knows its id already; True
        when that took it past its hard limit."""
        if self.closed or self.over or self.knows(state.id):
            return False
        self.known.add(state.id)
        return self.push(state.announce)

    def take(self, max_frame: int, shared: dict | None = None) -> bytes:
        """Everything queued, assembled into frames (b"" when nothing is queued).

        Outboxes holding the very same pieces in the same order get the same bytes object:
        `shared` (one dict per loop iteration) remembers what was assembled, and the solo
        members of a node that have nothing else get the node's frame."""
        node = self.solo_node
        if node is not None and len(node.pieces) > self.offset:
            if not self.pieces and not self.offset:
                self.offset = len(node.pieces)
                if node.frame is None:
                    node.frame = assemble(node.pieces, max_frame)
                return node.frame
            self.pieces.extend(node.pieces[self.offset :])
            self.offset = len(node.pieces)
            data = assemble(self.pieces, max_frame)
            self.clear()
            return data
        pieces = self.pieces
        if not pieces:
            return b""
        key = (self.sig, len(pieces))
        frame: bytes | None = None
        if shared is not None:
            hit = shared.get(key)
            if hit is not None and all(a is b for a, b in zip(hit[0], pieces)):
                frame = hit[1]
        if frame is None:
            frame = assemble(pieces, max_frame)
            if shared is not None:
                shared[key] = (pieces, frame)
        self.pieces = []
        self.size = 0
        self.sig = _SIG_SEED
        return frame

    def keep(self) -> bool:
        """Move this tick's batches of its solo node into its own pieces (its transport is
        paused: they wait for it); True when that took it past its hard limit."""
        node = self.solo_node
        if node is None or len(node.pieces) <= self.offset or self.closed or self.over:
            return False
        for piece in node.pieces[self.offset :]:
            self._add(piece)
        self.offset = len(node.pieces)
        if self.size + self.transport_bytes > self.hard_limit:
            self.over = True
            return True
        return False

    def clear(self) -> None:
        self.pieces = []
        self.size = 0
        self.sig = _SIG_SEED

    def replace(self, pieces: list) -> None:
        """Queue `pieces` instead of what is queued (a slow-consumer policy shed some)."""
        for piece in pieces:
            if type(piece) is not bytes:
                raise TypeError("pieces must be bytes")
        self.clear()
        for piece in pieces:
            self._add(piece)

    @property
    def pending(self) -> int:
        return self.size + self.transport_bytes


# Fan-out


def emit(state: TopicState, emission: int, max_piece: int, touched: list, slow: list, nodes_touched: list) -> int:
    """Encode the topic's pending batch once (in pieces of at most about `max_piece` bytes)
    and queue it on every outbox of every node that matches the topic, each outbox once.

    `emission` is a number used by no earlier call. An outbox not yet announced the topic gets
    the announcement first. Each outbox touched for the first time this tick is appended to
    `touched`; each one that passes its hard limit to `slow`. A node with solo members gets the
    pieces once, in its own list, and is appended to `nodes_touched` the first time in this
    tick (the caller writes its solo members and clears its list after the tick). Nothing is
    raised per subscriber. Returns how many outboxes received the batch."""
    payloads = state.pending
    state.pending = []
    state.dirty = False
    nodes = state.nodes
    if not nodes or not payloads:
        return 0
    pieces = []
    first = state.first
    start = 0
    size = 0
    for i, payload in enumerate(payloads):
        size += len(payload) + 5
        if size > max_piece and i > start:
            pieces.append(encode_batch(state.id, first + start, payloads[start:i]))
            start = i
            size = len(payload) + 5
    pieces.append(encode_batch(state.id, first + start, payloads[start:]))
    receivers = 0
    topic_id = state.id
    dead = False
    for node in nodes:
        if node.dead:
            dead = True
            continue
        if node.solo:
            if not node.pieces:
                nodes_touched.append(node)
            if topic_id not in node.known:
                node.known.add(topic_id)
                node.pieces.append(state.announce)
            node.pieces.extend(pieces)
            receivers += len(node.solo)
        for box in node.members:
            if box.mark == emission or box.closed or box.over:
                continue
            box.mark = emission
            receivers += 1
            if not box.scheduled:
                box.scheduled = True
                touched.append(box)
            if topic_id not in box.known:
                box.known.add(topic_id)
                if box.push(state.announce):
                    slow.append(box)
                    continue
            for piece in pieces:
                if box.push(piece):
                    slow.append(box)
                    break
    if dead:
        compact_nodes(state)
    return receivers


def emit_all(
    dirty: list,
    emission: int,
    max_piece: int,
    touched: list,
    slow: list,
    nodes_touched: list,
    history: HistoryStore | None = None,
    now_ms: int = 0,
) -> tuple[int, int, int, int]:
    """`emit` every topic of `dirty` that has pending messages, with emission numbers from
    `emission` + 1 on. Returns (the last emission number used, messages emitted, batches
    encoded for at least one receiver, deliveries: messages times receivers). With `history`,
    each emitted batch is also retained there (at time `now_ms`)."""
    published = batches = delivered = 0
    for state in dirty:
        count = len(state.pending)
        if not count:
            continue
        emission += 1
        if history is not None:
            history.retain(state, state.first, state.pending, now_ms)
        receivers = emit(state, emission, max_piece, touched, slow, nodes_touched)
        published += count
        if receivers:
            batches += 1
            delivered += count * receivers
    return emission, published, batches, delivered


def schedule_solo(nodes: list, touched: list) -> None:
    """Append the solo members of `nodes` (the nodes `emit` touched) to `touched`, each once,
    skipping closed ones."""
    for node in nodes:
        for box in node.solo:
            if not box.scheduled and not box.closed:
                box.scheduled = True
                touched.append(box)


def end_tick(nodes: list) -> None:
    """After every outbox of the tick was taken or kept: the nodes forget the tick's pieces."""
    for node in nodes:
        node.pieces = []
        node.frame = None
        for box in node.solo:
            box.offset = 0
