"""Cluster staging: the backplane's per-topic work (broker.cluster.streams), staging a tick's
pending batches into one block per shard for its next write, and taking numbered batches back
into the topics' pending batches. Both run for every topic a tick or a stream entry touches.
Part of the pure-Python fast path (`broker._fastpath_py`); the compiled twin is
`_fastpath_staging.pxi`."""

from __future__ import annotations


class Block:
    """What one shard gets in one write: per topic its payloads in order (`topics`), and the
    acks waiting for their numbers (`waiters`: topic, index in its payloads, ok, fail, msg_id)."""

    __slots__ = ("shard", "topics", "size", "count", "waiters", "staged", "write", "sent", "epoch", "answered")

    def __init__(self, shard: int, staged: float) -> None:
        self.shard = shard
        self.topics: dict[str, list[bytes]] = {}
        self.size = 0
        self.count = 0
        self.waiters: list = []
        self.staged = staged
        self.write = 0
        self.sent = False
        self.epoch = 0
        self.answered = False


def stage(states: list, filling: list, full_of: list, waiting: dict, shards: int, now: float, block_bytes: int) -> tuple[int, int, int]:
    """Take the topics' pending batches into the block each one's shard is filling
    (`filling[shard]`, made when there is none), and give each topic back the sequence number
    it had. The acks waiting for a topic's messages (`waiting[state]`: provisional seq, ok,
    fail, msg_id) move to the block with their index in its payloads. A block that reaches
    `block_bytes` goes to `full_of[shard]`. Returns (messages taken, their bytes, blocks made)."""
    import zlib

    taken = size_all = made = 0
    for state in states:
        pending = state.pending
        state.dirty = False
        count = len(pending)
        if not count:
            continue
        shard = zlib.crc32(state.key) % shards
        block = filling[shard]
        if block is None:
            block = filling[shard] = Block(shard, now)
            made += 1
        payloads = block.topics.get(state.name)
        if payloads is None:
            payloads = block.topics[state.name] = []
        base = len(payloads) - state.first
        payloads.extend(pending)
        size = sum(map(len, pending))
        block.size += size
        block.count += count
        size_all += size
        if waiting:
            mine = waiting.pop(state, None)
            if mine is not None:
                name = state.name
                block.waiters.extend((name, base + seq, ok, fail, msg_id) for seq, ok, fail, msg_id in mine)
        state.seq -= count
        state.pending = []
        taken += count
        if block.size >= block_bytes:
            full_of[shard].append(block)
            filling[shard] = None
    return taken, size_all, made


def arrive(entries: list, topics: dict, arrived: list, other) -> int:
    """Numbered batches from a backplane's log, in its order (`entries`: (epoch, [(topic,
    payloads), ...], [first seq, ...])), into the topics' pending batches: a batch that
    follows its topic's last number in its epoch is added (the topic joins `arrived` when it
    was not dirty); any other (a topic unknown here, another epoch, a repeat, numbers skipped)
    goes to `other(topic, epoch, payloads, first)`, which returns the messages it took.
    Returns the messages taken."""
    taken = 0
    for epoch, batches, firsts in entries:
        for (name, payloads), first in zip(batches, firsts):
            state = topics.get(name)
            if state is None or first != state.seq + 1 or state.epoch != epoch:
                taken += other(name, epoch, payloads, first)
                continue
            count = len(payloads)
            if state.dirty:
                state.pending.extend(payloads)
            else:
                state.dirty = True
                state.first = first
                state.pending = payloads
                arrived.append(state)
            state.seq = first + count - 1
            taken += count
    return taken
