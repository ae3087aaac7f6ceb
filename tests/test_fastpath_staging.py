"""The cluster backplane's per-topic work in the fast path, compiled and pure: staging pending
batches into one block per shard (`stage`), taking numbered batches back (`arrive`); used by
broker.cluster.streams and Router.deliver_remote. Every test runs on both implementations or
compares them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker._fastpath_py as pure

try:
    from broker import _fastpath as compiled
except ImportError:  # the suite requires it; test_fastpath_api.py says so
    compiled = None


def _staged(impl, steps, shards, block_bytes):
    """Run `stage` over a sequence of ticks: each tick publishes to some topics (some with an
    ack waiting), then stages. Returns what the blocks and topics hold afterwards."""
    states = [impl.TopicState(i, f"t.{i}", 7) for i in range(6)]
    filling = [None] * shards
    full_of = [[] for _ in range(shards)]
    results = []
    for tick in steps:
        waiting: dict = {}
        dirty: list = []
        for topic, count, size, acked in tick:
            state = states[topic]
            for k in range(count):
                impl.stamp(state, bytes([topic]) * size + b"%d" % k, dirty)
                if acked:
                    waiting.setdefault(state, []).append((state.seq, f"ok{topic}.{k}", None, f"m{topic}.{k}" if k % 2 else ""))
        results.append(impl.stage(dirty, filling, full_of, waiting, shards, 1.5, block_bytes))
        assert not waiting or all(state not in waiting for state in dirty)
    blocks = [block for blocks in full_of for block in blocks] + [block for block in filling if block is not None]
    return (
        results,
        [(b.shard, b.topics, b.size, b.count, b.waiters, b.staged, b.write, b.sent, b.answered) for b in blocks],
        [(s.seq, s.pending, s.dirty) for s in states],
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(0, 40), st.booleans()), max_size=6), max_size=8),
    st.sampled_from([1, 3, 16]),
    st.sampled_from([1, 60, 1 << 20]),
)
def test_stage_parity(steps, shards, block_bytes):
    """Both twins stage the same messages into the same blocks (per shard, per topic in order,
    the waiting acks with their index, full blocks set aside), and give back the same numbers."""
    if compiled is None:
        pytest.fail("the compiled fast path is not built")
    assert _staged(compiled, steps, shards, block_bytes) == _staged(pure, steps, shards, block_bytes)


def test_stage_takes_every_pending_message_and_gives_the_numbers_back(fastpath_impl):
    import zlib

    a, b = fastpath_impl.TopicState(0, "a", 5), fastpath_impl.TopicState(1, "b", 5)
    dirty: list = []
    for payload in (b"1", b"22"):
        fastpath_impl.stamp(a, payload, dirty)
    fastpath_impl.stamp(b, b"333", dirty)
    filling = [None] * 4
    full_of = [[] for _ in range(4)]
    waiting = {a: [(2, "ok", "fail", "id-2")]}
    assert fastpath_impl.stage(dirty, filling, full_of, waiting, 4, 9.0, 1 << 20) == (
        3,
        6,
        len({zlib.crc32(b"a") % 4, zlib.crc32(b"b") % 4}),
    )
    assert (a.seq, a.pending, a.dirty, b.seq, b.pending) == (0, [], False, 0, [])
    block = filling[zlib.crc32(b"a") % 4]
    assert block.topics["a"] == [b"1", b"22"] and block.waiters == [("a", 1, "ok", "fail", "id-2")] and block.staged == 9.0
    assert waiting == {}


def _arrived(impl, entries):
    topics = {f"t.{i}": impl.TopicState(i, f"t.{i}", 7) for i in range(3)}
    topics["t.0"].seq = 4
    others: list = []
    arrived: list = []

    def other(name, epoch, payloads, first):
        others.append((name, epoch, list(payloads), first))
        return 0

    taken = impl.arrive(entries, topics, arrived, other)
    return taken, others, [s.name for s in arrived], {name: (s.seq, s.first, list(s.pending), s.dirty) for name, s in topics.items()}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([7, 8]),
            st.lists(st.tuples(st.sampled_from(["t.0", "t.1", "t.2", "t.9"]), st.integers(1, 3), st.integers(1, 8)), max_size=4),
        ),
        max_size=5,
    )
)
def test_arrive_parity(entries):
    """Both twins add the same batches to the same topics and hand the same ones to `other`."""
    if compiled is None:
        pytest.fail("the compiled fast path is not built")

    def wire():  # fresh lists for each twin: a topic's pending batch becomes the first list it takes
        return [
            (epoch, [(name, [b"x%d" % k for k in range(count)]) for name, count, _ in batches], [first for _, _, first in batches])
            for epoch, batches in entries
        ]

    assert _arrived(compiled, wire()) == _arrived(pure, wire())


def test_arrive_adds_what_follows_and_hands_the_rest_on(fastpath_impl):
    entries = [
        (7, [("t.0", [b"5", b"6"]), ("t.1", [b"1"]), ("t.9", [b"new"]), ("t.0", [b"7"]), ("t.2", [b"9"])], [5, 1, 1, 7, 9]),
        (8, [("t.1", [b"e"])], [1]),
    ]
    taken, others, arrived, topics = _arrived(fastpath_impl, entries)
    assert taken == 4 and arrived == ["t.0", "t.1"]
    assert topics["t.0"] == (7, 5, [b"5", b"6", b"7"], True) and topics["t.1"] == (1, 1, [b"1"], True)
    assert others == [("t.9", 7, [b"new"], 1), ("t.2", 7, [b"9"], 9), ("t.1", 8, [b"e"], 1)]
