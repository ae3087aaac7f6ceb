"""WebSocket frames (RFC 6455), the server side: server frames (FIN, unmasked, header included)
and the parser of client frames (`read_frame`), which unmasks payloads. Part of the pure-Python
fast path (`broker._fastpath_py`); the compiled twin is `_fastpath_frames.pxi`."""

from __future__ import annotations

# WebSocket opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# read_frame results other than a frame
INCOMPLETE = None
ERR_PROTOCOL = 1002  # broken framing
ERR_TOO_BIG = 1009  # a data frame over the size limit


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
