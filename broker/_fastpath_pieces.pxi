# MessagePack pieces: delivery batches, topic announcements, and their assembly into frames.
# Part of the compiled fast path: included by _fastpath.pyx, which with its includes is one
# extension module (see its docstring). Twin: broker/_fastpath_py/pieces.py.


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
