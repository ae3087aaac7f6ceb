"""Pure-Python fast path: the specification `_fastpath.pyx` must match byte for byte.

Frames are complete server-to-client WebSocket frames (FIN + binary opcode, unmasked, header
included), so one bytes object can be written to any number of connections as it is.
"""

from __future__ import annotations

import struct

import msgspec

_encode = msgspec.msgpack.Encoder().encode
_H = struct.Struct("!H")
_Q = struct.Struct("!Q")


def frame_header(size: int) -> bytes:
    """Header of a final binary frame carrying `size` bytes, server side (no mask)."""
    if size < 0:
        raise ValueError("frame size must not be negative")
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return b"\x82\x7e" + _H.pack(size)
    return b"\x82\x7f" + _Q.pack(size)


def encode_frame(payload: bytes) -> bytes:
    """One complete binary WebSocket frame holding `payload`."""
    if type(payload) is not bytes:
        raise TypeError("payload must be bytes")
    return frame_header(len(payload)) + payload


def batch_prefix(topic: str, epoch: int) -> bytes:
    """The constant start of every `msg` batch of a topic: `[` "msg", topic, epoch."""
    return b"\x95" + _encode("msg") + _encode(topic) + _encode(epoch)


def encode_batch(prefix: bytes, first_seq: int, payloads: list) -> bytes:
    """A complete frame holding `["msg", topic, epoch, first_seq, [payload, ...]]`."""
    for payload in payloads:
        if type(payload) is not bytes:
            raise TypeError("payloads must be bytes")
    body = prefix + _encode(first_seq) + _encode(payloads)
    return frame_header(len(body)) + body


class Outbox:
    """One connection's outbound queue of complete frames, counted in bytes.

    `transport_bytes` is what the transport still held after the last write; the bound applies
    to the sum, so a connection cannot hide a backlog in its transport."""

    __slots__ = ("owner", "frames", "size", "transport_bytes", "limit", "scheduled", "paused", "closed", "over")

    def __init__(self, owner: object, limit: int) -> None:
        self.owner = owner
        self.frames: list[bytes] = []
        self.size = 0
        self.transport_bytes = 0
        self.limit = limit
        self.scheduled = False  # already in this tick's list of connections to write
        self.paused = False  # the transport asked us to stop writing
        self.closed = False  # no more frames are accepted
        self.over = False  # passed its limit; reported once

    def push(self, frame: bytes) -> bool:
        """Queue a frame; True when this push took the connection past its limit.

    Once past it (or closed) the outbox takes nothing more: the connection is being closed."""
        if self.closed or self.over:
            return False
        self.frames.append(frame)
        self.size += len(frame)
        if self.size + self.transport_bytes > self.limit:
            self.over = True
            return True
        return False

    def take(self) -> bytes:
        """Everything queued as one bytes object (the single frame itself when there is one)."""
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self.frames = []
        self.size = 0
        return data

    def clear(self) -> None:
        self.frames = []
        self.size = 0

    @property
    def pending(self) -> int:
        return self.size + self.transport_bytes


def fan_out(frame: bytes, targets: tuple, touched: list, slow: list) -> None:
    """Queue `frame` on every outbox in `targets`.

    Each outbox not yet in `touched` this tick is appended to it once; each one that passes its
    limit with this frame is appended to `slow`, and takes no more frames from then on (it is
    about to be closed). Nothing is raised per subscriber."""
    size = len(frame)
    for box in targets:
        if box.closed or box.over:
            continue
        box.frames.append(frame)
        box.size += size
        if not box.scheduled:
            box.scheduled = True
            touched.append(box)
        if box.size + box.transport_bytes > box.limit:
            box.over = True
            slow.append(box)


class TopicState:
    """One concrete topic: its epoch, its last sequence number and this tick's pending batch."""

    __slots__ = ("name", "key", "epoch", "seq", "prefix", "pending", "first", "dirty")

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.key = name.encode()  # the topic as it appears on the wire, for fast_publish
        self.epoch = epoch
        self.seq = 0  # sequence number of the last message published
        self.prefix = batch_prefix(name, epoch)
        self.pending: list[bytes] = []
        self.first = 0  # sequence number of pending[0]
        self.dirty = False


def stamp(state: TopicState, payload: bytes, dirty: list) -> None:
    """Give `payload` the topic's next sequence number and add it to this tick's batch."""
    seq = state.seq = state.seq + 1
    if not state.dirty:
        state.dirty = True
        state.first = seq
        dirty.append(state)
    state.pending.append(payload)


_decode_any = msgspec.msgpack.Decoder().decode


def fast_publish(data, topics_by_key: dict, max_payload: int, max_count: int, dirty: list) -> int:
    """Apply a client frame made only of fire-and-forget publishes to known topics (at most
    `max_count` of them, payloads of at most `max_payload` bytes).

    Returns how many messages were published, or -1 when the frame holds anything else (a
    request id, an unknown topic, a large payload, another message type, bad data): then
    nothing was applied and the frame takes the general path. Only exact, canonical encodings
    count as simple; anything unusual is left to the general path, which handles it the same."""
    data = bytes(data)
    if len(data) < 2 or data[0] not in _ARRAY_HEADS:
        return -1
    try:
        value = _decode_any(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return -1
    batch = isinstance(value[0], list) if value else False
    messages = value if batch else [value]
    if not messages or len(messages) > max_count:
        return -1
    accepted = []
    for message in messages:
        if not (
            type(message) is list
            and len(message) == 4
            and message[0] == "pub"
            and type(message[1]) is int
            and message[1] == 0
            and type(message[2]) is str
            and type(message[3]) is bytes
            and len(message[3]) <= max_payload
        ):
            return -1
        state = topics_by_key.get(message[2].encode())
        if state is None:
            return -1
        accepted.append((state, message[3]))
    if msgspec.msgpack.encode(value) != data:
        return -1  # not the canonical encoding the compiled parser accepts
    for state, payload in accepted:
        stamp(state, payload, dirty)
    return len(accepted)


_ARRAY_HEADS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
