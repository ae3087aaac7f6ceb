"""Pure-Python fast path: the specification `_fastpath.pyx` must match byte for byte.

What lives here is everything the broker does per message or per subscriber:

- WebSocket framing: server frames (FIN, unmasked, header included) and the parser of client
  frames (`read_frame`), which unmasks payloads.
- MessagePack pieces: a delivery batch of one topic (`encode_batch`), a topic announcement
  (`encode_topic`), and `assemble`, which packs a connection's pieces of one loop iteration
  into as few frames as a size cap allows.
- `TopicState`, `stamp` and `fast_publish`: a topic's sequence numbers and this tick's batch.
- `Index`: who receives which topic. Each distinct subscription string is one `Node`; each
  topic keeps the list of nodes that match it, so finding the receivers of a topic costs
  nothing per publish. A new node joins the lists of the topics it matches; a node whose last
  subscriber left is marked dead and dropped from a list the next time that list is read or
  grows, so a change touches only the topics it matches and a departure touches none.
- `Outbox` and `emit`: one connection's pieces of this tick, and the fan-out of a topic's batch
  to every node member, each connection once. A connection with a single subscription (every
  `md.>` subscriber, every subscriber of one topic) is a *solo* member of that node: a batch
  goes once into the node's own list, not into each solo member's, and all of them are written
  the node's frame, assembled once.

This module imports nothing from `_fastpath.pyx` and that one nothing from here: the parity
tests compare two independent implementations.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import msgspec

_encode = msgspec.msgpack.Encoder().encode

# WebSocket opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# read_frame results other than a frame
INCOMPLETE = None
ERR_PROTOCOL = 1002  # broken framing
ERR_TOO_BIG = 1009  # a data frame over the size limit

# The bytes every `assemble` adds around pieces are counted with these fixed allowances, so a
# frame never passes the cap whatever the array header sizes turn out to be.
_FRAME_ALLOWANCE = 5  # the outer array header (at most array 32)
_RUN_ALLOWANCE = 9  # a "msg" message header: array 32 header + fixstr "msg"

_SIG_SEED = 0xCBF29CE484222325
_SIG_PRIME = 0x100000001B3
_SIG_MASK = (1 << 64) - 1


# WebSocket frames


def frame_header(size: int, opcode: int = BINARY) -> bytes:
    """Header of a final server frame (no mask) carrying `size` bytes."""
    if size < 0:
        raise ValueError("frame size must not be negative")
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big")
    return bytes((first, 127)) + size.to_bytes(8, "big")


def encode_frame(payload: bytes, opcode: int = BINARY) -> bytes:
    """One complete server frame holding `payload`."""
    if type(payload) is not bytes:
        raise TypeError("payload must be bytes")
    return frame_header(len(payload), opcode) + payload


def read_frame(data, pos: int, max_size: int):
    """Parse the client frame that starts at `data[pos]`.

    Returns INCOMPLETE (None) when more bytes are needed; an int close code (ERR_PROTOCOL,
    ERR_TOO_BIG) when the frame breaks the rules or a data frame is longer than `max_size`
    (known from its header alone); otherwise (opcode, fin, payload, end): the unmasked payload
    as bytes and the position after the frame."""
    n = len(data)
    if n - pos < 2:
        return INCOMPLETE
    b0 = data[pos]
    b1 = data[pos + 1]
    opcode = b0 & 0x0F
    fin = b0 >> 7
    if b0 & 0x70 or not b1 & 0x80:
        return ERR_PROTOCOL  # reserved bits (no extension is negotiated) or an unmasked frame
    if opcode not in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG):
        return ERR_PROTOCOL
    size = b1 & 0x7F
    head = 2
    if size == 126:
        if n - pos < 4:
            return INCOMPLETE
        size = (data[pos + 2] << 8) | data[pos + 3]
        head = 4
        if size < 126:
            return ERR_PROTOCOL  # not the minimal length encoding
    elif size == 127:
        if n - pos < 10:
            return INCOMPLETE
        size = int.from_bytes(bytes(data[pos + 2 : pos + 10]), "big")
        head = 10
        if size < 65536 or size >> 63:
            return ERR_PROTOCOL
    if opcode >= CLOSE:
        if size > 125 or not fin:
            return ERR_PROTOCOL  # control frames are short and never fragmented
    elif size > max_size:
        return ERR_TOO_BIG
    start = pos + head + 4
    end = start + size
    if n < end:
        return INCOMPLETE
    mask = bytes(data[pos + head : start])
    return opcode, fin, unmask(bytes(data[start:end]), mask), end


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (RFC 6455 5.3)."""
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def frame_needs(data, pos: int) -> int:
    """How many bytes the frame starting at `data[pos]` occupies in all, from its header; 0 when
    even the header is incomplete. Lets a reader wait for a large frame without parsing it again
    on every read."""
    n = len(data)
    if n - pos < 2:
        return 0
    size = data[pos + 1] & 0x7F
    head = 2
    if size == 126:
        if n - pos < 4:
            return 0
        size = (data[pos + 2] << 8) | data[pos + 3]
        head = 4
    elif size == 127:
        if n - pos < 10:
            return 0
        size = int.from_bytes(bytes(data[pos + 2 : pos + 10]), "big")
        head = 10
    return min(head + (4 if data[pos + 1] & 0x80 else 0) + size, (1 << 63) - 1)


# MessagePack pieces


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_batch(topic_id: int, first_seq: int, payloads: list) -> bytes:
    """A delivery batch: `[topic_id, first_seq, payload, payload, ...]`."""
    for payload in payloads:
        if type(payload) is not bytes:
            raise TypeError("payloads must be bytes")
    return _array_header(len(payloads) + 2) + _encode(topic_id) + _encode(first_seq) + b"".join(map(_encode, payloads))


def encode_topic(topic_id: int, name: str, epoch: int) -> bytes:
    """A topic announcement: `["topic", topic_id, name, epoch]`."""
    return _encode(("topic", topic_id, name, epoch))


def is_batch(piece: bytes) -> bool:
    """True for a delivery batch, False for a whole message (its first element is a str)."""
    first = piece[0]
    offset = 1 if first < 0xDC else (3 if first == 0xDC else 5)
    head = piece[offset]
    return not (0xA0 <= head <= 0xBF or head in (0xD9, 0xDA, 0xDB))


def assemble(pieces: list, max_frame: int) -> bytes:
    """Pack a connection's pieces into complete frames, in order.

    Every frame holds one MessagePack array of messages. Whole messages (acks, errors, topic
    announcements) go in as they are; consecutive delivery batches become one
    `["msg", batch, ...]` message. A frame's payload stays within `max_frame` bytes unless a
    single piece is larger on its own; then that piece gets a frame to itself."""
    frames = []
    messages: list[list] = []  # each: [batches] for a run, or [piece] for a whole message
    kinds: list[bool] = []  # True for a run of batches
    used = _FRAME_ALLOWANCE
    for piece in pieces:
        batch = is_batch(piece)
        cost = len(piece) + (_RUN_ALLOWANCE if batch and not (kinds and kinds[-1]) else 0)
        if messages and used + cost > max_frame:
            frames.append(_frame_of(messages, kinds))
            messages, kinds, used = [], [], _FRAME_ALLOWANCE
            cost = len(piece) + (_RUN_ALLOWANCE if batch else 0)
        if batch and kinds and kinds[-1]:
            messages[-1].append(piece)
        else:
            messages.append([piece])
            kinds.append(batch)
        used += cost
    if messages:
        frames.append(_frame_of(messages, kinds))
    return b"".join(frames)


def _frame_of(messages: list[list], kinds: list[bool]) -> bytes:
    parts = [_array_header(len(messages))]
    for pieces, run in zip(messages, kinds):
        if run:
            parts.append(_array_header(len(pieces) + 1) + b"\xa3msg")
        parts.extend(pieces)
    body = b"".join(parts)
    return frame_header(len(body)) + body


# Topics


class TopicState:
    """One concrete topic: its id, epoch, last sequence number, this tick's pending batch and
    the subscription nodes that match it."""

    __slots__ = ("id", "name", "key", "epoch", "seq", "pending", "first", "dirty", "nodes", "compacted", "announce", "history")

    def __init__(self, topic_id: int, name: str, epoch: int) -> None:
        self.id = topic_id
        self.name = name
        self.key = name.encode()  # the topic as it appears on the wire, for fast_publish
        self.epoch = epoch
        self.seq = 0  # sequence number of the last message published
        self.pending: list[bytes] = []
        self.first = 0  # sequence number of pending[0]
        self.dirty = False
        self.nodes: list[Node] = []  # subscription nodes matching this topic (dead ones skipped)
        self.compacted = 0  # len(nodes) when dead nodes were last dropped from it
        self.announce = encode_topic(topic_id, name, epoch)
        self.history: HistoryLog | None = None  # once a HistoryStore kept some of its messages


def stamp(state: TopicState, payload: bytes, dirty: list) -> None:
    """Give `payload` the topic's next sequence number and add it to this tick's batch."""
    seq = state.seq = state.seq + 1
    if not state.dirty:
        state.dirty = True
        state.first = seq
        dirty.append(state)
    state.pending.append(payload)


def fanout_steps(dirty: list, start: int) -> int:
    """The subscription nodes of the topics dirty[start:]: what their fan-out will visit."""
    return sum(len(state.nodes) for state in dirty[max(start, 0):])


_ARRAY_HEADS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


class _FastPub(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The types of a publish the compiled parser takes: `["pub", 0, topic, payload]` or
    `["pub", 0, topic, payload, ""]` (msg_id None: the four-element form)."""

    kind: Literal["pub"]
    id: Literal[0]
    topic: str
    data: bytes
    msg_id: Literal["", None] = None


# Typed decoders stop at the first element that does not fit, so a frame that is not a fast
# one costs no more than the part of it that looks like one.
_decode_fast_one = msgspec.msgpack.Decoder(_FastPub).decode
_decode_fast_batch = msgspec.msgpack.Decoder(list[_FastPub]).decode


def fast_publish(data, topics_by_key: dict, max_payload: int, max_count: int, dirty: list) -> int:
    """Apply a client frame made only of fire-and-forget publishes to known topics (at most
    `max_count` of them, payloads of at most `max_payload` bytes).

    Returns how many messages were published, or -1 when the frame holds anything else (a
    request id, a msg_id, an unknown topic, a large payload, another message type, bad data): then
    nothing was applied and the frame takes the general path. Only exact, canonical encodings
    count as simple; anything unusual is left to the general path, which handles it the same."""
    data = bytes(data)
    n = len(data)
    if n < 2 or data[0] not in _ARRAY_HEADS:
        return -1
    head = 1 if data[0] < 0xDC else (3 if data[0] == 0xDC else 5)
    if n <= head:
        return -1
    batch = data[head] in _ARRAY_HEADS
    if batch and (data[0] & 0x0F if head == 1 else int.from_bytes(data[1:head], "big")) > max_count:
        return -1
    try:
        value = (_decode_fast_batch if batch else _decode_fast_one)(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return -1
    messages = value if batch else [value]
    if not messages or len(messages) > max_count:
        return -1
    accepted = []
    wire = []
    for message in messages:
        if len(message.data) > max_payload:
            return -1
        state = topics_by_key.get(message.topic.encode())
        if state is None:
            return -1
        accepted.append((state, message.data))
        wire.append(["pub", 0, message.topic, message.data] if message.msg_id is None else ["pub", 0, message.topic, message.data, ""])
    if _encode(wire if batch else wire[0]) != data:
        return -1  # not the canonical encoding the compiled parser accepts
    for state, payload in accepted:
        stamp(state, payload, dirty)
    return len(accepted)


# The shape of a client frame, before it is decoded

FRAME_TOO_DEEP = -1
FRAME_LONG_ARRAY = -2
FRAME_LONG_MAP = -3
FRAME_TOO_MANY_VALUES = -4
FRAME_LONG_BATCH = -5

_MAX_MEASURE_DEPTH = 64


def _head_sizes() -> tuple[list[int], list[int], list[int]]:
    """Per first byte of a MessagePack value: the size of its head and fixed body (0: see
    `_SIZE_BYTES`), the bytes of a length that follows (string, binary, extension, container)
    and the kind (0 a scalar, 1 an array, 2 a map, -1 the unused byte 0xC1)."""
    fixed = [1] * 256
    length = [0] * 256
    kind = [0] * 256
    for b in range(0x80, 0x90):
        kind[b] = 2
    for b in range(0x90, 0xA0):
        kind[b] = 1
    for b in range(0xA0, 0xC0):
        fixed[b] = 1 + (b & 0x1F)
    kind[0xC1] = -1
    for b, (head, n) in {
        0xC4: (2, 1), 0xC5: (3, 2), 0xC6: (5, 4),  # bin
        0xD9: (2, 1), 0xDA: (3, 2), 0xDB: (5, 4),  # str
        0xC7: (3, 1), 0xC8: (4, 2), 0xC9: (6, 4),  # ext
        0xDC: (3, 2), 0xDD: (5, 4), 0xDE: (3, 2), 0xDF: (5, 4),  # array, map
    }.items():
        fixed[b], length[b] = head, n
    for b, size in {0xCC: 2, 0xD0: 2, 0xCD: 3, 0xD1: 3, 0xCA: 5, 0xCE: 5, 0xD2: 5, 0xCB: 9, 0xCF: 9, 0xD3: 9,
                    0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}.items():
        fixed[b] = size
    kind[0xDC] = kind[0xDD] = 1
    kind[0xDE] = kind[0xDF] = 2
    return fixed, length, kind


_HEAD, _LENGTH, _KIND = _head_sizes()


def measure_frame(data, max_messages: int, max_fields: int, max_entries: int, max_depth: int, max_values: int) -> int:
    """Walk the MessagePack value at the start of a client frame without decoding it: how many
    values it holds (containers, their elements, map keys and values), or a FRAME_* code (< 0)
    as soon as it passes a bound:

    - a frame that is a batch (an array whose first element is an array) holds at most
      `max_messages` elements (FRAME_LONG_BATCH);
    - every other array holds at most `max_fields` elements (FRAME_LONG_ARRAY), a map at most
      `max_entries` entries (FRAME_LONG_MAP);
    - containers nest at most `max_depth` deep counting the message, one more in a batch
      (FRAME_TOO_DEEP);
    - at most `max_values` values in all (FRAME_TOO_MANY_VALUES).

    Bytes that are not MessagePack, a value cut off and bytes after the value are not refused
    here: the count so far is returned and the decoder says what is wrong. The walk stops at
    the first bound passed, so its cost is bounded by the bounds as well as by the bytes."""
    if not 1 <= max_depth < _MAX_MEASURE_DEPTH:
        raise ValueError(f"max_depth must be from 1 to {_MAX_MEASURE_DEPTH - 1}")
    data = bytes(data)
    n = len(data)
    if not n:
        return 0
    head_of, length_of, kind_of = _HEAD, _LENGTH, _KIND
    first = data[0]
    batch = False
    if kind_of[first] == 1:  # a batch: told by the bytes of the two heads alone, as messages.batch_size does
        offset = head_of[first]
        batch = offset < n and (0x90 <= data[offset] <= 0x9F or data[offset] in (0xDC, 0xDD))
    limit_depth = max_depth + 1 if batch else max_depth
    remaining: list[int] = []  # elements still to come in each open container, outermost first
    pos = values = 0
    while True:
        if pos >= n:
            return values  # cut off: the decoder explains
        b = data[pos]
        kind = kind_of[b]
        size = head_of[b]
        if not kind and not length_of[b]:  # a scalar of fixed size, the common case
            values += 1
            if values > max_values:
                return FRAME_TOO_MANY_VALUES
            if size > n - pos:
                return values  # cut off
            pos += size
        else:
            if kind < 0:
                return values  # 0xC1, never used
            width = length_of[b]
            if width:
                if n - pos < size:
                    return values  # the head is cut off
                count = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            else:
                count = b & 0x0F
            values += 1
            if values > max_values:
                return FRAME_TOO_MANY_VALUES
            if kind:
                if len(remaining) >= limit_depth:
                    return FRAME_TOO_DEEP
                if not remaining and batch:
                    if count > max_messages:
                        return FRAME_LONG_BATCH
                elif kind == 2:
                    if count > max_entries:
                        return FRAME_LONG_MAP
                elif count > max_fields:
                    return FRAME_LONG_ARRAY
                pos += size
                if count:
                    remaining.append(count * 2 if kind == 2 else count)
                    continue
            else:
                size += count
                if size > n - pos:
                    return values  # cut off
                pos += size
        # a value is complete: close every container it completes
        while remaining:
            left = remaining[-1] - 1
            if left:
                remaining[-1] = left
                break
            remaining.pop()
        if not remaining:
            return values


# Outbound queue of one connection


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
        "owner", "pieces", "size", "transport_bytes", "limit", "hard_limit", "scheduled", "paused",
        "closed", "over", "mark", "sig", "known", "over_since", "nsubs", "solo_node", "offset",
    )

    def __init__(self, owner: object, limit: int, hard_limit: int | None = None) -> None:
        self.owner = owner
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
        return topic_id in self.known or (node is not None and node.known is not None and topic_id in node.known)

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
        data = None
        if shared is not None:
            hit = shared.get(key)
            if hit is not None and all(a is b for a, b in zip(hit[0], pieces)):
                data = hit[1]
        if data is None:
            data = assemble(pieces, max_frame)
            if shared is not None:
                shared[key] = (pieces, data)
        self.pieces = []
        self.size = 0
        self.sig = _SIG_SEED
        return data

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
        _compact(state)
    return receivers


def emit_all(dirty: list, emission: int, max_piece: int, touched: list, slow: list, nodes_touched: list, history: HistoryStore | None = None, now_ms: int = 0) -> tuple[int, int, int, int]:
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


def _compact(state: TopicState) -> None:
    """Drop the dead nodes from a topic's list."""
    state.nodes = [node for node in state.nodes if not node.dead]
    state.compacted = len(state.nodes)


def _add_node(state: TopicState, node: "Node") -> None:
    """Append a live node to a topic's list, first dropping dead ones once the list has grown
    to twice its length at the last compaction (so the list stays within twice its live nodes
    plus a few, at amortized O(1) per append)."""
    if len(state.nodes) >= 2 * state.compacted + 16:
        _compact(state)
    state.nodes.append(node)


# Who receives which topic


class Node:
    """One distinct subscription string (a topic or a pattern) and the outboxes holding it;
    dead once the last one left (a new subscription to the string makes a new node).

    `solo` holds the outboxes whose only subscription this is; `members` the others. This
    tick's pieces for the solo members are in `pieces` (and `frame`, once assembled). `known`
    holds the topics announced to every solo member: a member joining is first announced those
    it was not, so the node never announces a topic twice to anyone (a member that knew more
    than the others may see a topic announced a second time)."""

    __slots__ = ("pattern", "members", "solo", "pieces", "frame", "known", "dead")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.members: dict = {}
        self.solo: dict = {}
        self.pieces: list[bytes] = []
        self.frame: bytes | None = None
        self.known: set[int] | None = None  # None while there is no solo member
        self.dead = False



class _PatternTrie:
    __slots__ = ("children", "star", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _PatternTrie] = {}
        self.star: _PatternTrie | None = None
        self.here: Node | None = None  # a pattern ending exactly at this depth
        self.rest: Node | None = None  # a pattern ending in '>' at this depth

    def empty(self) -> bool:
        return not (self.children or self.star is not None or self.here is not None or self.rest is not None)


class _TopicTrie:
    __slots__ = ("children", "state", "height")

    def __init__(self) -> None:
        self.children: dict[str, _TopicTrie] = {}
        self.state: TopicState | None = None
        self.height = 0  # tokens on the longest path below: patterns longer than that skip it


def _is_pattern(name: str) -> bool:
    return "*" in name or ">" in name


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    """Whether the topic of `tokens` matches the pattern of `pattern` (both split at dots)."""
    n = len(tokens)
    for i, token in enumerate(pattern):
        if token == ">":
            return n > i
        if i >= n or (token != "*" and token != tokens[i]):
            return False
    return len(pattern) == n


class _Excluding:
    """A subscription string with exclusions, `PATTERN !DENIED !DENIED...` (a grant's deny
    entries cut out of a subscription): its node and its parts, split at dots."""

    __slots__ = ("node", "base", "excluded")

    def __init__(self, pattern: str, node: "Node | None" = None) -> None:
        parts = pattern.split(" !")
        self.node = node
        self.base = parts[0].split(".")
        self.excluded = [part.split(".") for part in parts[1:]]

    def matches(self, tokens: list[str]) -> bool:
        if not _matches(self.base, tokens):
            return False
        for excluded in self.excluded:
            if _matches(excluded, tokens):
                return False
        return True


class Index:
    """Subscriptions and topics, kept so that every topic's `nodes` list holds exactly the live
    nodes that match it (and perhaps some dead ones, which readers skip).

    - A new topic walks the pattern trie once (`add_topic`), and is matched against each
      subscription string with exclusions (`PATTERN !DENIED ...`, made from grants with deny
      entries; there are few distinct ones, kept apart from the trie in `excluding`).
    - The first subscription to a string creates its node and adds it to the topics it
      matches (found through a trie of the existing topics); when the last one leaves, the
      node dies and touches no topic. Joining or leaving a live node touches no topic either.
    `work` counts trie nodes visited and topic lists changed, so callers can bound the work
    one client causes per loop iteration."""

    def __init__(self) -> None:
        self.exact: dict[str, Node] = {}
        self.root = _PatternTrie()
        self.topics: dict[str, TopicState] = {}
        self.by_key: dict[bytes, TopicState] = {}
        self.states: list[TopicState | None] = []  # by topic id (None: retired)
        self._topic_root = _TopicTrie()
        self.patterns = 0  # distinct pattern nodes
        self.excluding: dict[str, _Excluding] = {}  # subscription strings with exclusions
        self.subscriptions = 0  # (outbox, string) pairs
        self.work = 0

    def __len__(self) -> int:
        return self.subscriptions

    # topics

    def add_topic(self, state: TopicState) -> None:
        """Register a new topic (`state.id` one no topic of the index had: ids are small,
        `states` is a list by id, holding None where no topic is) and find the nodes that match
        it."""
        if state.id < 0 or state.id < len(self.states) and self.states[state.id] is not None or state.name in self.topics:
            raise ValueError(f"topic {state.name!r} with id {state.id} does not fit the index")
        tokens = state.name.split(".")
        nodes: list[Node] = []
        node = self.exact.get(state.name)
        if node is not None:
            nodes.append(node)
        if self.patterns:
            self._collect(self.root, tokens, 0, nodes)
        if self.excluding:
            for entry in self.excluding.values():
                self.work += 1
                if entry.matches(tokens):
                    nodes.append(entry.node)
        state.nodes = nodes
        state.compacted = len(nodes)
        trie = self._topic_root
        depth = len(tokens)
        for token in tokens:
            if trie.height < depth:
                trie.height = depth
            depth -= 1
            child = trie.children.get(token)
            if child is None:
                child = trie.children[token] = _TopicTrie()
            trie = child
        trie.state = state
        self.work += len(tokens)
        self.topics[state.name] = state
        self.by_key[state.key] = state
        self._place(state)

    def retire(self, state: TopicState) -> None:
        """Forget a topic that no live subscription matches: its name may come back as a new
        topic with a new id (ids are never used again; a retired id's slot in `states` is None).
        Heights in the topic trie may stay higher than what is below: they only bound a walk."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if any(not node.dead for node in state.nodes):
            raise ValueError(f"topic {state.name!r} has subscribers")
        tokens = state.name.split(".")
        path = []
        trie = self._topic_root
        for token in tokens:
            path.append((trie, token))
            trie = trie.children[token]
        trie.state = None
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.state is not None or child.children:
                break
            del parent.children[token]
        del self.topics[state.name]
        del self.by_key[state.key]
        self.states[state.id] = None
        state.nodes = []
        state.compacted = 0
        self.work += len(tokens)

    def _place(self, state: TopicState) -> None:
        states = self.states
        if state.id >= len(states):
            states.extend([None] * (state.id + 1 - len(states)))
        states[state.id] = state

    def renew(self, state: TopicState, epoch: int, topic_id: int) -> TopicState:
        """Start a new epoch of a topic: a new state with the new id `topic_id` (announced
        anew on every connection) takes the old one's place and its subscription nodes; the old
        id is retired. Returns the new state."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if topic_id < 0 or topic_id < len(self.states) and self.states[topic_id] is not None:
            raise ValueError(f"topic id {topic_id} is taken")
        fresh = TopicState(topic_id, state.name, epoch)
        fresh.nodes = state.nodes
        fresh.compacted = state.compacted
        tokens = state.name.split(".")
        trie = self._topic_root
        for token in tokens:
            trie = trie.children[token]
        trie.state = fresh
        self.topics[state.name] = fresh
        self.by_key[state.key] = fresh
        self.states[state.id] = None
        self._place(fresh)
        state.nodes = []
        state.compacted = 0
        self.work += len(tokens)
        return fresh

    def _collect(self, trie: _PatternTrie, tokens: list[str], i: int, out: list) -> None:
        self.work += 1
        if trie.rest is not None and i < len(tokens):
            out.append(trie.rest)
        if i == len(tokens):
            if trie.here is not None:
                out.append(trie.here)
            return
        child = trie.children.get(tokens[i])
        if child is not None:
            self._collect(child, tokens, i + 1, out)
        if trie.star is not None:
            self._collect(trie.star, tokens, i + 1, out)

    def matching(self, pattern: str) -> list[TopicState]:
        """The topics that match `pattern` (a topic, a pattern, or a pattern with exclusions),
        found through the topic trie."""
        if " " in pattern:
            entry = _Excluding(pattern)
            return [state for state in self._matching_topics(pattern.partition(" ")[0]) if entry.matches(state.name.split("."))]
        return self._matching_topics(pattern)

    def _matching_topics(self, pattern: str) -> list[TopicState]:
        out: list[TopicState] = []
        self._match_topics(self._topic_root, pattern.split("."), 0, out)
        return out

    def _match_topics(self, trie: _TopicTrie, tokens: list[str], i: int, out: list) -> None:
        self.work += 1
        if trie.height < len(tokens) - i:
            return  # no topic below is long enough
        if i == len(tokens):
            if trie.state is not None:
                out.append(trie.state)
            return
        token = tokens[i]
        if token == ">":
            for child in trie.children.values():
                self._subtree(child, out)
        elif token == "*":
            for child in trie.children.values():
                self._match_topics(child, tokens, i + 1, out)
        else:
            child = trie.children.get(token)
            if child is not None:
                self._match_topics(child, tokens, i + 1, out)

    def _subtree(self, trie: _TopicTrie, out: list) -> None:
        self.work += 1
        if trie.state is not None:
            out.append(trie.state)
        for child in trie.children.values():
            self._subtree(child, out)

    # subscriptions

    def subscribe(self, pattern: str, box: Outbox) -> bool:
        """Add `box` to the node of `pattern`; False when it is already there.

        Its first subscription makes it a solo member of the node; a second one makes it a
        plain member of both (what its old node gave it this tick becomes its own)."""
        node = self._node(pattern, create=True)
        if box in node.members or box in node.solo:
            return False
        if box.nsubs == 0:
            self._join_solo(node, box)
        else:
            old = box.solo_node
            if old is not None:  # its only subscription so far (a box left with one plain membership has none)
                self._leave_solo(old, box)
                old.members[box] = None
            node.members[box] = None
        box.nsubs += 1
        self.subscriptions += 1
        self.work += 1
        return True

    def unsubscribe(self, pattern: str, box: Outbox) -> bool:
        """Remove `box` from the node of `pattern`; False when it was not there."""
        node = self._node(pattern, create=False)
        if node is None:
            return False
        if box in node.solo:
            self._leave_solo(node, box)
        elif box in node.members:
            del node.members[box]
        else:
            return False
        box.nsubs -= 1
        self.subscriptions -= 1
        self.work += 1
        if not node.members and not node.solo:
            self._drop(node)
        return True

    def settle(self, pattern: str, box: Outbox) -> None:
        """`box` holds `pattern` as its only subscription now: make it a solo member."""
        node = self._node(pattern, create=False)
        if node is not None and box.nsubs == 1 and box in node.members:
            del node.members[box]
            self._join_solo(node, box)

    def _join_solo(self, node: Node, box: Outbox) -> None:
        if not node.solo:
            node.known = set(box.known)
        else:
            # the node's deliveries name topics announced to its solo members: announce to the
            # newcomer, first, those it was not
            for topic_id in sorted(node.known - box.known):
                if self.states[topic_id] is not None:  # not retired
                    box._add(self.states[topic_id].announce)
                    self.work += 1
            box.known |= node.known
        node.solo[box] = None
        box.solo_node = node
        box.offset = len(node.pieces)  # what the node got earlier in this tick is not for it

    def _leave_solo(self, node: Node, box: Outbox) -> None:
        del node.solo[box]
        if not box.closed:
            # what the node got in this tick since it joined becomes its own; so does what
            # the node announced to it
            for piece in node.pieces[box.offset :]:
                box._add(piece)
            box.known |= node.known
        box.solo_node = None
        box.offset = 0
        if not node.solo:
            node.known = None

    def node(self, pattern: str) -> Node | None:
        """The node of `pattern`, if anyone holds it."""
        return self._node(pattern, create=False)

    def receivers(self, name: str) -> list:
        """The outboxes a message of topic `name` reaches now, each once (for tests and
        introspection; the hot path reads `state.nodes`)."""
        state = self.topics.get(name)
        if state is not None:
            nodes = state.nodes
        else:
            nodes = []
            node = self.exact.get(name)
            if node is not None:
                nodes.append(node)
            self._collect(self.root, name.split("."), 0, nodes)
            nodes += [entry.node for entry in self.excluding.values() if entry.matches(name.split("."))]
        seen: dict = {}
        for node in nodes:
            if not node.dead:
                for box in node.solo:
                    seen[box] = None
                for box in node.members:
                    seen[box] = None
        return list(seen)

    def _node(self, pattern: str, create: bool) -> Node | None:
        if " " in pattern:
            entry = self.excluding.get(pattern)
            if entry is None:
                if not create:
                    return None
                entry = self.excluding[pattern] = _Excluding(pattern, Node(pattern))
                for state in self._matching_topics(pattern.partition(" ")[0]):
                    self.work += 1
                    if entry.matches(state.name.split(".")):
                        _add_node(state, entry.node)
            return entry.node
        if not _is_pattern(pattern):
            node = self.exact.get(pattern)
            if node is None and create:
                node = self.exact[pattern] = Node(pattern)
                state = self.topics.get(pattern)
                if state is not None:
                    _add_node(state, node)
                    self.work += 1
            return node
        trie = self.root
        tokens = pattern.split(".")
        for token in tokens:
            self.work += 1
            if token == ">":
                if trie.rest is None and create:
                    trie.rest = self._attach(Node(pattern))
                return trie.rest
            if token == "*":
                if trie.star is None:
                    if not create:
                        return None
                    trie.star = _PatternTrie()
                trie = trie.star
            else:
                child = trie.children.get(token)
                if child is None:
                    if not create:
                        return None
                    child = trie.children[token] = _PatternTrie()
                trie = child
        if trie.here is None and create:
            trie.here = self._attach(Node(pattern))
        return trie.here

    def _attach(self, node: Node) -> Node:
        """A new pattern node joins every existing topic it matches."""
        self.patterns += 1
        for state in self._matching_topics(node.pattern):
            _add_node(state, node)
            self.work += 1
        return node

    def _drop(self, node: Node) -> None:
        node.dead = True
        pattern = node.pattern
        if " " in pattern:
            del self.excluding[pattern]
            return
        if not _is_pattern(pattern):
            del self.exact[pattern]
            return
        self.patterns -= 1
        tokens = pattern.split(".")
        chain = [self.root]
        for token in tokens[:-1] if tokens[-1] == ">" else tokens:
            trie = chain[-1]
            chain.append(trie.star if token == "*" else trie.children[token])
        if tokens[-1] == ">":
            chain[-1].rest = None
            path = tokens[:-1]
        else:
            chain[-1].here = None
            path = tokens
        for depth in range(len(path), 0, -1):
            trie = chain[depth]
            if not trie.empty():
                return
            parent, token = chain[depth - 1], path[depth - 1]
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]


# History: each topic's recent messages, for recovery and last values

MESSAGE_OVERHEAD = 48  # bytes counted per retained message on top of its payload
CHUNK_OVERHEAD = 120  # bytes counted per chunk (its record and its places in the queues)
BUCKET_MS = 1000  # a topic's batches retained within this many milliseconds share one chunk


class HistoryChunk:
    """Consecutive messages of one topic retained within one time bucket (BUCKET_MS from its
    first); `log` is None once it is no longer retained."""

    __slots__ = ("first", "payloads", "sizes", "time", "last", "log")

    def __init__(self, first: int, payloads: list, sizes: int, time_ms: int, log) -> None:
        self.first = first
        self.payloads = payloads  # its own list (the emitted batch's, extended by later ones)
        self.sizes = sizes  # bytes counted for what is still retained of it
        self.time = time_ms  # when its first message was retained
        self.last = time_ms  # when its newest message was
        self.log = log


class HistoryLog:
    """One topic's retained messages: chunks of consecutive sequence numbers, the first one
    possibly cut (`skip` messages of it are gone)."""

    __slots__ = ("chunks", "tail", "skip", "count", "size", "trimmed_time")

    def __init__(self) -> None:
        self.chunks: deque[HistoryChunk] = deque()
        self.tail: HistoryChunk | None = None  # the newest chunk, while it is retained
        self.skip = 0
        self.count = 0
        self.size = 0  # bytes counted (payloads and overheads)
        self.trimmed_time = -1  # when the newest message trimmed so far was retained (ms); -1: none

    def first_seq(self) -> int:
        """The sequence number of the oldest retained message (0 when none is)."""
        if not self.chunks:
            return 0
        return self.chunks[0].first + self.skip


class HistoryStore:
    """Every topic's HistoryLog (on `TopicState.history`), bounded per topic by messages and
    bytes as batches are retained.

    A batch joins the topic's newest chunk while that is younger than BUCKET_MS (so a topic
    costs one chunk per second however many ticks it is published in). Past the message
    bound, whole chunks go while the bound asks for at least that many, else the part of the
    first chunk it asks for, in one step (the cut part of a long-lived chunk is let go once it
    is most of it); past the byte bound, one message at a time. `order` holds every chunk,
    oldest first, for the bounds by age and in total its owner applies; `stale` counts the
    chunks in it that a topic's own bounds dropped already."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.order: deque[HistoryChunk] = deque()
        self.total = 0  # bytes counted over every topic
        self.stale = 0
        self.trimmed = 0  # messages dropped by any bound
        self.max_messages = max_messages
        self.max_bytes = max_bytes

    def retain(self, state: TopicState, first: int, payloads: list, now_ms: int) -> None:
        """Keep a batch of the topic (its list is kept, not copied: the caller lets go of it)."""
        log = state.history
        if log is None:
            log = state.history = HistoryLog()
        size = MESSAGE_OVERHEAD * len(payloads)
        for payload in payloads:
            if type(payload) is not bytes:
                raise TypeError("payloads must be bytes")
            size += len(payload)
        tail = log.tail
        if tail is not None and tail.log is not None and now_ms - tail.time < BUCKET_MS and tail.first + len(tail.payloads) == first:
            tail.payloads.extend(payloads)
            tail.sizes += size
            tail.last = now_ms
        else:
            size += CHUNK_OVERHEAD
            tail = HistoryChunk(first, payloads, size, now_ms, log)
            log.chunks.append(tail)
            log.tail = tail
            self.order.append(tail)
        log.count += len(payloads)
        log.size += size
        self.total += size
        if log.count > self.max_messages or log.size > self.max_bytes:
            self._trim(log)

    def _trim(self, log: HistoryLog) -> None:
        excess = log.count - self.max_messages
        while excess > 0:
            head = log.chunks[0]
            remaining = len(head.payloads) - log.skip
            if remaining <= excess:
                self.drop_head(log)
                self.stale += 1
                excess -= remaining
                continue
            self._cut(log, head, excess)
            excess = 0
        while log.size > self.max_bytes:
            head = log.chunks[0]
            if len(head.payloads) - log.skip == 1:
                self.drop_head(log)
                self.stale += 1
            else:
                self._cut(log, head, 1)

    def _cut(self, log: HistoryLog, head: HistoryChunk, count: int) -> None:
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
            head.payloads = head.payloads[skip:]
            head.first += skip
            skip = 0
        log.skip = skip

    def drop_head(self, log: HistoryLog) -> None:
        """Forget the topic's oldest chunk (what is left of it)."""
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
        if log.tail is chunk:
            log.tail = None


# The cluster backplane's per-topic work (broker.cluster.streams): staging a tick's pending
# batches into one block per shard for its next write, and taking numbered batches back into
# the topics' pending batches. Both run for every topic a tick or a stream entry touches.


class Block:
    """What one shard gets in one write: per topic its payloads in order (`topics`), and the
    acks waiting for their numbers (`waiters`: topic, index in its payloads, ok, fail, msg_id)."""

    __slots__ = ("shard", "topics", "size", "count", "waiters", "staged", "write", "sent", "epoch", "answered")

    def __init__(self, shard: int, staged: float) -> None:
        self.shard = shard
        self.topics: dict[str, list[bytes]] = {}
        self.size = 0
        self.count = 0
        self.waiters: list = []
        self.staged = staged
        self.write = 0
        self.sent = False
        self.epoch = 0
        self.answered = False


def stage(states: list, filling: list, full_of: list, waiting: dict, shards: int, now: float, block_bytes: int) -> tuple[int, int, int]:
    """Take the topics' pending batches into the block each one's shard is filling
    (`filling[shard]`, made when there is none), and give each topic back the sequence number
    it had. The acks waiting for a topic's messages (`waiting[state]`: provisional seq, ok,
    fail, msg_id) move to the block with their index in its payloads. A block that reaches
    `block_bytes` goes to `full_of[shard]`. Returns (messages taken, their bytes, blocks made)."""
    import zlib

    taken = size_all = made = 0
    for state in states:
        pending = state.pending
        state.dirty = False
        count = len(pending)
        if not count:
            continue
        shard = zlib.crc32(state.key) % shards
        block = filling[shard]
        if block is None:
            block = filling[shard] = Block(shard, now)
            made += 1
        payloads = block.topics.get(state.name)
        if payloads is None:
            payloads = block.topics[state.name] = []
        base = len(payloads) - state.first
        payloads.extend(pending)
        size = sum(map(len, pending))
        block.size += size
        block.count += count
        size_all += size
        if waiting:
            mine = waiting.pop(state, None)
            if mine is not None:
                name = state.name
                block.waiters.extend((name, base + seq, ok, fail, msg_id) for seq, ok, fail, msg_id in mine)
        state.seq -= count
        state.pending = []
        taken += count
        if block.size >= block_bytes:
            full_of[shard].append(block)
            filling[shard] = None
    return taken, size_all, made


def arrive(entries: list, topics: dict, arrived: list, other) -> int:
    """Numbered batches from a backplane's log, in its order (`entries`: (epoch, [(topic,
    payloads), ...], [first seq, ...])), into the topics' pending batches: a batch that
    follows its topic's last number in its epoch is added (the topic joins `arrived` when it
    was not dirty); any other (a topic unknown here, another epoch, a repeat, numbers skipped)
    goes to `other(topic, epoch, payloads, first)`, which returns the messages it took.
    Returns the messages taken."""
    taken = 0
    for epoch, batches, firsts in entries:
        for (name, payloads), first in zip(batches, firsts):
            state = topics.get(name)
            if state is None or first != state.seq + 1 or state.epoch != epoch:
                taken += other(name, epoch, payloads, first)
                continue
            count = len(payloads)
            if state.dirty:
                state.pending.extend(payloads)
            else:
                state.dirty = True
                state.first = first
                state.pending = payloads
                arrived.append(state)
            state.seq = first + count - 1
            taken += count
    return taken
