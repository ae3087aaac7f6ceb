"""Pure-Python fast path: the specification the compiled `_fastpath` must match byte for byte.

What lives here is everything the broker does per message or per subscriber, one concept per
module (the compiled module's sources, `_fastpath_*.pxi`, are split the same way):

- `frames`: WebSocket framing, server frames (FIN, unmasked, header included) and the parser of
  client frames (`read_frame`), which unmasks payloads.
- `pieces`: MessagePack pieces, a delivery batch of one topic (`encode_batch`), a topic
  announcement (`encode_topic`), and `assemble`, which packs a connection's pieces of one loop
  iteration into as few frames as a size cap allows.
- `topics`: `TopicState` and `stamp`, a topic's sequence numbers and this tick's batch.
- `publish`: `fast_publish`, which parses and stamps a frame of fire-and-forget publishes, and
  `measure_frame`, which bounds a client frame's shape before it is decoded.
- `fanout`: `Outbox` and `emit`, one connection's pieces of this tick, and the fan-out of a
  topic's batch to every node member, each connection once. A connection with a single
  subscription (every `md.>` subscriber, every subscriber of one topic) is a *solo* member of
  that node: a batch goes once into the node's own list, not into each solo member's, and all
  of them are written the node's frame, assembled once.
- `index`: `Index`, who receives which topic. Each distinct subscription string is one `Node`;
  each topic keeps the list of nodes that match it, so finding the receivers of a topic costs
  nothing per publish. A new node joins the lists of the topics it matches; a node whose last
  subscriber left is marked dead and dropped from a list the next time that list is read or
  grows, so a change touches only the topics it matches and a departure touches none.
- `history`: each topic's recent messages, for recovery and last values.
- `staging`: the cluster backplane's per-topic work (`stage`, `arrive`).

This package re-exports exactly the public names of the compiled module (`_fastpath.pyi`
declares them; a test compares the two). It imports nothing from the compiled module and that
one nothing from here: the parity tests compare two independent implementations.
"""

from .fanout import Outbox, emit, emit_all, end_tick, schedule_solo
from .frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    ERR_PROTOCOL,
    ERR_TOO_BIG,
    INCOMPLETE,
    PING,
    PONG,
    TEXT,
    encode_frame,
    frame_header,
    frame_needs,
    read_frame,
    unmask,
)
from .history import (
    BUCKET_MS,
    CHUNK_OVERHEAD,
    MESSAGE_OVERHEAD,
    HistoryChunk,
    HistoryLog,
    HistoryStore,
)
from .index import Index, Node
from .pieces import assemble, encode_batch, encode_topic, is_batch
from .publish import (
    FRAME_LONG_ARRAY,
    FRAME_LONG_BATCH,
    FRAME_LONG_MAP,
    FRAME_TOO_DEEP,
    FRAME_TOO_MANY_VALUES,
    fast_publish,
    measure_frame,
)
from .staging import Block, arrive, stage
from .topics import TopicState, fanout_steps, stamp

__all__ = [
    "BINARY",
    "BUCKET_MS",
    "Block",
    "CHUNK_OVERHEAD",
    "CLOSE",
    "CONTINUATION",
    "ERR_PROTOCOL",
    "ERR_TOO_BIG",
    "FRAME_LONG_ARRAY",
    "FRAME_LONG_BATCH",
    "FRAME_LONG_MAP",
    "FRAME_TOO_DEEP",
    "FRAME_TOO_MANY_VALUES",
    "HistoryChunk",
    "HistoryLog",
    "HistoryStore",
    "INCOMPLETE",
    "Index",
    "MESSAGE_OVERHEAD",
    "Node",
    "Outbox",
    "PING",
    "PONG",
    "TEXT",
    "TopicState",
    "arrive",
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
    "stage",
    "stamp",
    "unmask",
]
