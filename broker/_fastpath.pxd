# cython: language_level=3
"""Declarations of the compiled fast path (`_fastpath.pyx` and the `.pxi` files it includes): its
extension types with their attributes and C-level methods, and the structs more than one of
them holds. Declaring the types here, rather than in each concept's `.pxi`, lets every `.pxi`
use every type whatever the order of the includes, and lets another Cython module `cimport`
them."""

cimport cython
from libc.stdint cimport uint8_t


cdef struct Bits:
    # A topic-id bitmap: which topics were announced to a connection (Outbox), or to every solo
    # member of a subscription node (Node).
    uint8_t* data
    Py_ssize_t size

cdef class TopicState:
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


cdef class Outbox:
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
    cdef inline void _add(self, bytes piece) except *
    cdef inline int _push(self, bytes piece) except -1
    cpdef bint push(self, bytes piece)
    cpdef bytes take(self, Py_ssize_t max_frame, dict shared=*)
    cpdef bint keep(self)
    cpdef clear(self)


@cython.final
@cython.no_gc
cdef class HistoryChunk:
    cdef public long long first
    cdef public list payloads
    cdef public Py_ssize_t sizes
    cdef public long long time
    cdef public long long last
    cdef public object log


@cython.final
@cython.no_gc
cdef class HistoryLog:
    cdef public object chunks
    cdef public HistoryChunk tail
    cdef public Py_ssize_t skip
    cdef public Py_ssize_t count
    cdef public Py_ssize_t size
    cdef public long long trimmed_time


cdef class HistoryStore:
    cdef public object order
    cdef public Py_ssize_t total
    cdef public Py_ssize_t stale
    cdef public Py_ssize_t trimmed
    cdef public Py_ssize_t max_messages
    cdef public Py_ssize_t max_bytes
    cdef int _retain(self, TopicState state, long long first, list payloads, long long now_ms) except -1
    cdef int _trim(self, HistoryLog log) except -1
    cdef int _cut(self, HistoryLog log, HistoryChunk head, Py_ssize_t count) except -1
    cpdef drop_head(self, HistoryLog log)


cdef class Node:
    cdef public str pattern
    cdef public dict members
    cdef public dict solo
    cdef public list pieces
    cdef public object frame
    cdef public bint dead
    cdef bint has_known
    cdef Bits known


@cython.no_gc
cdef class _PatternTrie:
    cdef dict children
    cdef _PatternTrie star
    cdef Node here
    cdef Node rest
    cdef bint empty(self)


@cython.no_gc
cdef class _TopicTrie:
    cdef dict children
    cdef TopicState state
    cdef Py_ssize_t height


cdef class _Excluding:
    cdef Node node
    cdef list base
    cdef list excluded
    cdef bint matches(self, list tokens)


cdef class Index:
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
    cdef void _place(self, TopicState state) except *
    cdef void _collect(self, _PatternTrie trie, list tokens, Py_ssize_t i, list out) except *
    cdef list _matching_topics(self, str pattern)
    cdef void _match_topics(self, _TopicTrie trie, list tokens, Py_ssize_t i, list out) except *
    cdef void _subtree(self, _TopicTrie trie, list out) except *
    cdef void _join_solo(self, Node node, Outbox box) except *
    cdef void _leave_solo(self, Node node, Outbox box) except *
    cdef Node _node(self, str pattern, bint create)
    cdef Node _attach(self, Node node)
    cdef void _drop(self, Node node) except *


cdef class Block:
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
