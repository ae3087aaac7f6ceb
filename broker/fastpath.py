"""Selects the hot-path implementation: the compiled `_fastpath` when it is built, otherwise the
pure-Python `_fastpath_py`. Set BROKER_PURE_PYTHON=1 to force the pure one.

`IMPLEMENTATION` is "cython" or "python"."""

from __future__ import annotations

import os

if os.environ.get("BROKER_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
    from . import _fastpath_py as _impl

    IMPLEMENTATION = "python"
else:
    try:
        from . import _fastpath as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "cython"
    except ImportError:
        from . import _fastpath_py as _impl

        IMPLEMENTATION = "python"

CONTINUATION = _impl.CONTINUATION
TEXT = _impl.TEXT
BINARY = _impl.BINARY
CLOSE = _impl.CLOSE
PING = _impl.PING
PONG = _impl.PONG
ERR_PROTOCOL = _impl.ERR_PROTOCOL
ERR_TOO_BIG = _impl.ERR_TOO_BIG

frame_header = _impl.frame_header
encode_frame = _impl.encode_frame
read_frame = _impl.read_frame
frame_needs = _impl.frame_needs
unmask = _impl.unmask
encode_batch = _impl.encode_batch
encode_topic = _impl.encode_topic
is_batch = _impl.is_batch
assemble = _impl.assemble
TopicState = _impl.TopicState
stamp = _impl.stamp
fanout_steps = _impl.fanout_steps
fast_publish = _impl.fast_publish
measure_frame = _impl.measure_frame
FRAME_TOO_DEEP = _impl.FRAME_TOO_DEEP
FRAME_LONG_ARRAY = _impl.FRAME_LONG_ARRAY
FRAME_LONG_MAP = _impl.FRAME_LONG_MAP
FRAME_TOO_MANY_VALUES = _impl.FRAME_TOO_MANY_VALUES
FRAME_LONG_BATCH = _impl.FRAME_LONG_BATCH
Outbox = _impl.Outbox
emit = _impl.emit
emit_all = _impl.emit_all
schedule_solo = _impl.schedule_solo
end_tick = _impl.end_tick
Node = _impl.Node
Index = _impl.Index
HistoryChunk = _impl.HistoryChunk
HistoryLog = _impl.HistoryLog
HistoryStore = _impl.HistoryStore
MESSAGE_OVERHEAD = _impl.MESSAGE_OVERHEAD
CHUNK_OVERHEAD = _impl.CHUNK_OVERHEAD
BUCKET_MS = _impl.BUCKET_MS
Block = _impl.Block
stage = _impl.stage
arrive = _impl.arrive

__all__ = [
    "BINARY",
    "Block",
    "arrive",
    "stage",
    "BUCKET_MS",
    "CHUNK_OVERHEAD",
    "HistoryChunk",
    "HistoryLog",
    "HistoryStore",
    "MESSAGE_OVERHEAD",
    "CLOSE",
    "CONTINUATION",
    "ERR_PROTOCOL",
    "ERR_TOO_BIG",
    "FRAME_LONG_ARRAY",
    "FRAME_LONG_BATCH",
    "FRAME_LONG_MAP",
    "FRAME_TOO_DEEP",
    "FRAME_TOO_MANY_VALUES",
    "IMPLEMENTATION",
    "Index",
    "Node",
    "Outbox",
    "PING",
    "PONG",
    "TEXT",
    "TopicState",
    "assemble",
    "emit",
    "emit_all",
    "encode_batch",
    "encode_frame",
    "encode_topic",
    "end_tick",
    "fanout_steps",
    "fast_publish",
    "frame_header",
    "frame_needs",
    "is_batch",
    "measure_frame",
    "read_frame",
    "schedule_solo",
    "stamp",
    "unmask",
]
