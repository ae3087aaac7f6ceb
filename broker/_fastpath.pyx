# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path. `_fastpath_py.py` is its specification: same API, same bytes."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memcpy


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


cdef inline uint8_t* _put_header(uint8_t* out, Py_ssize_t size) noexcept:
    out[0] = 0x82
    if size < 126:
        out[1] = <uint8_t>size
        return out + 2
    if size < 65536:
        out[1] = 126
        return _put_be(out + 2, <uint64_t>size, 2)
    out[1] = 127
    return _put_be(out + 2, <uint64_t>size, 8)


cpdef bytes frame_header(Py_ssize_t size):
    """Header of a final binary frame carrying `size` bytes, server side (no mask)."""
    if size < 0:
        raise ValueError("frame size must not be negative")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(size))
    _put_header(<uint8_t*>PyBytes_AS_STRING(out), size)
    return out


def encode_frame(bytes payload not None):
    """One complete binary WebSocket frame holding `payload`."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(size) + size)
    cdef uint8_t* p = _put_header(<uint8_t*>PyBytes_AS_STRING(out), size)
    memcpy(p, PyBytes_AS_STRING(payload), size)
    return out


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


from ._fastpath_py import batch_prefix  # built once per topic, not on the hot path


def encode_batch(bytes prefix not None, uint64_t first_seq, list payloads not None):
    """A complete frame holding `["msg", topic, epoch, first_seq, [payload, ...]]`."""
    cdef Py_ssize_t n = PyList_GET_SIZE(payloads)
    cdef Py_ssize_t i, size, body
    cdef object item
    body = PyBytes_GET_SIZE(prefix) + _uint_size(first_seq)
    body += 1 if n < 16 else (3 if n < 65536 else 5)
    for i in range(n):
        item = <object>PyList_GET_ITEM(payloads, i)
        if type(item) is not bytes:
            raise TypeError("payloads must be bytes")
        size = PyBytes_GET_SIZE(item)
        body += _bin_header_size(size) + size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(body) + body)
    cdef uint8_t* p = _put_header(<uint8_t*>PyBytes_AS_STRING(out), body)
    size = PyBytes_GET_SIZE(prefix)
    memcpy(p, PyBytes_AS_STRING(prefix), size)
    p = _put_uint(p + size, first_seq)
    if n < 16:
        p[0] = <uint8_t>(0x90 | n)
        p += 1
    elif n < 65536:
        p[0] = 0xDC
        p = _put_be(p + 1, <uint64_t>n, 2)
    else:
        p[0] = 0xDD
        p = _put_be(p + 1, <uint64_t>n, 4)
    for i in range(n):
        item = <object>PyList_GET_ITEM(payloads, i)
        size = PyBytes_GET_SIZE(item)
        p = _put_bin_header(p, size)
        memcpy(p, PyBytes_AS_STRING(item), size)
        p += size
    return out


cdef class Outbox:
    """One connection's outbound queue of complete frames, counted in bytes.

    `transport_bytes` is what the transport still held after the last write; the bound applies
    to the sum, so a connection cannot hide a backlog in its transport."""

    cdef public object owner
    cdef public list frames
    cdef public Py_ssize_t size
    cdef public Py_ssize_t transport_bytes
    cdef public Py_ssize_t limit
    cdef public bint scheduled
    cdef public bint paused
    cdef public bint closed
    cdef public bint over

    def __init__(self, object owner, Py_ssize_t limit):
        self.owner = owner
        self.frames = []
        self.size = 0
        self.transport_bytes = 0
        self.limit = limit
        self.scheduled = False
        self.paused = False
        self.closed = False
        self.over = False

    cpdef bint push(self, bytes frame):
        """Queue a frame; True when this push took the connection past its limit.

        Once past it (or closed) the outbox takes nothing more: the connection is being closed."""
        if frame is None:
            raise TypeError("frame must be bytes")
        if self.closed or self.over:
            return False
        self.frames.append(frame)
        self.size += PyBytes_GET_SIZE(frame)
        if self.size + self.transport_bytes > self.limit:
            self.over = True
            return True
        return False

    cpdef bytes take(self):
        """Everything queued as one bytes object (the single frame itself when there is one)."""
        cdef list frames = self.frames
        cdef bytes data
        if PyList_GET_SIZE(frames) == 1:
            data = <bytes>PyList_GET_ITEM(frames, 0)
        else:
            data = b"".join(frames)
        self.frames = []
        self.size = 0
        return data

    cpdef clear(self):
        self.frames = []
        self.size = 0

    @property
    def pending(self):
        return self.size + self.transport_bytes


def fan_out(bytes frame not None, tuple targets not None, list touched not None, list slow not None):
    """Queue `frame` on every outbox in `targets`.

    Each outbox not yet in `touched` this tick is appended to it once; each one that passes its
    limit with this frame is appended to `slow`, and takes no more frames from then on (it is
    about to be closed). Nothing is raised per subscriber."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(targets)
    cdef Outbox box
    for i in range(n):
        box = targets[i]  # typed assignment: checked to be an Outbox
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


cdef class TopicState:
    """One concrete topic: its epoch, its last sequence number and this tick's pending batch."""

    cdef public str name
    cdef public bytes key
    cdef public object epoch
    cdef public long long seq
    cdef public bytes prefix
    cdef public list pending
    cdef public long long first
    cdef public bint dirty

    def __init__(self, str name, epoch):
        self.name = name
        self.key = name.encode()
        self.epoch = epoch
        self.seq = 0
        self.prefix = batch_prefix(name, epoch)
        self.pending = []
        self.first = 0
        self.dirty = False


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

    Returns how many messages were published, or -1 when the frame holds anything else (a
    request id, an unknown topic, a large payload, another message type, bad data): then
    nothing was applied and the frame takes the general path. Only exact, canonical encodings
    count as simple; anything unusual is left to the general path, which handles it the same."""
    cdef Py_ssize_t n = data.shape[0]
    if n < 2:
        return -1
    cdef const uint8_t* p = &data[0]
    cdef Py_ssize_t pos = 0, count, i, tlen, plen, start
    cdef uint8_t b
    cdef bint batch
    count = _array_len(p, n, &pos)
    if count <= 0:
        return -1
    batch = pos < n and (0x90 <= p[pos] <= 0x9F or p[pos] == 0xDC or p[pos] == 0xDD)
    if not batch:
        if count != 4:
            return -1
        count = 1
        pos = 0
    if count > max_count:
        return -1
    cdef list accepted = []
    cdef TopicState state = None
    cdef object found
    cdef bytes key, payload
    for i in range(count):
        # ["pub", 0, topic, payload]: 94 a3 'p' 'u' 'b' 00
        if pos + 6 > n or p[pos] != 0x94 or p[pos + 1] != 0xA3 or p[pos + 2] != 112 \
                or p[pos + 3] != 117 or p[pos + 4] != 98 or p[pos + 5] != 0:
            return -1
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
        accepted.append(state)
        accepted.append(payload)
    if pos != n:
        return -1
    for i in range(0, PyList_GET_SIZE(accepted), 2):
        _stamp(<TopicState>PyList_GET_ITEM(accepted, i), <bytes>PyList_GET_ITEM(accepted, i + 1), dirty)
    return count
