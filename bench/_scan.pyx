# cython: language_level=3, boundscheck=False, wraparound=False
"""Cheap counting of messages in a stream of server-to-client WebSocket frames (load generator).

Modes: FRAMES counts data frames (one message per frame: Bun), NATS counts "MSG " protocol
lines across frame payloads, BROKER reads the payload count from each `msg` batch header
(broker protocol v1, also spoken by the ceiling and naive peers). Control frames are handed
back to Python (rare); nothing is decoded per message."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

FRAMES = 0
NATS = 1
BROKER = 2


cdef inline uint64_t _be(const uint8_t* p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef Py_ssize_t _skip_msgpack_scalar(const uint8_t* p, Py_ssize_t n) noexcept:
    """Size of one str/int MessagePack value at p (only what a `msg` header holds), -1 if not."""
    cdef uint8_t b
    if n < 1:
        return -1
    b = p[0]
    if b < 0x80 or b >= 0xE0:
        return 1
    if 0xA0 <= b <= 0xBF:
        return 1 + (b & 0x1F)
    if b == 0xD9 and n >= 2:
        return 2 + p[1]
    if b == 0xDA and n >= 3:
        return 3 + <Py_ssize_t>_be(p + 1, 2)
    if b == 0xCC or b == 0xD0:
        return 2
    if b == 0xCD or b == 0xD1:
        return 3
    if b == 0xCE or b == 0xD2:
        return 5
    if b == 0xCF or b == 0xD3:
        return 9
    return -1


cdef class Scanner:
    cdef public int mode
    cdef public long long frames
    cdef public long long messages
    cdef bytearray _tail
    cdef uint8_t _nats_state   # how many bytes of "MSG " matched at the end of the last payload
    cdef public list control   # (opcode, payload) of control frames, for Python to answer
    cdef public list samples   # payloads of data frames when sampling
    cdef public bint sample
    cdef Py_ssize_t _skip      # bytes of a counted data frame still to pass over

    def __init__(self, int mode, bint sample=False):
        self.mode = mode
        self.frames = 0
        self.messages = 0
        self._tail = bytearray()
        self._nats_state = 0
        self.control = []
        self.samples = []
        self.sample = sample
        self._skip = 0

    def feed(self, bytes data):
        cdef bytes buf
        if self._tail:
            self._tail += data
            buf = bytes(self._tail)
            self._tail = bytearray()
        else:
            buf = data
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0, head, size, start, need, have
        cdef uint8_t opcode, b1
        if self._skip:
            # the rest of a large data frame already counted: pass over it without buffering
            have = self._skip if self._skip < n else n
            if self.mode == 1:
                self._count(p, have)
            self._skip -= have
            pos = have
        while n - pos >= 2:
            opcode = p[pos] & 0x0F
            b1 = p[pos + 1] & 0x7F
            head = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                size = <Py_ssize_t>_be(p + pos + 2, 2)
                head = 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                size = <Py_ssize_t>_be(p + pos + 2, 8)
                head = 10
            else:
                size = b1
            start = pos + head
            if opcode >= 8 or self.sample:
                if n - start < size:
                    break
                if opcode >= 8:
                    self.control.append((opcode, buf[start:start + size]))
                else:
                    self.frames += 1
                    self._count(p + start, size)
                    self.samples.append(buf[start:start + size])
                pos = start + size
                continue
            # a data frame, counted from its first bytes: the rest need not be held
            need = size if self.mode != 2 or size < 600 else 600
            if self.mode != 2:
                need = 0
            if n - start < need:
                break
            self.frames += 1
            have = size if n - start >= size else n - start
            if self.mode == 2:
                self._count(p + start, need if need else size)
            elif self.mode == 0:
                self.messages += 1
            else:
                self._count(p + start, have)
            if have < size:
                self._skip = size - have
                pos = n
                break
            pos = start + size
        if pos < n:
            self._tail = bytearray(buf[pos:])

    cdef void _count(self, const uint8_t* p, Py_ssize_t size) noexcept:
        cdef Py_ssize_t i, off, step
        cdef uint8_t state
        cdef uint8_t b
        if self.mode == 0:
            self.messages += 1
        elif self.mode == 1:
            state = self._nats_state
            for i in range(size):
                b = p[i]
                if state == 0:
                    state = 1 if b == 77 else 0             # 'M'
                elif state == 1:
                    state = 2 if b == 83 else (1 if b == 77 else 0)  # 'S'
                elif state == 2:
                    state = 3 if b == 71 else (1 if b == 77 else 0)  # 'G'
                else:
                    if b == 32:                               # ' '
                        self.messages += 1
                    state = 1 if b == 77 else 0
            self._nats_state = state
        else:
            # ["msg", topic, epoch, seq, [payload, ...]]: 0x95, then "msg", topic, epoch, seq
            if size < 6 or p[0] != 0x95 or p[1] != 0xA3 or p[2] != 109:
                return  # ack / err / anything else: not a delivery
            off = 5
            for i in range(3):
                step = _skip_msgpack_scalar(p + off, size - off)
                if step < 0:
                    return
                off += step
            if off >= size:
                return
            b = p[off]
            if 0x90 <= b <= 0x9F:
                self.messages += b & 0x0F
            elif b == 0xDC and off + 3 <= size:
                self.messages += <long long>_be(p + off + 1, 2)
            elif b == 0xDD and off + 5 <= size:
                self.messages += <long long>_be(p + off + 1, 4)
