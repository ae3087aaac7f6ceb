"""`TopicState`: one topic's sequence numbers, this tick's pending batch and the subscription
nodes that match it; `stamp` adds a payload to it. `compact_nodes` and `add_node` keep its list
of nodes (used by the fan-out and the index). Part of the pure-Python fast path
(`broker._fastpath_py`); the compiled twin is `_fastpath_topics.pxi`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .pieces import encode_topic

if TYPE_CHECKING:
    from .history import HistoryLog
    from .index import Node


class TopicState:
    """One concrete topic: its id, epoch, last sequence number, this tick's pending batch and
    the subscription nodes that match it."""

    __slots__ = ("id", "name", "key", "epoch", "seq", "pending", "first", "dirty", "nodes", "compacted", "announce", "history")

    def __init__(self, topic_id: int, name: str, epoch: int) -> None:
        self.id = topic_id
        self.name = name
        self.key = name.encode()  # the topic as it appears on the wire, for fast_publish
        self.epoch = epoch
        self.seq = 0  # sequence number of the last message published
        self.pending: list[bytes] = []
        self.first = 0  # sequence number of pending[0]
        self.dirty = False
        self.nodes: list[Node] = []  # subscription nodes matching this topic (dead ones skipped)
        self.compacted = 0  # len(nodes) when dead nodes were last dropped from it
        self.announce = encode_topic(topic_id, name, epoch)
        self.history: HistoryLog | None = None  # once a HistoryStore kept some of its messages


def stamp(state: TopicState, payload: bytes, dirty: list) -> None:
    """Give `payload` the topic's next sequence number and add it to this tick's batch."""
    seq = state.seq = state.seq + 1
    if not state.dirty:
        state.dirty = True
        state.first = seq
        dirty.append(state)
    state.pending.append(payload)


def fanout_steps(dirty: list, start: int) -> int:
    """The subscription nodes of the topics dirty[start:]: what their fan-out will visit."""
    return sum(len(state.nodes) for state in dirty[max(start, 0) :])


def compact_nodes(state: TopicState) -> None:
    """Drop the dead nodes from a topic's list."""
    state.nodes = [node for node in state.nodes if not node.dead]
    state.compacted = len(state.nodes)


def add_node(state: TopicState, node: Node) -> None:
    """Append a live node to a topic's list, first dropping dead ones once the list has grown
    to twice its length at the last compaction (so the list stays within twice its live nodes
    plus a few, at amortized O(1) per append)."""
    if len(state.nodes) >= 2 * state.compacted + 16:
        compact_nodes(state)
    state.nodes.append(node)
