# History: each topic's recent messages, for recovery and last values. Part of the compiled fast
# path: included by _fastpath.pyx, which with its includes is one extension module (see its
# docstring). Twin: broker/_fastpath_py/history.py.


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
