"""The publish path before decoding: `fast_publish` parses and stamps a frame made only of
fire-and-forget publishes to known topics, and `measure_frame` bounds the shape of any client
frame before the general decoder sees it. Part of the pure-Python fast path
(`broker._fastpath_py`); the compiled twin is `_fastpath_publish.pxi`."""

from __future__ import annotations

from typing import Literal

import msgspec

from .topics import stamp

_encode = msgspec.msgpack.Encoder().encode


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
        messages = _decode_fast_batch(data) if batch else [_decode_fast_one(data)]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return -1
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
        0xC4: (2, 1),
        0xC5: (3, 2),
        0xC6: (5, 4),  # bin
        0xD9: (2, 1),
        0xDA: (3, 2),
        0xDB: (5, 4),  # str
        0xC7: (3, 1),
        0xC8: (4, 2),
        0xC9: (6, 4),  # ext
        0xDC: (3, 2),
        0xDD: (5, 4),
        0xDE: (3, 2),
        0xDF: (5, 4),  # array, map
    }.items():
        fixed[b], length[b] = head, n
    for b, size in {
        0xCC: 2,
        0xD0: 2,
        0xCD: 3,
        0xD1: 3,
        0xCA: 5,
        0xCE: 5,
        0xD2: 5,
        0xCB: 9,
        0xCF: 9,
        0xD3: 9,
        0xD4: 3,
        0xD5: 4,
        0xD6: 6,
        0xD7: 10,
        0xD8: 18,
    }.items():
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
