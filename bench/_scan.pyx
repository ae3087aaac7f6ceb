# cython: language_level=3, boundscheck=False, wraparound=False
"""Cheap counting of messages in a stream of server-to-client WebSocket frames (load generator).

Modes: FRAMES counts data frames (one message per frame: Bun), NATS counts "MSG " protocol
lines across frame payloads, BROKER counts the payloads (MessagePack bin values) of each frame:
a broker frame is one array of messages, and payloads are its only bin values (they sit in the
batches of `msg` messages; `topic`, `ack` and `err` carry none). The BROKER walk steps from one
MessagePack token to the next, skipping every str and bin body, and resumes where the previous
read ended, so a frame split over reads is never buffered. Control frames are handed back to
Python (rare); nothing is decoded per message."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t

FRAMES = 0
NATS = 1
BROKER = 2


cdef inline uint64_t _be(const uint8_t* p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef inline int _head_size(uint8_t b) noexcept:
    """Bytes of the MessagePack token starting with b that are not a str/bin/ext body."""
    if b < 0xC4 or b >= 0xE0:
        return 1  # fixint, fixmap, fixarray, fixstr (body follows), nil, false, true
    if b <= 0xC6:
        return 2 if b == 0xC4 else (3 if b == 0xC5 else 5)  # bin 8/16/32
    if b <= 0xC9:
        return 3 if b == 0xC7 else (4 if b == 0xC8 else 6)  # ext 8/16/32
    if b == 0xCA:
        return 5  # float 32
    if b == 0xCB:
        return 9  # float 64
    if b <= 0xD3:
        return 1 + (1 << ((b - 0xCC) & 3))  # uint/int 8, 16, 32, 64
    if b <= 0xD8:
        return 2  # fixext 1..16: type byte, then the body
    if b <= 0xDB:
        return 2 if b == 0xD9 else (3 if b == 0xDA else 5)  # str 8/16/32
    return 3 if b == 0xDC or b == 0xDE else 5  # array/map 16, array/map 32


cdef inline Py_ssize_t _body_size(const uint8_t* h) noexcept:
    """Bytes of body after the head h of a complete token."""
    cdef uint8_t b = h[0]
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F
    if b == 0xC4 or b == 0xD9:
        return h[1]
    if b == 0xC5 or b == 0xDA:
        return <Py_ssize_t>_be(h + 1, 2)
    if b == 0xC6 or b == 0xDB:
        return <Py_ssize_t>_be(h + 1, 4)
    if b == 0xC7:
        return h[1]
    if b == 0xC8:
        return <Py_ssize_t>_be(h + 1, 2)
    if b == 0xC9:
        return <Py_ssize_t>_be(h + 1, 4)
    if 0xD4 <= b <= 0xD8:
        return 1 << (b - 0xD4)
    return 0


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
    cdef uint8_t _head[9]      # BROKER: the start of a token head split over reads
    cdef int _head_have        # bytes of it held
    cdef int _head_need        # its full size
    cdef Py_ssize_t _body      # BROKER: body bytes of the current token still to pass over

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
        self._head_have = 0
        self._head_need = 0
        self._body = 0

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
        cdef Py_ssize_t pos = 0, head, size, start, have
        cdef uint8_t opcode, b1
        if self._skip:
            # the rest of a data frame already started: count it without buffering it
            have = self._skip if self._skip < n else n
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
                    self._frame_start()
                    self._count(p + start, size)
                    self.samples.append(buf[start:start + size])
                pos = start + size
                continue
            # a data frame: counted as it streams in, never held
            self._frame_start()
            have = size if n - start >= size else n - start
            self._count(p + start, have)
            if have < size:
                self._skip = size - have
                pos = n
                break
            pos = start + size
        if pos < n:
            self._tail = bytearray(buf[pos:])

    cdef inline void _frame_start(self) noexcept:
        self.frames += 1
        self._head_have = 0
        self._body = 0
        if self.mode == 0:
            self.messages += 1

    cdef void _count(self, const uint8_t* p, Py_ssize_t size) noexcept:
        cdef Py_ssize_t i
        cdef uint8_t state
        cdef uint8_t b
        if self.mode == 1:
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
        elif self.mode == 2:
            self._walk(p, size)

    cdef void _walk(self, const uint8_t* p, Py_ssize_t size) noexcept:
        """Step over MessagePack tokens, counting bin values; resumable at any byte."""
        cdef Py_ssize_t i = 0, step
        cdef int need
        while i < size:
            if self._body:
                step = self._body if self._body < size - i else size - i
                self._body -= step
                i += step
                continue
            if self._head_have:
                while self._head_have < self._head_need and i < size:
                    self._head[self._head_have] = p[i]
                    self._head_have += 1
                    i += 1
                if self._head_have < self._head_need:
                    return
                self._head_have = 0
                self._token(self._head)
                continue
            need = _head_size(p[i])
            if size - i >= need:
                self._token(p + i)
                i += need
            else:
                self._head_need = need
                while i < size:
                    self._head[self._head_have] = p[i]
                    self._head_have += 1
                    i += 1

    cdef inline void _token(self, const uint8_t* h) noexcept:
        if 0xC4 <= h[0] <= 0xC6:
            self.messages += 1
        self._body = _body_size(h)
