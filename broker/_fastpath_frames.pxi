# WebSocket frames (RFC 6455), the server side: server frames and the parser of client frames.
# Part of the compiled fast path: included by _fastpath.pyx, which with its includes is one
# extension module (see its docstring). Twin: broker/_fastpath_py/frames.py.


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
