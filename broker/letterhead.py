"""What a dead letter keeps of a client message: its head (the array's head, the type, the id
and the topic where it names one), cut from the bytes as received, never a payload or a token.
A leaf of the core: `broker.messages` cuts it from each message it cannot apply, and the
router's dead letters (broker.requests) carry it."""

from __future__ import annotations

DEAD_LETTER_HEAD = 32  # bytes of a message kept with its dead letter, at most
# Leading elements a dead letter keeps of a message: type, id and topic of the messages that
# name one; type and id of the others (an `auth` holds a token where those hold a topic).
_TOPIC_TYPES = frozenset((b"sub", b"unsub", b"pub", b"req"))
_INT_SIZES = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}


def _scalar(data, pos: int) -> int:
    """The size of the str, integer, nil or bool at data[pos] (head included); 0 for any
    other value (a bin, an array, a map...) or one cut short."""
    if pos >= len(data):
        return 0
    head = data[pos]
    if head <= 0x7F or head >= 0xE0 or head in (0xC0, 0xC2, 0xC3):
        size = 1
    elif 0xA0 <= head <= 0xBF:
        size = 1 + (head & 0x1F)
    elif head in _INT_SIZES:
        size = _INT_SIZES[head]
    elif head in (0xD9, 0xDA, 0xDB) and pos + 1 + (1 << (head - 0xD9)) <= len(data):
        width = 1 << (head - 0xD9)
        size = 1 + width + int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
    else:
        return 0
    return size if pos + size <= len(data) else 0


def _array(data, pos: int) -> int:
    """The size of the head of the array at data[pos], or 0 if there is none."""
    if pos >= len(data):
        return 0
    head = data[pos]
    return 1 if 0x90 <= head <= 0x9F else 3 if head == 0xDC else 5 if head == 0xDD else 0


def dead_letter_head(data) -> bytes:
    """What a dead letter keeps of a client message (or frame): its bytes as received up to,
    not including, anything that may be a payload or a token. That is the array's head, the
    type, the id and, for `sub`, `unsub`, `pub` and `req`, the topic (the first message of a
    batch); it stops at the first element that is not a str, an integer, nil or a bool. Of
    bytes that are not a MessagePack array only the first is kept (it says what they are).
    At most DEAD_LETTER_HEAD bytes. Walks three elements at most, whatever the frame's size."""
    view = memoryview(data)
    start = _array(view, 0)
    if not start:
        return bytes(view[:1])
    inner = _array(view, start)
    if inner:  # a batch: its head, then the head of its first message
        start += inner
    end = start
    kind = b""
    for field in range(3):
        size = _scalar(view, end)
        if not size:
            break
        if field == 0:
            kind = bytes(view[end + 1 : end + size]) if 0xA0 <= view[end] <= 0xBF else b""
        elif field == 2 and kind not in _TOPIC_TYPES:
            break
        end += size
    return bytes(view[: min(end, DEAD_LETTER_HEAD)])
