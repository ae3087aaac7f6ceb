# The publish path ahead of the decoder (fast_publish, measure_frame). Part of the compiled fast
# path: included by _fastpath.pyx, which with its includes is one extension module (see its
# docstring). Twin: broker/_fastpath_py/publish.py.

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
