"""MessagePack pieces: a delivery batch of one topic (`encode_batch`), a topic announcement
(`encode_topic`), and `assemble`, which packs a connection's pieces of one loop iteration into
as few frames as a size cap allows. Part of the pure-Python fast path (`broker._fastpath_py`);
the compiled twin is `_fastpath_pieces.pxi`."""

from __future__ import annotations

import msgspec

from .frames import frame_header

_encode = msgspec.msgpack.Encoder().encode


# The bytes every `assemble` adds around pieces are counted with these fixed allowances, so a
# frame never passes the cap whatever the array header sizes turn out to be.
_FRAME_ALLOWANCE = 5  # the outer array header (at most array 32)
_RUN_ALLOWANCE = 9  # a "msg" message header: array 32 header + fixstr "msg"


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
