# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path. `broker._fastpath_py` is its specification: same API, same bytes.

One extension module, its source split by concept into the `.pxi` files included at the end
(frames, pieces, topics, publish, fan-out, history, index, staging: the same split as the
twin's modules), its extension types declared in `_fastpath.pxd`. One module rather than one
per concept because the fan-out calls the pieces', topics' and index's C functions per message
and per subscriber: within one module they are direct calls the C compiler can inline, across
modules they would go through a capsule's function pointers (docs/architecture.md, The fast
path).

The tries of the index are not tracked by the cyclic garbage collector (`no_gc`): they hold
no cycles (a trie node refers only to its children, its subscription nodes and its topic), and
one client's thousands of overlapping patterns made every full collection walk them.

This module stands alone: it shares no code with its twin, so the parity tests compare two
implementations."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport INT64_MAX
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset

from collections import deque

import msgspec

cdef object _encode = msgspec.msgpack.Encoder().encode

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

INCOMPLETE = None
ERR_PROTOCOL = 1002
ERR_TOO_BIG = 1009

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)


cdef inline list _untracked_list(list items):
    """`items`, no longer visited by the cyclic garbage collector. A topic's list of matching
    nodes can hold thousands of references (one client's overlapping patterns); it is part of
    no cycle that could need collecting (topics live as long as the broker), and having the
    collector walk it at every collection made pauses of tens of milliseconds."""
    PyObject_GC_UnTrack(<void*>items)
    return items


cdef enum:
    FRAME_ALLOWANCE = 5  # the outer array header (at most array 32)
    RUN_ALLOWANCE = 9  # a "msg" message header: array 32 header + fixstr "msg"

cdef uint64_t SIG_SEED = 0xCBF29CE484222325ULL
cdef uint64_t SIG_PRIME = 0x100000001B3ULL

include "_fastpath_frames.pxi"
include "_fastpath_pieces.pxi"
include "_fastpath_topics.pxi"
include "_fastpath_publish.pxi"
include "_fastpath_fanout.pxi"
include "_fastpath_history.pxi"
include "_fastpath_index.pxi"
include "_fastpath_staging.pxi"
