# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path. `_fastpath_py.py` is its specification: same API, same bytes.

The tries of the index are not tracked by the cyclic garbage collector (`no_gc`): they hold
no cycles (a trie node refers only to its children, its subscription nodes and its topic), and
one client's thousands of overlapping patterns made every full collection walk them.

This module stands alone: it shares no code with its twin, so the parity tests compare two
implementations."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport INT64_MAX
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset

from collections import deque

import msgspec

cdef object _encode = msgspec.msgpack.Encoder().encode

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

INCOMPLETE = None
ERR_PROTOCOL = 1002
ERR_TOO_BIG = 1009

cdef class Node
cdef class HistoryStore

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)


cdef inline list _untracked_list(list items):
    """`items`, no longer visited by the cyclic garbage collector. A topic's list of matching
    nodes can hold thousands of references (one client's overlapping patterns); it is part of
    no cycle that could need collecting (topics live as long as the broker), and having the
    collector walk it at every collection made pauses of tens of milliseconds."""
    PyObject_GC_UnTrack(<void*>items)
    return items


cdef enum:
    FRAME_ALLOWANCE = 5  # the outer array header (at most array 32)
    RUN_ALLOWANCE = 9  # a "msg" message header: array 32 header + fixstr "msg"

cdef uint64_t SIG_SEED = 0xCBF29CE484222325ULL
cdef uint64_t SIG_PRIME = 0x100000001B3ULL


# WebSocket frames


cdef inline Py_ssize_t _header_size(Py_ssize_t size) noexcept:
    if size < 126:
        return 2
    if size < 65536:
        return 4
    return 10


cdef inline uint8_t* _put_be(uint8_t* out, uint64_t value, int width) noexcept:
    cdef int i
    for i in range(width - 1, -1, -1):
        out[i] = <uint8_t>(value & 0xFF)
        value >>= 8
    return out + width


cdef inline uint8_t* _put_header(uint8_t* out, Py_ssize_t size, uint8_t opcode) noexcept:
    out[0] = 0x80 | opcode
    if size < 126:
        out[1] = <uint8_t>size
        return out + 2
    if size < 65536:
        out[1] = 126
        return _put_be(out + 2, <uint64_t>size, 2)
    out[1] = 127
    return _put_be(out + 2, <uint64_t>size, 8)


def frame_header(Py_ssize_t size, int opcode=BINARY):
    """Header of a final server frame (no mask) carrying `size` bytes."""
    if size < 0:
        raise ValueError("frame size must not be negative")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(size))
    _put_header(<uint8_t*>PyBytes_AS_STRING(out), size, <uint8_t>opcode)
    return out


def encode_frame(bytes payload not None, int opcode=BINARY):
    """One complete server frame holding `payload`."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(size) + size)
    cdef uint8_t* p = _put_header(<uint8_t*>PyBytes_AS_STRING(out), size, <uint8_t>opcode)
    memcpy(p, PyBytes_AS_STRING(payload), size)
    return out


cdef inline uint64_t _be(const uint8_t* p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef void _unmask_into(uint8_t* out, const uint8_t* src, Py_ssize_t n, const uint8_t* mask) noexcept:
    cdef uint32_t m4
    cdef uint64_t m8, chunk
    cdef Py_ssize_t i = 0
    memcpy(&m4, mask, 4)
    m8 = (<uint64_t>m4 << 32) | m4
    while i + 8 <= n:
        memcpy(&chunk, src + i, 8)
        chunk ^= m8
        memcpy(out + i, &chunk, 8)
        i += 8
    while i < n:
        out[i] = src[i] ^ mask[i & 3]
        i += 1


def read_frame(const uint8_t[::1] data, Py_ssize_t pos, Py_ssize_t max_size):
    """Parse the client frame that starts at `data[pos]`.

    Returns INCOMPLETE (None) when more bytes are needed; an int close code (ERR_PROTOCOL,
    ERR_TOO_BIG) when the frame breaks the rules or a data frame is longer than `max_size`
    (known from its header alone); otherwise (opcode, fin, payload, end): the unmasked payload
    as bytes and the position after the frame."""
    cdef Py_ssize_t n = data.shape[0]
    if n - pos < 2:
        return None
    cdef const uint8_t* p = &data[0] + pos
    cdef uint8_t b0 = p[0], b1 = p[1]
    cdef int opcode = b0 & 0x0F
    cdef int fin = b0 >> 7
    cdef Py_ssize_t head = 2
    cdef uint64_t size
    if (b0 & 0x70) or not (b1 & 0x80):
        return ERR_PROTOCOL
    if not (opcode <= 2 or 8 <= opcode <= 10):
        return ERR_PROTOCOL
    size = b1 & 0x7F
    if size == 126:
        if n - pos < 4:
            return None
        size = _be(p + 2, 2)
        head = 4
        if size < 126:
            return ERR_PROTOCOL
    elif size == 127:
        if n - pos < 10:
            return None
        size = _be(p + 2, 8)
        head = 10
        if size < 65536 or (size >> 63):
            return ERR_PROTOCOL
    if opcode >= 8:
        if size > 125 or not fin:
            return ERR_PROTOCOL
    elif size > <uint64_t>max_size:
        return ERR_TOO_BIG
    cdef Py_ssize_t avail = n - pos - head - 4
    if avail < 0 or <uint64_t>avail < size:
        return None
    cdef bytes payload = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>size)
    _unmask_into(<uint8_t*>PyBytes_AS_STRING(payload), p + head + 4, <Py_ssize_t>size, p + head)
    return opcode, fin, payload, pos + head + 4 + <Py_ssize_t>size


def unmask(bytes payload not None, bytes mask not None):
    """XOR `payload` with the 4-byte `mask` repeated (RFC 6455 5.3)."""
    if PyBytes_GET_SIZE(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    _unmask_into(<uint8_t*>PyBytes_AS_STRING(out), <const uint8_t*>PyBytes_AS_STRING(payload), n,
                 <const uint8_t*>PyBytes_AS_STRING(mask))
    return out


def frame_needs(const uint8_t[::1] data, Py_ssize_t pos):
    """How many bytes the frame starting at `data[pos]` occupies in all, from its header; 0 when
    even the header is incomplete."""
    cdef Py_ssize_t n = data.shape[0]
    if n - pos < 2:
        return 0
    cdef const uint8_t* p = &data[0] + pos
    cdef uint64_t size = p[1] & 0x7F
    cdef Py_ssize_t head = 2
    if size == 126:
        if n - pos < 4:
            return 0
        size = _be(p + 2, 2)
        head = 4
    elif size == 127:
        if n - pos < 10:
            return 0
        size = _be(p + 2, 8)
        head = 10
        if size > <uint64_t>(INT64_MAX - 14):
            return INT64_MAX  # read_frame refuses such a length anyway
    return head + (4 if p[1] & 0x80 else 0) + <Py_ssize_t>size


# MessagePack pieces


cdef inline Py_ssize_t _uint_size(uint64_t v) noexcept:
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < 4294967296:
        return 5
    return 9


cdef inline uint8_t* _put_uint(uint8_t* out, uint64_t v) noexcept:
    if v < 128:
        out[0] = <uint8_t>v
        return out + 1
    if v < 256:
        out[0] = 0xCC
        out[1] = <uint8_t>v
        return out + 2
    if v < 65536:
        out[0] = 0xCD
        return _put_be(out + 1, v, 2)
    if v < 4294967296:
        out[0] = 0xCE
        return _put_be(out + 1, v, 4)
    out[0] = 0xCF
    return _put_be(out + 1, v, 8)


cdef inline Py_ssize_t _bin_header_size(Py_ssize_t n) noexcept:
    if n < 256:
        return 2
    if n < 65536:
        return 3
    return 5


cdef inline uint8_t* _put_bin_header(uint8_t* out, Py_ssize_t n) noexcept:
    if n < 256:
        out[0] = 0xC4
        out[1] = <uint8_t>n
        return out + 2
    if n < 65536:
        out[0] = 0xC5
        return _put_be(out + 1, <uint64_t>n, 2)
    out[0] = 0xC6
    return _put_be(out + 1, <uint64_t>n, 4)


cdef inline Py_ssize_t _array_header_size(Py_ssize_t n) noexcept:
    if n < 16:
        return 1
    if n < 65536:
        return 3
    return 5


cdef inline uint8_t* _put_array_header(uint8_t* out, Py_ssize_t n) noexcept:
    if n < 16:
        out[0] = <uint8_t>(0x90 | n)
        return out + 1
    if n < 65536:
        out[0] = 0xDC
        return _put_be(out + 1, <uint64_t>n, 2)
    out[0] = 0xDD
    return _put_be(out + 1, <uint64_t>n, 4)


cdef bytes _encode_batch(uint64_t topic_id, uint64_t first_seq, list payloads, Py_ssize_t start, Py_ssize_t stop):
    cdef Py_ssize_t i, size
    cdef Py_ssize_t count = stop - start
    cdef Py_ssize_t body = _array_header_size(count + 2) + _uint_size(topic_id) + _uint_size(first_seq)
    cdef object item
    for i in range(start, stop):
        item = <object>PyList_GET_ITEM(payloads, i)
        if type(item) is not bytes:
            raise TypeError("payloads must be bytes")
        size = PyBytes_GET_SIZE(item)
        body += _bin_header_size(size) + size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, body)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    p = _put_array_header(p, count + 2)
    p = _put_uint(p, topic_id)
    p = _put_uint(p, first_seq)
    for i in range(start, stop):
        item = <object>PyList_GET_ITEM(payloads, i)
        size = PyBytes_GET_SIZE(item)
        p = _put_bin_header(p, size)
        memcpy(p, PyBytes_AS_STRING(item), size)
        p += size
    return out


def encode_batch(uint64_t topic_id, uint64_t first_seq, list payloads not None):
    """A delivery batch: `[topic_id, first_seq, payload, payload, ...]`."""
    return _encode_batch(topic_id, first_seq, payloads, 0, PyList_GET_SIZE(payloads))


def encode_topic(uint64_t topic_id, str name not None, uint64_t epoch):
    """A topic announcement: `["topic", topic_id, name, epoch]`."""
    return _encode(("topic", topic_id, name, epoch))


cdef inline bint _is_batch(bytes piece) noexcept:
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(piece)
    cdef uint8_t first = p[0]
    cdef Py_ssize_t offset = 1 if first < 0xDC else (3 if first == 0xDC else 5)
    cdef uint8_t head = p[offset]
    return not (0xA0 <= head <= 0xBF or head == 0xD9 or head == 0xDA or head == 0xDB)


def is_batch(bytes piece not None):
    """True for a delivery batch, False for a whole message (its first element is a str)."""
    if PyBytes_GET_SIZE(piece) < 2:
        raise ValueError("not a piece")
    return _is_batch(piece)


cdef struct FrameInfo:
    Py_ssize_t start
    Py_ssize_t stop
    Py_ssize_t messages
    Py_ssize_t body


cdef inline Py_ssize_t _run_header_size(Py_ssize_t count) noexcept:
    return _array_header_size(count + 1) + 4


cdef bytes _assemble(list pieces, Py_ssize_t max_frame):
    cdef Py_ssize_t n = PyList_GET_SIZE(pieces)
    if n == 0:
        return b""
    cdef FrameInfo* frames = <FrameInfo*>PyMem_Malloc(n * sizeof(FrameInfo))
    if frames == NULL:
        raise MemoryError()
    cdef Py_ssize_t nframes = 0, i, j, j2, plen, cost, used, messages, body, run_count, total, count, outer
    cdef Py_ssize_t frame_start = 0
    cdef bint batch, in_run
    cdef bytes piece, out
    cdef uint8_t* p
    try:
        used = FRAME_ALLOWANCE
        in_run = False
        messages = 0
        body = 0
        run_count = 0
        for i in range(n):
            piece = <bytes>PyList_GET_ITEM(pieces, i)
            plen = PyBytes_GET_SIZE(piece)
            batch = _is_batch(piece)
            cost = plen + (RUN_ALLOWANCE if batch and not in_run else 0)
            if i > frame_start and used + cost > max_frame:
                if in_run:
                    body += _run_header_size(run_count)
                frames[nframes].start = frame_start
                frames[nframes].stop = i
                frames[nframes].messages = messages
                frames[nframes].body = body
                nframes += 1
                frame_start = i
                used = FRAME_ALLOWANCE
                in_run = False
                messages = 0
                body = 0
                run_count = 0
                cost = plen + (RUN_ALLOWANCE if batch else 0)
            if batch:
                if not in_run:
                    in_run = True
                    messages += 1
                    run_count = 0
                run_count += 1
            else:
                if in_run:
                    body += _run_header_size(run_count)
                    in_run = False
                messages += 1
            body += plen
            used += cost
        if in_run:
            body += _run_header_size(run_count)
        frames[nframes].start = frame_start
        frames[nframes].stop = n
        frames[nframes].messages = messages
        frames[nframes].body = body
        nframes += 1
        total = 0
        for j in range(nframes):
            outer = _array_header_size(frames[j].messages) + frames[j].body
            total += _header_size(outer) + outer
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        for j in range(nframes):
            outer = _array_header_size(frames[j].messages) + frames[j].body
            p = _put_header(p, outer, 0x2)
            p = _put_array_header(p, frames[j].messages)
            i = frames[j].start
            while i < frames[j].stop:
                piece = <bytes>PyList_GET_ITEM(pieces, i)
                if _is_batch(piece):
                    count = 1
                    while i + count < frames[j].stop and _is_batch(<bytes>PyList_GET_ITEM(pieces, i + count)):
                        count += 1
                    p = _put_array_header(p, count + 1)
                    p[0] = 0xA3
                    p[1] = 109  # m
                    p[2] = 115  # s
                    p[3] = 103  # g
                    p += 4
                    for j2 in range(i, i + count):
                        piece = <bytes>PyList_GET_ITEM(pieces, j2)
                        plen = PyBytes_GET_SIZE(piece)
                        memcpy(p, PyBytes_AS_STRING(piece), plen)
                        p += plen
                    i += count
                else:
                    plen = PyBytes_GET_SIZE(piece)
                    memcpy(p, PyBytes_AS_STRING(piece), plen)
                    p += plen
                    i += 1
        return out
    finally:
        PyMem_Free(frames)


def assemble(list pieces not None, Py_ssize_t max_frame):
    """Pack a connection's pieces into complete frames, in order (see the twin)."""
    cdef Py_ssize_t i
    for i in range(PyList_GET_SIZE(pieces)):
        item = <object>PyList_GET_ITEM(pieces, i)
        if type(item) is not bytes or PyBytes_GET_SIZE(item) < 2:
            raise TypeError("pieces must be encoded messages or batches")
    return _assemble(pieces, max_frame)


# Topics


cdef class TopicState:
    """One concrete topic: its id, epoch, last sequence number, this tick's pending batch and
    the subscription nodes that match it."""

    cdef public Py_ssize_t id
    cdef public str name
    cdef public bytes key
    cdef public object epoch
    cdef public long long seq
    cdef public list pending
    cdef public long long first
    cdef public bint dirty
    cdef public list nodes
    cdef public Py_ssize_t compacted
    cdef public bytes announce
    cdef public object history

    def __init__(self, Py_ssize_t topic_id, str name not None, epoch):
        if topic_id < 0:
            raise ValueError("topic id must not be negative")
        self.id = topic_id
        self.name = name
        self.key = name.encode()
        self.epoch = epoch
        self.seq = 0
        self.pending = []
        self.first = 0
        self.dirty = False
        self.nodes = _untracked_list([])
        self.compacted = 0
        self.announce = encode_topic(topic_id, name, epoch)
        self.history = None  # its HistoryLog, once a HistoryStore kept some of its messages


cdef inline void _stamp(TopicState state, bytes payload, list dirty) except *:
    state.seq += 1
    if not state.dirty:
        state.dirty = True
        state.first = state.seq
        dirty.append(state)
    state.pending.append(payload)


def stamp(TopicState state not None, bytes payload not None, list dirty not None):
    """Give `payload` the topic's next sequence number and add it to this tick's batch."""
    _stamp(state, payload, dirty)


def fanout_steps(list dirty not None, Py_ssize_t start):
    """The subscription nodes of the topics dirty[start:]: what their fan-out will visit."""
    cdef Py_ssize_t i, steps = 0
    for i in range(max(start, 0), len(dirty)):
        steps += len((<TopicState>dirty[i]).nodes)
    return steps


cdef inline Py_ssize_t _array_len(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos) noexcept:
    """Length of the canonical MessagePack array header at p[pos], advancing pos; -1 if none."""
    cdef Py_ssize_t i = pos[0], count
    if i >= n:
        return -1
    cdef uint8_t b = p[i]
    if 0x90 <= b <= 0x9F:
        pos[0] = i + 1
        return b & 0x0F
    if b == 0xDC and i + 3 <= n:
        count = <Py_ssize_t>((p[i + 1] << 8) | p[i + 2])
        if count < 16:
            return -1
        pos[0] = i + 3
        return count
    if b == 0xDD and i + 5 <= n:
        count = <Py_ssize_t>((<uint64_t>p[i + 1] << 24) | (p[i + 2] << 16) | (p[i + 3] << 8) | p[i + 4])
        if count < 65536:
            return -1
        pos[0] = i + 5
        return count
    return -1


def fast_publish(const uint8_t[::1] data, dict topics_by_key not None, Py_ssize_t max_payload, Py_ssize_t max_count, list dirty not None):
    """Apply a client frame made only of fire-and-forget publishes to known topics (at most
    `max_count` of them, payloads of at most `max_payload` bytes).

    Returns how many messages were published, or -1 when the frame holds anything else: then
    nothing was applied and the frame takes the general path (see the twin)."""
    cdef Py_ssize_t n = data.shape[0]
    if n < 2:
        return -1
    cdef const uint8_t* p = &data[0]
    cdef Py_ssize_t pos = 0, count, i, tlen, plen
    cdef uint8_t b
    cdef bint batch
    count = _array_len(p, n, &pos)
    if count <= 0:
        return -1
    batch = pos < n and (0x90 <= p[pos] <= 0x9F or p[pos] == 0xDC or p[pos] == 0xDD)
    if not batch:
        if count != 4 and count != 5:
            return -1
        count = 1
        pos = 0
    if count > max_count:
        return -1
    cdef list accepted = []
    cdef TopicState state = None
    cdef object found
    cdef bytes key, payload
    cdef bint with_msg_id
    for i in range(count):
        # ["pub", 0, topic, payload]: 94 a3 'p' 'u' 'b' 00, or ["pub", 0, topic, payload, ""]: 95 ...
        if pos + 6 > n or (p[pos] != 0x94 and p[pos] != 0x95) or p[pos + 1] != 0xA3 or p[pos + 2] != 112 \
                or p[pos + 3] != 117 or p[pos + 4] != 98 or p[pos + 5] != 0:
            return -1
        with_msg_id = p[pos] == 0x95
        pos += 6
        if pos >= n:
            return -1
        b = p[pos]
        if 0xA0 <= b <= 0xBF:
            tlen = b & 0x1F
            pos += 1
        elif b == 0xD9 and pos + 2 <= n and p[pos + 1] >= 32:
            tlen = p[pos + 1]
            pos += 2
        elif b == 0xDA and pos + 3 <= n:
            tlen = (p[pos + 1] << 8) | p[pos + 2]
            if tlen < 256:
                return -1
            pos += 3
        else:
            return -1
        if pos + tlen > n:
            return -1
        if state is None or PyBytes_GET_SIZE(state.key) != tlen or \
                memcmp(PyBytes_AS_STRING(state.key), p + pos, tlen) != 0:
            key = PyBytes_FromStringAndSize(<const char*>(p + pos), tlen)
            found = topics_by_key.get(key)
            if found is None:
                return -1
            state = <TopicState>found
        pos += tlen
        if pos >= n:
            return -1
        b = p[pos]
        if b == 0xC4 and pos + 2 <= n:
            plen = p[pos + 1]
            pos += 2
        elif b == 0xC5 and pos + 3 <= n:
            plen = (p[pos + 1] << 8) | p[pos + 2]
            if plen < 256:
                return -1
            pos += 3
        elif b == 0xC6 and pos + 5 <= n:
            plen = <Py_ssize_t>((<uint64_t>p[pos + 1] << 24) | (p[pos + 2] << 16) | (p[pos + 3] << 8) | p[pos + 4])
            if plen < 65536:
                return -1
            pos += 5
        else:
            return -1
        if plen > max_payload or pos + plen > n:
            return -1
        payload = PyBytes_FromStringAndSize(<const char*>(p + pos), plen)
        pos += plen
        if with_msg_id:  # only an empty msg_id (none): a real one needs the dedupe check
            if pos >= n or p[pos] != 0xA0:
                return -1
            pos += 1
        accepted.append(state)
        accepted.append(payload)
    if pos != n:
        return -1
    for i in range(0, PyList_GET_SIZE(accepted), 2):
        _stamp(<TopicState>PyList_GET_ITEM(accepted, i), <bytes>PyList_GET_ITEM(accepted, i + 1), dirty)
    return count


# The shape of a client frame, before it is decoded

FRAME_TOO_DEEP = -1
FRAME_LONG_ARRAY = -2
FRAME_LONG_MAP = -3
FRAME_TOO_MANY_VALUES = -4
FRAME_LONG_BATCH = -5

cdef enum:
    MAX_MEASURE_DEPTH = 64  # the most a caller may allow (the stack of open containers below)


cdef inline Py_ssize_t _head_body(const uint8_t* p, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t* count, bint* is_map) noexcept:
    """Size of the MessagePack head at p[pos] plus the bytes of its body (0 for a container,
    whose elements follow); sets `count` (elements or entries) for a container, else -1.
    Returns -1 when the head is cut off or is the unused byte 0xC1."""
    cdef uint8_t b = p[pos]
    cdef Py_ssize_t left = n - pos
    count[0] = -1
    is_map[0] = False
    if b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3:
        return 1
    if b <= 0x8F:
        count[0] = b & 0x0F
        is_map[0] = True
        return 1
    if b <= 0x9F:
        count[0] = b & 0x0F
        return 1
    if b <= 0xBF:
        return 1 + (b & 0x1F)
    if b == 0xC4 or b == 0xD9:
        if left < 2:
            return -1
        return 2 + p[pos + 1]
    if b == 0xC5 or b == 0xDA:
        if left < 3:
            return -1
        return 3 + <Py_ssize_t>_be(p + pos + 1, 2)
    if b == 0xC6 or b == 0xDB:
        if left < 5:
            return -1
        return 5 + <Py_ssize_t>_be(p + pos + 1, 4)
    if b == 0xC7:  # ext: the length, then a type byte
        if left < 3:
            return -1
        return 3 + p[pos + 1]
    if b == 0xC8:
        if left < 4:
            return -1
        return 4 + <Py_ssize_t>_be(p + pos + 1, 2)
    if b == 0xC9:
        if left < 6:
            return -1
        return 6 + <Py_ssize_t>_be(p + pos + 1, 4)
    if b == 0xCC or b == 0xD0:
        return 2
    if b == 0xCD or b == 0xD1:
        return 3
    if b == 0xCA or b == 0xCE or b == 0xD2:
        return 5
    if b == 0xCB or b == 0xCF or b == 0xD3:
        return 9
    if b == 0xD4:
        return 3
    if b == 0xD5:
        return 4
    if b == 0xD6:
        return 6
    if b == 0xD7:
        return 10
    if b == 0xD8:
        return 18
    if b == 0xDC or b == 0xDE:
        if left < 3:
            return -1
        count[0] = <Py_ssize_t>_be(p + pos + 1, 2)
        is_map[0] = b == 0xDE
        return 3
    if b == 0xDD or b == 0xDF:
        if left < 5:
            return -1
        count[0] = <Py_ssize_t>_be(p + pos + 1, 4)
        is_map[0] = b == 0xDF
        return 5
    return -1  # 0xC1, never used


def measure_frame(const uint8_t[::1] data, Py_ssize_t max_messages, Py_ssize_t max_fields, Py_ssize_t max_entries, int max_depth, Py_ssize_t max_values):
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
    if max_depth < 1 or max_depth >= MAX_MEASURE_DEPTH:
        raise ValueError(f"max_depth must be from 1 to {MAX_MEASURE_DEPTH - 1}")
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        return 0
    cdef const uint8_t* p = &data[0]
    cdef Py_ssize_t remaining[MAX_MEASURE_DEPTH]
    cdef Py_ssize_t pos = 0, values = 0, size, count
    cdef int depth = 0, limit_depth = max_depth
    cdef bint is_map, batch = False
    cdef uint8_t b
    # a batch: an array whose first element is an array, told by the bytes of the two heads
    # alone, as messages.batch_size does
    size = _head_body(p, n, 0, &count, &is_map)
    if size > 0 and count >= 0 and not is_map and size < n:
        b = p[size]
        if 0x90 <= b <= 0x9F or b == 0xDC or b == 0xDD:
            batch = True
            limit_depth = max_depth + 1
    while True:
        if pos >= n:
            return values  # cut off: the decoder explains
        size = _head_body(p, n, pos, &count, &is_map)
        if size < 0:
            return values
        values += 1
        if values > max_values:
            return FRAME_TOO_MANY_VALUES
        if count >= 0:
            if depth + 1 > limit_depth:
                return FRAME_TOO_DEEP
            if depth == 0 and batch:
                if count > max_messages:
                    return FRAME_LONG_BATCH
            elif is_map:
                if count > max_entries:
                    return FRAME_LONG_MAP
            elif count > max_fields:
                return FRAME_LONG_ARRAY
            pos += size
            if count:
                remaining[depth] = count * 2 if is_map else count
                depth += 1
                continue
        else:
            if size > n - pos:
                return values  # cut off
            pos += size
        # a value is complete: close every container it completes
        while depth:
            remaining[depth - 1] -= 1
            if remaining[depth - 1]:
                break
            depth -= 1
        if not depth:
            return values


# Topic-id bitmaps: which topics were announced to a connection, or to every solo member of a node


cdef struct Bits:
    uint8_t* data
    Py_ssize_t size


cdef inline bint _bits_has(Bits* bits, Py_ssize_t i) noexcept:
    cdef Py_ssize_t byte = i >> 3
    return byte < bits.size and (bits.data[byte] >> (i & 7)) & 1


cdef int _bits_grow(Bits* bits, Py_ssize_t size) except -1:
    cdef uint8_t* grown
    if size <= bits.size:
        return 0
    grown = <uint8_t*>PyMem_Realloc(bits.data, size)
    if grown == NULL:
        raise MemoryError()
    memset(grown + bits.size, 0, size - bits.size)
    bits.data = grown
    bits.size = size
    return 0


cdef int _bits_add(Bits* bits, Py_ssize_t i) except -1:
    cdef Py_ssize_t byte = i >> 3, size
    if byte >= bits.size:
        size = 16 if bits.size == 0 else bits.size
        while size <= byte:
            size *= 2
        _bits_grow(bits, size)
    bits.data[byte] |= <uint8_t>(1 << (i & 7))
    return 0


cdef int _bits_copy(Bits* dst, Bits* src) except -1:
    """dst = src"""
    if dst.size:
        memset(dst.data, 0, dst.size)
    _bits_grow(dst, src.size)
    if src.size:
        memcpy(dst.data, src.data, src.size)
    return 0


cdef void _bits_and(Bits* dst, Bits* src) noexcept:
    """dst &= src"""
    cdef Py_ssize_t i
    for i in range(dst.size):
        if i < src.size:
            dst.data[i] &= src.data[i]
        else:
            dst.data[i] = 0


cdef int _bits_or(Bits* dst, Bits* src) except -1:
    """dst |= src"""
    cdef Py_ssize_t i
    _bits_grow(dst, src.size)
    for i in range(src.size):
        dst.data[i] |= src.data[i]
    return 0


cdef inline void _bits_free(Bits* bits) noexcept:
    if bits.data != NULL:
        PyMem_Free(bits.data)
        bits.data = NULL
    bits.size = 0


# Outbound queue of one connection


cdef class Outbox:
    """One connection's pieces of this loop iteration (or of every iteration while its
    transport is paused), counted in bytes, and the topics announced on it; a solo member of
    the node of its only subscription reads this tick's batches from the node (see the twin)."""

    cdef public object owner
    cdef public list pieces
    cdef public Py_ssize_t size
    cdef public Py_ssize_t transport_bytes
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t hard_limit
    cdef public bint scheduled
    cdef public bint paused
    cdef public bint closed
    cdef public bint over
    cdef public unsigned long long mark
    cdef public unsigned long long sig
    cdef public double over_since
    cdef public Py_ssize_t nsubs
    cdef public Node solo_node
    cdef public Py_ssize_t offset
    cdef Bits known

    def __init__(self, object owner, Py_ssize_t limit, hard_limit=None):
        self.owner = owner
        self.pieces = []
        self.size = 0
        self.transport_bytes = 0
        self.limit = limit
        self.hard_limit = limit if hard_limit is None else hard_limit
        self.scheduled = False
        self.paused = False
        self.closed = False
        self.over = False
        self.mark = 0
        self.sig = SIG_SEED
        self.over_since = 0.0
        self.nsubs = 0
        self.solo_node = None
        self.offset = 0

    def __dealloc__(self):
        _bits_free(&self.known)

    cdef inline void _add(self, bytes piece) except *:
        PyList_Append(self.pieces, piece)
        self.size += PyBytes_GET_SIZE(piece)
        self.sig = (self.sig ^ <uint64_t><uintptr_t><PyObject*>piece) * SIG_PRIME

    cdef inline int _push(self, bytes piece) except -1:
        self._add(piece)
        if self.size + self.transport_bytes > self.hard_limit:
            self.over = True
            return True
        return False

    cpdef bint push(self, bytes piece):
        """Queue a piece; True when this push took the connection past its hard limit.

        Once past it (or closed) the outbox takes nothing more: the connection is being closed."""
        if piece is None:
            raise TypeError("piece must be bytes")
        if self.closed or self.over:
            return False
        return self._push(piece)

    def knows(self, Py_ssize_t topic_id):
        if topic_id < 0:
            return False
        cdef Node node = self.solo_node
        return _bits_has(&self.known, topic_id) or (node is not None and node.has_known and _bits_has(&node.known, topic_id))

    def introduce(self, TopicState state not None):
        """Queue the topic's announcement unless this connection knows its id already; True
        when that took it past its hard limit."""
        if self.closed or self.over or self.knows(state.id):
            return False
        _bits_add(&self.known, state.id)
        return self._push(state.announce)

    cpdef bytes take(self, Py_ssize_t max_frame, dict shared=None):
        """Everything queued, assembled into frames (b"" when nothing is queued); outboxes
        holding the very same pieces in the same order get the same bytes object, and the
        solo members of a node with nothing else get the node's frame."""
        cdef Node node = self.solo_node
        cdef Py_ssize_t count, i
        cdef bytes data = None
        if node is not None:
            count = PyList_GET_SIZE(node.pieces)
            if count > self.offset:
                if PyList_GET_SIZE(self.pieces) == 0 and self.offset == 0:
                    self.offset = count
                    if node.frame is None:
                        node.frame = _assemble(node.pieces, max_frame)
                    return node.frame
                for i in range(self.offset, count):
                    PyList_Append(self.pieces, <object>PyList_GET_ITEM(node.pieces, i))
                self.offset = count
                data = _assemble(self.pieces, max_frame)
                self.clear()
                return data
        cdef list pieces = self.pieces
        cdef Py_ssize_t n = PyList_GET_SIZE(pieces)
        if n == 0:
            return b""
        cdef object key = (self.sig, n)
        cdef object hit
        cdef list other
        if shared is not None:
            hit = shared.get(key)
            if hit is not None:
                other = <list>(<tuple>hit)[0]
                for i in range(n):
                    if PyList_GET_ITEM(other, i) != PyList_GET_ITEM(pieces, i):
                        break
                else:
                    data = <bytes>(<tuple>hit)[1]
        if data is None:
            data = _assemble(pieces, max_frame)
            if shared is not None:
                shared[key] = (pieces, data)
        self.pieces = []
        self.size = 0
        self.sig = SIG_SEED
        return data

    cpdef bint keep(self):
        """Move this tick's batches of its solo node into its own pieces (its transport is
        paused); True when that took it past its hard limit."""
        cdef Node node = self.solo_node
        cdef Py_ssize_t count, i
        if node is None or self.closed or self.over:
            return False
        count = PyList_GET_SIZE(node.pieces)
        if count <= self.offset:
            return False
        for i in range(self.offset, count):
            self._add(<bytes>PyList_GET_ITEM(node.pieces, i))
        self.offset = count
        if self.size + self.transport_bytes > self.hard_limit:
            self.over = True
            return True
        return False

    cpdef clear(self):
        self.pieces = []
        self.size = 0
        self.sig = SIG_SEED

    def replace(self, list pieces not None):
        """Queue `pieces` instead of what is queued (a slow-consumer policy shed some)."""
        for piece in pieces:
            if type(piece) is not bytes:
                raise TypeError("pieces must be bytes")
        self.clear()
        for piece in pieces:
            self._add(<bytes>piece)

    @property
    def pending(self):
        return self.size + self.transport_bytes


# Fan-out


def emit(TopicState state not None, unsigned long long emission, Py_ssize_t max_piece, list touched not None, list slow not None, list nodes_touched not None):
    """Encode the topic's pending batch once and queue it on every outbox of every node that
    matches the topic, each outbox once; a node's solo members get it once, through the node
    (see the twin). Returns how many outboxes received it."""
    return _emit(state, emission, max_piece, touched, slow, nodes_touched)


def emit_all(list dirty not None, unsigned long long emission, Py_ssize_t max_piece, list touched not None, list slow not None, list nodes_touched not None, HistoryStore history=None, long long now_ms=0):
    """`emit` every topic of `dirty` that has pending messages, with emission numbers from
    `emission` + 1 on. Returns (the last emission number used, messages emitted, batches
    encoded for at least one receiver, deliveries: messages times receivers). With `history`,
    each emitted batch is also retained there (at time `now_ms`)."""
    cdef Py_ssize_t i, count, receivers, published = 0, batches = 0, delivered = 0
    cdef TopicState state
    for i in range(PyList_GET_SIZE(dirty)):
        state = <TopicState>PyList_GET_ITEM(dirty, i)
        count = PyList_GET_SIZE(state.pending)
        if count == 0:
            continue
        emission += 1
        if history is not None:
            history._retain(state, state.first, state.pending, now_ms)
        receivers = _emit(state, emission, max_piece, touched, slow, nodes_touched)
        published += count
        if receivers:
            batches += 1
            delivered += count * receivers
    return emission, published, batches, delivered


cdef Py_ssize_t _emit(TopicState state, unsigned long long emission, Py_ssize_t max_piece, list touched, list slow, list nodes_touched) except -1:
    cdef list payloads = state.pending
    state.pending = []
    state.dirty = False
    cdef list nodes = state.nodes
    cdef Py_ssize_t npay = PyList_GET_SIZE(payloads)
    cdef Py_ssize_t nnodes = PyList_GET_SIZE(nodes)
    if nnodes == 0 or npay == 0:
        return 0
    cdef list pieces = []
    cdef Py_ssize_t i, start = 0, size = 0, plen
    cdef object item
    for i in range(npay):
        item = <object>PyList_GET_ITEM(payloads, i)
        if type(item) is not bytes:
            raise TypeError("payloads must be bytes")
        plen = PyBytes_GET_SIZE(item) + 5
        size += plen
        if size > max_piece and i > start:
            pieces.append(_encode_batch(state.id, state.first + start, payloads, start, i))
            start = i
            size = plen
    pieces.append(_encode_batch(state.id, state.first + start, payloads, start, npay))
    cdef Py_ssize_t npieces = PyList_GET_SIZE(pieces), k, receivers = 0, pos
    cdef Py_ssize_t topic_id = state.id
    cdef bytes announce = state.announce
    cdef bytes piece0 = <bytes>PyList_GET_ITEM(pieces, 0)
    cdef Node node
    cdef Outbox box
    cdef PyObject* key
    cdef PyObject* value
    cdef dict members
    cdef bint dead = False
    for i in range(nnodes):
        node = <Node>PyList_GET_ITEM(nodes, i)
        if node.dead:
            dead = True
            continue
        if node.solo:
            if PyList_GET_SIZE(node.pieces) == 0:
                nodes_touched.append(node)
            if not _bits_has(&node.known, topic_id):
                _bits_add(&node.known, topic_id)
                node.pieces.append(announce)
            for k in range(npieces):
                node.pieces.append(<object>PyList_GET_ITEM(pieces, k))
            receivers += len(node.solo)
        members = node.members
        pos = 0
        while PyDict_Next(members, &pos, &key, &value):
            box = <Outbox>key
            if box.mark == emission or box.closed or box.over:
                continue
            box.mark = emission
            receivers += 1
            if not box.scheduled:
                box.scheduled = True
                touched.append(box)
            if not _bits_has(&box.known, topic_id):
                _bits_add(&box.known, topic_id)
                if box._push(announce):
                    slow.append(box)
                    continue
            if box._push(piece0):
                slow.append(box)
                continue
            for k in range(1, npieces):
                if box._push(<bytes>PyList_GET_ITEM(pieces, k)):
                    slow.append(box)
                    break
    if dead:
        _compact(state)
    return receivers


def schedule_solo(list nodes not None, list touched not None):
    """Append the solo members of `nodes` to `touched`, each once, skipping closed ones."""
    cdef Node node
    cdef Outbox box
    cdef PyObject* key
    cdef PyObject* value
    cdef Py_ssize_t i, pos
    for i in range(PyList_GET_SIZE(nodes)):
        node = <Node>PyList_GET_ITEM(nodes, i)
        pos = 0
        while PyDict_Next(node.solo, &pos, &key, &value):
            box = <Outbox>key
            if not box.scheduled and not box.closed:
                box.scheduled = True
                touched.append(box)


def end_tick(list nodes not None):
    """After every outbox of the tick was taken or kept: the nodes forget the tick's pieces."""
    cdef Node node
    cdef Outbox box
    cdef PyObject* key
    cdef PyObject* value
    cdef Py_ssize_t i, pos
    for i in range(PyList_GET_SIZE(nodes)):
        node = <Node>PyList_GET_ITEM(nodes, i)
        node.pieces = []
        node.frame = None
        pos = 0
        while PyDict_Next(node.solo, &pos, &key, &value):
            (<Outbox>key).offset = 0


cdef void _compact(TopicState state) except *:
    cdef list live = _untracked_list([])
    cdef Node node
    for node in state.nodes:
        if not node.dead:
            live.append(node)
    state.nodes = live
    state.compacted = PyList_GET_SIZE(live)


cdef void _add_node(TopicState state, Node node) except *:
    if PyList_GET_SIZE(state.nodes) >= 2 * state.compacted + 16:
        _compact(state)
    state.nodes.append(node)


# History: each topic's recent messages, for recovery and last values


cdef Py_ssize_t MESSAGE_OVERHEAD_ = 48
cdef Py_ssize_t CHUNK_OVERHEAD_ = 120
cdef long long BUCKET_MS_ = 1000
MESSAGE_OVERHEAD = MESSAGE_OVERHEAD_
CHUNK_OVERHEAD = CHUNK_OVERHEAD_
BUCKET_MS = BUCKET_MS_


@cython.final
@cython.no_gc
cdef class HistoryChunk:
    """Consecutive messages of one topic retained within one time bucket (BUCKET_MS from its
    first); `log` is None once it is no longer retained.

    History is not visited by the cyclic garbage collector (no_gc here and on HistoryLog, the
    payload lists and the deque untracked): thousands of chunks created each second made its
    passes frequent and long, which showed as latency spikes. The one cycle, a chunk and its
    log while the chunk is retained, is broken when the chunk is dropped (`drop_head`), and a
    topic's log is emptied when the topic retires."""

    cdef public long long first
    cdef public list payloads
    cdef public Py_ssize_t sizes
    cdef public long long time
    cdef public long long last
    cdef public object log

    def __init__(self, long long first, list payloads not None, Py_ssize_t sizes, long long time_ms, log):
        self.first = first
        self.payloads = payloads
        self.sizes = sizes
        self.time = time_ms
        self.last = time_ms
        self.log = log


@cython.final
@cython.no_gc
cdef class HistoryLog:
    """One topic's retained messages: chunks of consecutive sequence numbers, the first one
    possibly cut (`skip` messages of it are gone)."""

    cdef public object chunks
    cdef public HistoryChunk tail
    cdef public Py_ssize_t skip
    cdef public Py_ssize_t count
    cdef public Py_ssize_t size
    cdef public long long trimmed_time

    def __init__(self):
        self.chunks = deque()
        PyObject_GC_UnTrack(<void*>self.chunks)
        self.tail = None
        self.skip = 0
        self.count = 0
        self.size = 0
        self.trimmed_time = -1

    def first_seq(self):
        """The sequence number of the oldest retained message (0 when none is)."""
        if not self.chunks:
            return 0
        return (<HistoryChunk>self.chunks[0]).first + self.skip


cdef class HistoryStore:
    """Every topic's HistoryLog (on `TopicState.history`), bounded per topic by messages and
    bytes as batches are retained; `order` holds every chunk, oldest first, for the bounds by
    age and in total that its owner applies (see the twin)."""

    cdef public object order
    cdef public Py_ssize_t total
    cdef public Py_ssize_t stale
    cdef public Py_ssize_t trimmed
    cdef public Py_ssize_t max_messages
    cdef public Py_ssize_t max_bytes

    def __init__(self, Py_ssize_t max_messages, Py_ssize_t max_bytes):
        self.order = deque()
        self.total = 0
        self.stale = 0
        self.trimmed = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes

    def retain(self, TopicState state not None, long long first, list payloads not None, long long now_ms):
        """Keep a batch of the topic (its list is kept, not copied: the caller lets go of it)."""
        self._retain(state, first, payloads, now_ms)

    cdef int _retain(self, TopicState state, long long first, list payloads, long long now_ms) except -1:
        cdef HistoryLog log = <HistoryLog>state.history if state.history is not None else None
        if log is None:
            log = HistoryLog()
            state.history = log
        cdef Py_ssize_t n = PyList_GET_SIZE(payloads), i, size = MESSAGE_OVERHEAD_ * n
        cdef object item
        for i in range(n):
            item = <object>PyList_GET_ITEM(payloads, i)
            if type(item) is not bytes:
                raise TypeError("payloads must be bytes")
            size += PyBytes_GET_SIZE(item)
        cdef HistoryChunk tail = log.tail
        if tail is not None and tail.log is not None and now_ms - tail.time < BUCKET_MS_ \
                and tail.first + PyList_GET_SIZE(tail.payloads) == first:
            tail.payloads.extend(payloads)
            tail.sizes += size
            tail.last = now_ms
        else:
            size += CHUNK_OVERHEAD_
            # a list of bytes is part of no cycle: the collector need not walk it (thousands
            # of retained lists made its full passes long: latency spikes)
            tail = HistoryChunk(first, _untracked_list(payloads), size, now_ms, log)
            log.chunks.append(tail)
            log.tail = tail
            self.order.append(tail)
        log.count += n
        log.size += size
        self.total += size
        if log.count > self.max_messages or log.size > self.max_bytes:
            self._trim(log)
        return 0

    cdef int _trim(self, HistoryLog log) except -1:
        cdef Py_ssize_t excess = log.count - self.max_messages, remaining
        cdef HistoryChunk head
        while excess > 0:
            head = <HistoryChunk>log.chunks[0]
            remaining = PyList_GET_SIZE(head.payloads) - log.skip
            if remaining <= excess:
                self.drop_head(log)
                self.stale += 1
                excess -= remaining
                continue
            self._cut(log, head, excess)
            excess = 0
        while log.size > self.max_bytes:
            head = <HistoryChunk>log.chunks[0]
            if PyList_GET_SIZE(head.payloads) - log.skip == 1:
                self.drop_head(log)
                self.stale += 1
            else:
                self._cut(log, head, 1)
        return 0

    cdef int _cut(self, HistoryLog log, HistoryChunk head, Py_ssize_t count) except -1:
        cdef Py_ssize_t skip = log.skip, i, freed = MESSAGE_OVERHEAD_ * count
        for i in range(skip, skip + count):
            freed += PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(head.payloads, i))
        skip += count
        log.count -= count
        log.size -= freed
        head.sizes -= freed
        self.total -= freed
        self.trimmed += count
        if head.last > log.trimmed_time:
            log.trimmed_time = head.last
        if skip > 64 and 2 * skip > PyList_GET_SIZE(head.payloads):
            head.payloads = _untracked_list(head.payloads[skip:])
            head.first += skip
            skip = 0
        log.skip = skip
        return 0

    cpdef drop_head(self, HistoryLog log):
        """Forget the topic's oldest chunk (what is left of it)."""
        cdef HistoryChunk chunk = <HistoryChunk>log.chunks.popleft()
        cdef Py_ssize_t dropped = PyList_GET_SIZE(chunk.payloads) - log.skip
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


# Who receives which topic


cdef class Node:
    """One distinct subscription string (a topic or a pattern), the outboxes holding it (solo
    members apart), this tick's pieces for the solo members and the topics every solo member
    was announced (see the twin); dead once the last one left."""

    cdef public str pattern
    cdef public dict members
    cdef public dict solo
    cdef public list pieces
    cdef public object frame
    cdef public bint dead
    cdef bint has_known
    cdef Bits known

    def __init__(self, str pattern not None):
        self.pattern = pattern
        self.members = {}
        self.solo = {}
        self.pieces = []
        self.frame = None
        self.dead = False
        self.has_known = False

    def __dealloc__(self):
        _bits_free(&self.known)


@cython.no_gc
cdef class _PatternTrie:
    cdef dict children
    cdef _PatternTrie star
    cdef Node here
    cdef Node rest

    def __init__(self):
        self.children = {}
        self.star = None
        self.here = None
        self.rest = None

    cdef bint empty(self):
        return not self.children and self.star is None and self.here is None and self.rest is None


@cython.no_gc
cdef class _TopicTrie:
    cdef dict children
    cdef TopicState state
    cdef Py_ssize_t height

    def __init__(self):
        self.children = {}
        self.state = None
        self.height = 0


cdef inline bint _is_pattern(str name):
    return "*" in name or ">" in name


cdef bint _matches(list pattern, list tokens):
    cdef Py_ssize_t n = PyList_GET_SIZE(tokens), i
    cdef str token
    for i in range(PyList_GET_SIZE(pattern)):
        token = <str>PyList_GET_ITEM(pattern, i)
        if token == ">":
            return n > i
        if i >= n or (token != "*" and token != <str>PyList_GET_ITEM(tokens, i)):
            return False
    return PyList_GET_SIZE(pattern) == n


cdef class _Excluding:
    """A subscription string with exclusions, `PATTERN !DENIED ...` (see the twin)."""

    cdef Node node
    cdef list base
    cdef list excluded

    def __init__(self, str pattern, Node node=None):
        cdef list parts = pattern.split(" !")
        self.node = node
        self.base = (<str>parts[0]).split(".")
        self.excluded = [(<str>part).split(".") for part in parts[1:]]

    cdef bint matches(self, list tokens):
        if not _matches(self.base, tokens):
            return False
        for excluded in self.excluded:
            if _matches(<list>excluded, tokens):
                return False
        return True


cdef class Index:
    """Subscriptions and topics, kept so that every topic's `nodes` list holds the live nodes
    that match it (see the twin). `work` counts trie nodes visited and topic lists changed."""

    cdef public dict exact
    cdef _PatternTrie root
    cdef public dict topics
    cdef public dict by_key
    cdef public list states
    cdef _TopicTrie _topic_root
    cdef public Py_ssize_t patterns
    cdef public dict excluding
    cdef public Py_ssize_t subscriptions
    cdef public Py_ssize_t work

    def __init__(self):
        self.exact = {}
        self.root = _PatternTrie()
        self.topics = {}
        self.by_key = {}
        self.states = []
        self._topic_root = _TopicTrie()
        self.patterns = 0
        self.excluding = {}
        self.subscriptions = 0
        self.work = 0

    def __len__(self):
        return self.subscriptions

    # topics

    def add_topic(self, TopicState state not None):
        """Register a new topic (`state.id` one no topic of the index had; see the twin) and
        find the nodes that match it."""
        if state.id < 0 or state.id < PyList_GET_SIZE(self.states) and self.states[state.id] is not None or state.name in self.topics:
            raise ValueError(f"topic {state.name!r} with id {state.id} does not fit the index")
        cdef list tokens = state.name.split(".")
        cdef list nodes = _untracked_list([])
        node = self.exact.get(state.name)
        if node is not None:
            nodes.append(node)
        if self.patterns:
            self._collect(self.root, tokens, 0, nodes)
        cdef _Excluding entry
        if self.excluding:
            for value in self.excluding.values():
                entry = <_Excluding>value
                self.work += 1
                if entry.matches(tokens):
                    nodes.append(entry.node)
        state.nodes = nodes
        state.compacted = PyList_GET_SIZE(nodes)
        cdef _TopicTrie trie = self._topic_root, child
        cdef Py_ssize_t depth = PyList_GET_SIZE(tokens)
        for token in tokens:
            if trie.height < depth:
                trie.height = depth
            depth -= 1
            child = trie.children.get(token)
            if child is None:
                child = _TopicTrie()
                trie.children[token] = child
            trie = child
        trie.state = state
        self.work += PyList_GET_SIZE(tokens)
        self.topics[state.name] = state
        self.by_key[state.key] = state
        self._place(state)

    def retire(self, TopicState state not None):
        """Forget a topic that no live subscription matches: its name may come back as a new
        topic with a new id (ids are never used again; a retired id's slot in `states` is None)."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        cdef Node node
        for node in state.nodes:
            if not node.dead:
                raise ValueError(f"topic {state.name!r} has subscribers")
        cdef list tokens = state.name.split(".")
        cdef list path = []
        cdef _TopicTrie trie = self._topic_root, child
        for token in tokens:
            path.append((trie, token))
            trie = <_TopicTrie>trie.children[token]
        trie.state = None
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(path) - 1, -1, -1):
            parent, token = path[i]
            child = <_TopicTrie>(<_TopicTrie>parent).children[token]
            if child.state is not None or child.children:
                break
            del (<_TopicTrie>parent).children[token]
        del self.topics[state.name]
        del self.by_key[state.key]
        self.states[state.id] = None
        state.nodes = _untracked_list([])
        state.compacted = 0
        self.work += PyList_GET_SIZE(tokens)

    cdef void _place(self, TopicState state) except *:
        cdef list states = self.states
        cdef Py_ssize_t size = PyList_GET_SIZE(states)
        if state.id >= size:
            states.extend([None] * (state.id + 1 - size))
        states[state.id] = state

    def renew(self, TopicState state not None, epoch, Py_ssize_t topic_id):
        """Start a new epoch of a topic: a new state with the new id `topic_id` takes the old
        one's place and its subscription nodes; the old id is retired (see the twin)."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if topic_id < 0 or topic_id < PyList_GET_SIZE(self.states) and self.states[topic_id] is not None:
            raise ValueError(f"topic id {topic_id} is taken")
        cdef TopicState fresh = TopicState(topic_id, state.name, epoch)
        fresh.nodes = state.nodes
        fresh.compacted = state.compacted
        cdef list tokens = state.name.split(".")
        cdef _TopicTrie trie = self._topic_root
        for token in tokens:
            trie = <_TopicTrie>trie.children[token]
        trie.state = fresh
        self.topics[state.name] = fresh
        self.by_key[state.key] = fresh
        self.states[state.id] = None
        self._place(fresh)
        state.nodes = _untracked_list([])
        state.compacted = 0
        self.work += PyList_GET_SIZE(tokens)
        return fresh

    cdef void _collect(self, _PatternTrie trie, list tokens, Py_ssize_t i, list out) except *:
        cdef Py_ssize_t n = PyList_GET_SIZE(tokens)
        cdef object child
        while True:
            self.work += 1
            if trie.rest is not None and i < n:
                out.append(trie.rest)
            if i == n:
                if trie.here is not None:
                    out.append(trie.here)
                return
            child = trie.children.get(<object>PyList_GET_ITEM(tokens, i))
            if trie.star is not None:
                if child is not None:
                    self._collect(<_PatternTrie>child, tokens, i + 1, out)
                trie = trie.star
            elif child is not None:
                trie = <_PatternTrie>child
            else:
                return
            i += 1

    def matching(self, str pattern not None):
        """The topics that match `pattern` (a topic, a pattern, or a pattern with exclusions),
        found through the topic trie."""
        cdef _Excluding entry
        if " " in pattern:
            entry = _Excluding(pattern)
            return [state for state in self._matching_topics(pattern.partition(" ")[0]) if entry.matches((<TopicState>state).name.split("."))]
        return self._matching_topics(pattern)

    cdef list _matching_topics(self, str pattern):
        cdef list out = []
        self._match_topics(self._topic_root, pattern.split("."), 0, out)
        return out

    cdef void _match_topics(self, _TopicTrie trie, list tokens, Py_ssize_t i, list out) except *:
        self.work += 1
        if trie.height < PyList_GET_SIZE(tokens) - i:
            return
        if i == PyList_GET_SIZE(tokens):
            if trie.state is not None:
                out.append(trie.state)
            return
        cdef str token = <str>PyList_GET_ITEM(tokens, i)
        cdef object child
        if token == ">":
            for child in trie.children.values():
                self._subtree(<_TopicTrie>child, out)
        elif token == "*":
            for child in trie.children.values():
                self._match_topics(<_TopicTrie>child, tokens, i + 1, out)
        else:
            child = trie.children.get(token)
            if child is not None:
                self._match_topics(<_TopicTrie>child, tokens, i + 1, out)

    cdef void _subtree(self, _TopicTrie trie, list out) except *:
        self.work += 1
        if trie.state is not None:
            out.append(trie.state)
        cdef object child
        for child in trie.children.values():
            self._subtree(<_TopicTrie>child, out)

    # subscriptions

    def subscribe(self, str pattern not None, Outbox box not None):
        """Add `box` to the node of `pattern`; False when it is already there (see the twin)."""
        cdef Node node = self._node(pattern, True), old
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

    def unsubscribe(self, str pattern not None, Outbox box not None):
        """Remove `box` from the node of `pattern`; False when it was not there."""
        cdef Node node = self._node(pattern, False)
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

    def settle(self, str pattern not None, Outbox box not None):
        """`box` holds `pattern` as its only subscription now: make it a solo member."""
        cdef Node node = self._node(pattern, False)
        if node is not None and box.nsubs == 1 and box in node.members:
            del node.members[box]
            self._join_solo(node, box)

    cdef void _join_solo(self, Node node, Outbox box) except *:
        cdef Py_ssize_t i, bit
        cdef uint8_t missing
        if not node.solo:
            _bits_copy(&node.known, &box.known)
            node.has_known = True
        else:
            for i in range(node.known.size):
                missing = node.known.data[i] & ~(box.known.data[i] if i < box.known.size else 0)
                if missing:
                    for bit in range(8):
                        if (missing >> bit) & 1 and self.states[i * 8 + bit] is not None:
                            box._add((<TopicState>self.states[i * 8 + bit]).announce)
                            self.work += 1
            _bits_or(&box.known, &node.known)
        node.solo[box] = None
        box.solo_node = node
        box.offset = PyList_GET_SIZE(node.pieces)

    cdef void _leave_solo(self, Node node, Outbox box) except *:
        cdef Py_ssize_t i
        del node.solo[box]
        if not box.closed:
            for i in range(box.offset, PyList_GET_SIZE(node.pieces)):
                box._add(<bytes>PyList_GET_ITEM(node.pieces, i))
            _bits_or(&box.known, &node.known)
        box.solo_node = None
        box.offset = 0
        if not node.solo:
            _bits_free(&node.known)
            node.has_known = False

    def node(self, str pattern not None):
        """The node of `pattern`, if anyone holds it."""
        return self._node(pattern, False)

    def receivers(self, str name not None):
        """The outboxes a message of topic `name` reaches now, each once (for tests and
        introspection; the hot path reads `state.nodes`)."""
        cdef list nodes
        state = self.topics.get(name)
        if state is not None:
            nodes = (<TopicState>state).nodes
        else:
            nodes = []
            node = self.exact.get(name)
            if node is not None:
                nodes.append(node)
            self._collect(self.root, name.split("."), 0, nodes)
            nodes += [(<_Excluding>entry).node for entry in self.excluding.values() if (<_Excluding>entry).matches(name.split("."))]
        seen = {}
        for node in nodes:
            if not (<Node>node).dead:
                for box in (<Node>node).solo:
                    seen[box] = None
                for box in (<Node>node).members:
                    seen[box] = None
        return list(seen)

    cdef Node _node(self, str pattern, bint create):
        cdef Node node
        cdef _PatternTrie trie
        cdef object child
        cdef _Excluding entry
        if " " in pattern:
            found = self.excluding.get(pattern)
            if found is None:
                if not create:
                    return None
                entry = _Excluding(pattern, Node(pattern))
                self.excluding[pattern] = entry
                for state in self._matching_topics(pattern.partition(" ")[0]):
                    self.work += 1
                    if entry.matches((<TopicState>state).name.split(".")):
                        _add_node(<TopicState>state, entry.node)
                return entry.node
            return (<_Excluding>found).node
        if not _is_pattern(pattern):
            found = self.exact.get(pattern)
            if found is None:
                if not create:
                    return None
                node = Node(pattern)
                self.exact[pattern] = node
                state = self.topics.get(pattern)
                if state is not None:
                    _add_node(<TopicState>state, node)
                    self.work += 1
                return node
            return <Node>found
        trie = self.root
        for token in pattern.split("."):
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
                    child = _PatternTrie()
                    trie.children[token] = child
                trie = <_PatternTrie>child
        if trie.here is None and create:
            trie.here = self._attach(Node(pattern))
        return trie.here

    cdef Node _attach(self, Node node):
        self.patterns += 1
        for state in self._matching_topics(node.pattern):
            _add_node(<TopicState>state, node)
            self.work += 1
        return node

    cdef void _drop(self, Node node) except *:
        node.dead = True
        cdef str pattern = node.pattern
        if " " in pattern:
            del self.excluding[pattern]
            return
        if not _is_pattern(pattern):
            del self.exact[pattern]
            return
        self.patterns -= 1
        cdef list tokens = pattern.split(".")
        cdef Py_ssize_t last = PyList_GET_SIZE(tokens) - 1
        cdef bint rest = tokens[last] == ">"
        cdef list path = tokens[:last] if rest else tokens
        cdef list chain = [self.root]
        cdef _PatternTrie trie = self.root, parent
        for token in path:
            trie = trie.star if token == "*" else <_PatternTrie>trie.children[token]
            chain.append(trie)
        if rest:
            trie.rest = None
        else:
            trie.here = None
        cdef Py_ssize_t depth
        for depth in range(PyList_GET_SIZE(path), 0, -1):
            trie = <_PatternTrie>chain[depth]
            if not trie.empty():
                return
            parent = <_PatternTrie>chain[depth - 1]
            token = path[depth - 1]
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]


# The cluster backplane's per-topic work (broker.cluster.streams): staging a tick's pending
# batches into one block per shard for its next write, and taking numbered batches back into
# the topics' pending batches. Both run for every topic a tick or a stream entry touches.

cdef object _crc32 = __import__("zlib").crc32


cdef class Block:
    """What one shard gets in one write: per topic its payloads in order (`topics`), and the
    acks waiting for their numbers (`waiters`: topic, index in its payloads, ok, fail, msg_id)."""

    cdef public Py_ssize_t shard
    cdef public dict topics
    cdef public Py_ssize_t size
    cdef public Py_ssize_t count
    cdef public list waiters
    cdef public double staged
    cdef public long long write
    cdef public bint sent
    cdef public object epoch
    cdef public bint answered

    def __init__(self, Py_ssize_t shard, double staged):
        self.shard = shard
        self.topics = {}
        self.size = 0
        self.count = 0
        self.waiters = []
        self.staged = staged
        self.write = 0
        self.sent = False
        self.epoch = 0
        self.answered = False


def stage(list states not None, list filling not None, list full_of not None, dict waiting not None, Py_ssize_t shards, double now, Py_ssize_t block_bytes):
    """Take the topics' pending batches into the block each one's shard is filling
    (`filling[shard]`, made when there is none), and give each topic back the sequence number
    it had. The acks waiting for a topic's messages (`waiting[state]`: provisional seq, ok,
    fail, msg_id) move to the block with their index in its payloads. A block that reaches
    `block_bytes` goes to `full_of[shard]`. Returns (messages taken, their bytes, blocks made)."""
    cdef TopicState state
    cdef Block block
    cdef Py_ssize_t taken = 0, size_all = 0, made = 0, shard, count, size, base, i
    cdef list pending, payloads, mine
    cdef object item
    for item in states:
        state = <TopicState>item
        pending = state.pending
        state.dirty = False
        count = PyList_GET_SIZE(pending)
        if not count:
            continue
        shard = _crc32(state.key) % shards
        item = filling[shard]
        if item is None:
            block = Block(shard, now)
            filling[shard] = block
            made += 1
        else:
            block = <Block>item
        item = block.topics.get(state.name)
        if item is None:
            payloads = []
            block.topics[state.name] = payloads
        else:
            payloads = <list>item
        base = PyList_GET_SIZE(payloads) - state.first
        payloads.extend(pending)
        size = 0
        for i in range(count):
            size += PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(pending, i))
        block.size += size
        block.count += count
        size_all += size
        if waiting:
            item = waiting.pop(state, None)
            if item is not None:
                mine = <list>item
                for seq, ok, fail, msg_id in mine:
                    block.waiters.append((state.name, base + seq, ok, fail, msg_id))
        state.seq -= count
        state.pending = []
        taken += count
        if block.size >= block_bytes:
            (<list>full_of[shard]).append(block)
            filling[shard] = None
    return taken, size_all, made


def arrive(list entries not None, dict topics not None, list arrived not None, object other):
    """Numbered batches from a backplane's log, in its order (`entries`: (epoch, [(topic,
    payloads), ...], [first seq, ...])), into the topics' pending batches: a batch that
    follows its topic's last number in its epoch is added (the topic joins `arrived` when it
    was not dirty); any other (a topic unknown here, another epoch, a repeat, numbers skipped)
    goes to `other(topic, epoch, payloads, first)`, which returns the messages it took.
    Returns the messages taken."""
    cdef Py_ssize_t taken = 0, count, i, n
    cdef TopicState state
    cdef long long first
    cdef list batches, firsts, payloads
    cdef object item
    for entry in entries:
        epoch, batches, firsts = entry
        n = PyList_GET_SIZE(batches)
        for i in range(n):
            name, payloads = <tuple>PyList_GET_ITEM(batches, i)
            first = <object>PyList_GET_ITEM(firsts, i)
            item = topics.get(name)
            if item is None:
                taken += other(name, epoch, payloads, first)
                continue
            state = <TopicState>item
            if first != state.seq + 1 or state.epoch != epoch:
                taken += other(name, epoch, payloads, first)
                continue
            count = PyList_GET_SIZE(payloads)
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
