# Fan-out: the topic-id bitmaps, Outbox, emit and the end of a tick. Part of the compiled fast
# path: included by _fastpath.pyx, which with its includes is one extension module (see its
# docstring). Twin: broker/_fastpath_py/fanout.py.

# Topic-id bitmaps: which topics were announced to a connection, or to every solo member of a node


# (the Bits struct is declared in _fastpath.pxd: Node holds one too)


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
