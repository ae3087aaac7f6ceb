# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path. `_fastpath_py.py` is its specification: same API, same bytes."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy


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
