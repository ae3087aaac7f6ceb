"""Types of the compiled fast path; the pure-Python twin `broker._fastpath_py` has the same API
(tests/test_fastpath_api.py compares this stub with both)."""

from collections import deque
from collections.abc import Callable
from typing import Any

CONTINUATION: int
TEXT: int
BINARY: int
CLOSE: int
PING: int
PONG: int
INCOMPLETE: None
ERR_PROTOCOL: int
ERR_TOO_BIG: int

def frame_header(size: int, opcode: int = ...) -> bytes: ...
def encode_frame(payload: bytes, opcode: int = ...) -> bytes: ...
def read_frame(data: bytes | bytearray, pos: int, max_size: int) -> tuple[int, int, bytes, int] | int | None: ...
def unmask(payload: bytes, mask: bytes) -> bytes: ...
def frame_needs(data: bytes | bytearray, pos: int) -> int: ...
def encode_batch(topic_id: int, first_seq: int, payloads: list[bytes]) -> bytes: ...
def encode_topic(topic_id: int, name: str, epoch: int) -> bytes: ...
def is_batch(piece: bytes) -> bool: ...
def assemble(pieces: list[bytes], max_frame: int) -> bytes: ...

class TopicState:
    id: int
    name: str
    key: bytes
    epoch: int
    seq: int
    pending: list[bytes]
    first: int
    dirty: bool
    nodes: list[Node]
    compacted: int
    announce: bytes
    history: HistoryLog | None
    def __init__(self, topic_id: int, name: str, epoch: int) -> None: ...

def stamp(state: TopicState, payload: bytes, dirty: list[TopicState]) -> None: ...
def fanout_steps(dirty: list[TopicState], start: int) -> int: ...
def fast_publish(
    data: bytes | bytearray | memoryview, topics_by_key: dict[bytes, TopicState], max_payload: int, max_count: int, dirty: list[TopicState]
) -> int: ...

FRAME_TOO_DEEP: int
FRAME_LONG_ARRAY: int
FRAME_LONG_MAP: int
FRAME_TOO_MANY_VALUES: int
FRAME_LONG_BATCH: int

def measure_frame(
    data: bytes | bytearray | memoryview, max_messages: int, max_fields: int, max_entries: int, max_depth: int, max_values: int
) -> int: ...

class Outbox:
    owner: Any
    pieces: list[bytes]
    size: int
    transport_bytes: int
    limit: int
    hard_limit: int
    scheduled: bool
    paused: bool
    closed: bool
    over: bool
    mark: int
    sig: int
    over_since: float
    nsubs: int
    solo_node: Node | None
    offset: int
    def __init__(self, owner: Any, limit: int, hard_limit: int | None = None) -> None: ...
    def push(self, piece: bytes) -> bool: ...
    def introduce(self, state: TopicState) -> bool: ...
    def knows(self, topic_id: int) -> bool: ...
    def take(self, max_frame: int, shared: dict[Any, Any] | None = None) -> bytes: ...
    def keep(self) -> bool: ...
    def clear(self) -> None: ...
    def replace(self, pieces: list[bytes]) -> None: ...
    @property
    def pending(self) -> int: ...

def emit(state: TopicState, emission: int, max_piece: int, touched: list[Outbox], slow: list[Outbox], nodes_touched: list[Node]) -> int: ...
def emit_all(
    dirty: list[TopicState],
    emission: int,
    max_piece: int,
    touched: list[Outbox],
    slow: list[Outbox],
    nodes_touched: list[Node],
    history: HistoryStore | None = None,
    now_ms: int = 0,
) -> tuple[int, int, int, int]: ...
def schedule_solo(nodes: list[Node], touched: list[Outbox]) -> None: ...
def end_tick(nodes: list[Node]) -> None: ...

class Node:
    pattern: str
    members: dict[Outbox, None]
    solo: dict[Outbox, None]
    pieces: list[bytes]
    frame: bytes | None
    dead: bool
    def __init__(self, pattern: str) -> None: ...

class Index:
    exact: dict[str, Node]
    topics: dict[str, TopicState]
    by_key: dict[bytes, TopicState]
    states: list[TopicState]
    patterns: int
    excluding: dict[str, Any]
    subscriptions: int
    work: int
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def add_topic(self, state: TopicState) -> None: ...
    def subscribe(self, pattern: str, box: Any) -> bool: ...
    def unsubscribe(self, pattern: str, box: Any) -> bool: ...
    def settle(self, pattern: str, box: Any) -> None: ...
    def node(self, pattern: str) -> Node | None: ...
    def matching(self, pattern: str) -> list[TopicState]: ...
    def retire(self, state: TopicState) -> None: ...
    def renew(self, state: TopicState, epoch: int, topic_id: int) -> TopicState: ...
    def receivers(self, name: str) -> list[Any]: ...

MESSAGE_OVERHEAD: int
CHUNK_OVERHEAD: int
BUCKET_MS: int

class HistoryChunk:
    first: int
    payloads: list[bytes]
    sizes: int
    time: int
    last: int
    log: HistoryLog | None
    def __init__(self, first: int, payloads: list[bytes], sizes: int, time_ms: int, log: HistoryLog | None) -> None: ...

class HistoryLog:
    chunks: deque[HistoryChunk]
    tail: HistoryChunk | None
    skip: int
    count: int
    size: int
    trimmed_time: int
    def __init__(self) -> None: ...
    def first_seq(self) -> int: ...

class HistoryStore:
    order: deque[HistoryChunk]
    total: int
    stale: int
    trimmed: int
    max_messages: int
    max_bytes: int
    def __init__(self, max_messages: int, max_bytes: int) -> None: ...
    def retain(self, state: TopicState, first: int, payloads: list[bytes], now_ms: int) -> None: ...
    def drop_head(self, log: HistoryLog) -> None: ...

class Block:
    shard: int
    topics: dict[str, list[bytes]]
    size: int
    count: int
    waiters: list[tuple[str, int, Any, Any, str]]
    staged: float
    write: int
    sent: bool
    epoch: int
    answered: bool
    def __init__(self, shard: int, staged: float) -> None: ...

def stage(
    states: list[TopicState],
    filling: list[Block | None],
    full_of: list[list[Block]],
    waiting: dict[TopicState, list],
    shards: int,
    now: float,
    block_bytes: int,
) -> tuple[int, int, int]: ...
def arrive(
    entries: list, topics: dict[str, TopicState], arrived: list[TopicState], other: Callable[[str, int, list[bytes], int], int]
) -> int: ...
