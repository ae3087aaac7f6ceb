"""The fast path, compiled and pure: the same API, the same bytes, the same behaviour.

Every test runs on both implementations (the `fastpath_impl` fixture) or compares them
directly (the Hypothesis properties); the two share no code (test_fastpath_api.py checks that,
and that both have the API `_fastpath.pyi` declares)."""

import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker._fastpath_py as pure
from broker.messages import Batch, Msg, Topic, decode_server_frame
from broker.topics import matches
from conftest import MAX_FRAME, client_frame, decode_frames, split_frames

try:
    from broker import _fastpath as compiled
except ImportError:  # the suite requires it; test_compiled_fast_path_is_active... says so
    compiled = None


# WebSocket frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_frame_header_sizes(fastpath_impl, size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = fastpath_impl.encode_frame(payload)
    assert split_frames(frame) == [(0x2, payload)]
    assert frame == pure.encode_frame(payload)
    assert fastpath_impl.frame_header(size) == pure.frame_header(size)
    assert fastpath_impl.encode_frame(payload[:100], fastpath_impl.CLOSE)[0] == 0x88


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 127, 65535, 65536, 100_000])
def test_read_frame_unmasks_and_reports_the_end(fastpath_impl, size):
    payload = os.urandom(size)
    frame = client_frame(0x2, payload)
    data = b"junk" + frame + b"next"
    opcode, fin, got, end = fastpath_impl.read_frame(data, 4, 1 << 20)
    assert (opcode, fin, got, end) == (0x2, 1, payload, 4 + len(frame))
    assert fastpath_impl.read_frame(bytearray(data), 4, 1 << 20) == (opcode, fin, got, end)
    assert fastpath_impl.frame_needs(data, 4) == len(frame)
    for cut in (0, 1, 2, len(frame) - 1):
        assert fastpath_impl.read_frame(data[: 4 + cut], 4, 1 << 20) is None
    mask = os.urandom(4)
    assert fastpath_impl.unmask(fastpath_impl.unmask(payload, mask), mask) == payload


@pytest.mark.parametrize(
    "frame, code",
    [
        (client_frame(0x2, b"x", masked=False), 1002),  # clients must mask
        (bytes((0xC2, 0x81)) + bytes(5), 1002),  # a reserved bit
        (client_frame(0x3, b"x"), 1002),  # a reserved opcode
        (client_frame(0xB, b"x"), 1002),
        (client_frame(0x9, b"x" * 126), 1002),  # a control frame longer than 125
        (client_frame(0x9, b"x", fin=False), 1002),  # a fragmented control frame
        (bytes((0x82, 0xFE, 0x00, 0x7D)) + bytes(4 + 125), 1002),  # 16-bit length for 125
        (bytes((0x82, 0xFF)) + (65535).to_bytes(8, "big") + bytes(4), 1002),  # 64-bit length for 65535
        (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big"), 1002),  # most significant bit set
        (client_frame(0x2, length=5000), 1009),  # longer than the limit: known from the header
        (client_frame(0x1, length=5000), 1009),
    ],
)
def test_read_frame_refuses_broken_framing(fastpath_impl, frame, code):
    assert fastpath_impl.read_frame(frame, 0, 4096) == code


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 20), st.integers(1, 300))
def test_read_frame_parity_on_any_bytes(data, pos, max_size):
    pos = min(pos, len(data))
    assert compiled.read_frame(data, pos, max_size) == pure.read_frame(data, pos, max_size)
    assert compiled.frame_needs(data, pos) == pure.frame_needs(data, pos)


# MessagePack pieces and frames


@pytest.mark.parametrize("count", [1, 13, 14, 15, 16, 65533, 65534, 65536])
@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_encode_batch_bytes_match(fastpath_impl, count, seq):
    payloads = [bytes([i % 251]) * (i % 7) for i in range(count)]
    piece = fastpath_impl.encode_batch(70_000, seq, payloads)
    assert piece == pure.encode_batch(70_000, seq, payloads)
    assert msgspec.msgpack.decode(piece) == [70_000, seq, *payloads]
    assert fastpath_impl.is_batch(piece)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.text(min_size=1, max_size=300),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.binary(max_size=70_000), min_size=1, max_size=5) | st.lists(st.binary(max_size=300), min_size=1, max_size=40),
)
def test_piece_parity_property(topic_id, name, epoch, seq, payloads):
    piece = compiled.encode_batch(topic_id, seq, payloads)
    assert piece == pure.encode_batch(topic_id, seq, payloads) == msgspec.msgpack.encode([topic_id, seq, *payloads])
    announce = compiled.encode_topic(topic_id, name, epoch)
    assert announce == pure.encode_topic(topic_id, name, epoch) == msgspec.msgpack.encode(Topic(topic_id, name, epoch))
    assert not compiled.is_batch(announce) and not pure.is_batch(announce)


def test_encode_batch_rejects_non_bytes(fastpath_impl):
    with pytest.raises(TypeError):
        fastpath_impl.encode_batch(1, 1, ["text"])


def messages_of(data: bytes) -> list:
    return [m for frame in decode_frames(data) for m in frame]


def test_assemble_groups_batches_and_keeps_order(fastpath_impl):
    ack = msgspec.msgpack.encode(["ack", 1, 0, 0])
    pieces = [
        fastpath_impl.encode_topic(3, "a", 9),
        fastpath_impl.encode_batch(3, 1, [b"x"]),
        fastpath_impl.encode_batch(4, 7, [b"y", b"z"]),
        ack,
        fastpath_impl.encode_batch(3, 2, [b"w"]),
    ]
    data = fastpath_impl.assemble(pieces, MAX_FRAME)
    assert len(split_frames(data)) == 1
    assert messages_of(data) == [
        Topic(3, "a", 9),
        Msg([Batch(3, 1, [b"x"]), Batch(4, 7, [b"y", b"z"])]),
        msgspec.msgpack.decode(ack, type=__import__("broker.messages").messages.Ack),
        Msg([Batch(3, 2, [b"w"])]),
    ]


def test_assemble_splits_at_the_cap_and_never_splits_a_piece(fastpath_impl):
    pieces = [fastpath_impl.encode_batch(i, 1, [bytes(100)]) for i in range(50)]
    data = fastpath_impl.assemble(pieces, 1000)
    frames = split_frames(data)
    assert len(frames) > 5 and all(len(payload) <= 1000 for _, payload in frames)
    assert [b for m in messages_of(data) for b in m.batches] == [Batch(i, 1, [bytes(100)]) for i in range(50)]
    big = fastpath_impl.encode_batch(0, 1, [bytes(5000)])
    assert len(split_frames(fastpath_impl.assemble([pieces[0], big, pieces[1]], 1000))) == 3


piece_lists = st.lists(
    st.one_of(
        st.builds(lambda i, n: pure.encode_topic(i, f"t{i}", 5), st.integers(0, 70_000), st.integers()),
        st.builds(lambda i: msgspec.msgpack.encode(["ack", i, 0, 0]), st.integers(0, 2**63 - 1)),
        st.builds(
            lambda i, seq, ps: pure.encode_batch(i, seq, ps),
            st.integers(0, 2**40),
            st.integers(0, 2**64 - 1),
            st.lists(st.binary(max_size=400), min_size=1, max_size=20),
        ),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(piece_lists, st.sampled_from([1, 64, 200, 1000, 5000, MAX_FRAME]))
def test_assemble_parity_property(pieces, cap):
    data = compiled.assemble(pieces, cap)
    assert data == pure.assemble(pieces, cap)
    decoded = messages_of(data)
    flat = []
    for m in decoded:
        if isinstance(m, Msg):
            flat += [msgspec.msgpack.encode([b.topic_id, b.seq, *b.data]) for b in m.batches]
        else:
            flat.append(msgspec.msgpack.encode(m))
    assert flat == pieces  # every piece, once, in order
    for _, payload in split_frames(data):
        assert len(payload) <= cap or len(decode_server_frame(payload)) == 1


# Outbox


def test_outbox_push_take_and_hard_limit(fastpath_impl):
    box = fastpath_impl.Outbox("owner", 10, 20)
    assert (box.owner, box.limit, box.hard_limit, box.pending) == ("owner", 10, 20, 0)
    a = fastpath_impl.encode_batch(1, 1, [b"123456789"])  # 14 bytes
    assert box.push(a) is False and box.size == 14  # over `limit` is the server's to judge
    assert box.push(a) is True  # 28 > 20: reported once
    assert box.push(a) is False  # past its hard limit the outbox takes nothing more
    assert box.over and box.size == 28
    assert messages_of(box.take(MAX_FRAME)) == [Msg([Batch(1, 1, [b"123456789"])] * 2)]
    assert box.size == 0 and box.take(MAX_FRAME) == b""
    box = fastpath_impl.Outbox("owner", 10)
    assert box.hard_limit == 10
    box.transport_bytes = 100
    assert box.pending == 100
    box.closed = True
    assert box.push(a) is False and box.size == 0


def test_outboxes_with_the_same_pieces_share_the_bytes(fastpath_impl):
    a, b, c = (fastpath_impl.Outbox(n, 1 << 20) for n in "abc")
    p1, p2 = fastpath_impl.encode_batch(1, 1, [b"x"]), fastpath_impl.encode_batch(2, 1, [b"y"])
    for box in (a, b):
        box.push(p1)
        box.push(p2)
    c.push(p2)
    c.push(p1)
    shared: dict = {}
    da, db, dc = (box.take(MAX_FRAME, shared) for box in (a, b, c))
    assert da is db and dc != da
    assert messages_of(dc) == [Msg([Batch(2, 1, [b"y"]), Batch(1, 1, [b"x"])])]


def test_wrong_types_raise_in_both_implementations(fastpath_impl):
    with pytest.raises(TypeError):
        fastpath_impl.encode_frame(None)
    with pytest.raises(TypeError):
        fastpath_impl.Outbox(None, 10).push(None)
    with pytest.raises(ValueError):
        fastpath_impl.frame_header(-1)
    with pytest.raises(TypeError):
        fastpath_impl.assemble([b"\x91\x01", "text"], 100)


# Index and emit


def emit_all(impl, index, dirty, emission, touched, slow, max_piece=MAX_FRAME):
    """What the router's flush does: emit every dirty topic, then add the solo members of the
    nodes that got pieces to `touched`. Returns the next emission number and those nodes (whose
    `end_tick` the caller calls after taking every outbox)."""
    nodes = []
    before = [(state, len(state.pending)) for state in dirty]
    emission, published, _, _ = impl.emit_all(dirty, emission, max_piece, touched, slow, nodes)
    assert published == sum(count for _, count in before) and all(not state.pending for state, _ in before)
    dirty.clear()
    impl.schedule_solo(nodes, touched)
    return emission, (impl, nodes)


def take_all(touched, nodes, max_frame=MAX_FRAME) -> dict:
    impl, nodes = nodes
    shared: dict = {}
    out = {}
    for box in touched:
        box.scheduled = False
        out[box.owner] = box.take(max_frame, shared)
    impl.end_tick(nodes)
    return out


def test_fanout_steps_counts_the_nodes_of_the_topics_made_dirty(fastpath_impl):
    """What a publish's fan-out will cost, counted in the iteration's budget: the subscription
    nodes of each topic that became dirty since a point in the tick's list."""
    impl = fastpath_impl
    index = impl.Index()
    box = impl.Outbox("a", 1 << 20)
    for pattern in ("md.>", "md.*.x", "md.n.x", "other.>"):
        index.subscribe(pattern, box)
    states = [impl.TopicState(i, name, 1) for i, name in enumerate(("md.n.x", "md.m.y", "nobody"))]
    for state in states:
        index.add_topic(state)
    dirty: list = []
    for state in states:
        impl.stamp(state, b"x", dirty)
    impl.stamp(states[0], b"again", dirty)  # dirty already: not listed twice
    assert [impl.fanout_steps(dirty, start) for start in (0, 1, 2, 3, -1)] == [4, 1, 0, 0, 4]


def test_emit_reaches_each_outbox_once_announcing_topics_first(fastpath_impl):
    impl = fastpath_impl
    index = impl.Index()
    a, b = impl.Outbox("a", 1 << 20), impl.Outbox("b", 1 << 20)
    for pattern in ("md.>", "md.*.x", "md.n.x"):
        index.subscribe(pattern, a)
    index.subscribe("md.n.x", b)
    state = impl.TopicState(0, "md.n.x", 5)
    index.add_topic(state)
    dirty, touched, slow = [], [], []
    impl.stamp(state, b"1", dirty)
    impl.stamp(state, b"2", dirty)
    _, nodes = emit_all(impl, index, dirty, 0, touched, slow)
    assert sorted(box.owner for box in touched) == ["a", "b"]
    assert b.solo_node is index.node("md.n.x") and a.solo_node is None  # b's only subscription
    expected = [Topic(0, "md.n.x", 5), Msg([Batch(0, 1, [b"1", b"2"])])]
    written = take_all(touched, nodes)
    assert messages_of(written["a"]) == expected == messages_of(written["b"])
    impl.stamp(state, b"3", dirty)
    touched, nodes = [], []
    assert impl.emit(state, 10, MAX_FRAME, touched, slow, nodes) == 2
    impl.schedule_solo(nodes, touched)
    written = take_all(touched, (impl, nodes))
    assert messages_of(written["a"]) == [Msg([Batch(0, 3, [b"3"])])]  # announced once
    assert messages_of(written["b"]) == [Msg([Batch(0, 3, [b"3"])])]
    assert a.knows(0) and b.knows(0) and not a.knows(1) and slow == []


def test_emit_cuts_large_batches_into_pieces(fastpath_impl):
    impl = fastpath_impl
    index = impl.Index()
    box = impl.Outbox("a", 1 << 30)
    index.subscribe("t", box)
    state = impl.TopicState(0, "t", 5)
    index.add_topic(state)
    dirty, touched = [], []
    for i in range(100):
        impl.stamp(state, bytes([i]) * 100, dirty)
    _, nodes = emit_all(impl, index, dirty, 0, touched, [], max_piece=1000)
    data = take_all(touched, nodes, 1024)["a"]
    assert all(len(payload) <= 1024 for _, payload in split_frames(data))
    batches = [b for m in messages_of(data) if isinstance(m, Msg) for b in m.batches]
    assert len(batches) > 5
    assert [(b.seq, len(b.data)) for b in batches][0][0] == 1
    assert [p for b in batches for p in b.data] == [bytes([i]) * 100 for i in range(100)]
    assert all(b.seq == batches[0].seq + sum(len(x.data) for x in batches[:k]) for k, b in enumerate(batches))


def test_index_nodes_follow_subscriptions(fastpath_impl):
    impl = fastpath_impl
    index = impl.Index()
    a, b = impl.Outbox("a", 1), impl.Outbox("b", 1)
    t = impl.TopicState(0, "md.x.y", 1)
    index.add_topic(t)

    def live(state):
        return sorted(n.pattern for n in state.nodes if not n.dead)

    assert index.subscribe("md.>", a) and not index.subscribe("md.>", a)
    assert index.subscribe("md.>", b)
    assert live(t) == ["md.>"] and index.patterns == 1
    assert index.subscribe("md.*.y", a)
    assert live(t) == ["md.*.y", "md.>"]
    assert index.unsubscribe("md.>", a) and not index.unsubscribe("md.>", a)
    assert live(t) == ["md.*.y", "md.>"]  # b still holds md.>
    node = index.node("md.>")
    index.unsubscribe("md.>", b)
    assert node.dead and live(t) == ["md.*.y"]
    index.unsubscribe("md.*.y", a)
    assert live(t) == [] and index.patterns == 0 and len(index) == 0
    assert index.node("md.>") is None
    for _ in range(100):  # churn: the list keeps within twice its live nodes, plus a few
        index.subscribe("md.>", a)
        index.unsubscribe("md.>", a)
    assert len(t.nodes) <= 16
    index.subscribe("md.x.y", a)  # exact, before and after the topic exists
    index.subscribe("md.x.z", b)
    u = impl.TopicState(1, "md.x.z", 1)
    index.add_topic(u)
    assert index.receivers("md.x.y") == [a] and index.receivers("md.x.z") == [b]
    assert index.receivers("md.nothing") == []
    with pytest.raises(ValueError):
        index.add_topic(impl.TopicState(1, "md.q", 1))  # an id taken
    with pytest.raises(ValueError):
        index.add_topic(impl.TopicState(9, "md.x.z", 1))  # a name taken
    later = impl.TopicState(7, "md.q", 1)  # ids need not be dense: the list by id has holes
    index.add_topic(later)
    assert index.states[7] is later and index.states[2:7] == [None] * 5
    assert index.receivers("md.q") == [] and [s.name for s in index.matching("md.>")].count("md.q") == 1
    fresh = index.renew(later, 2, 30)
    assert index.states[7] is None and index.states[30] is fresh and fresh.id == 30 and fresh.epoch == 2
    with pytest.raises(ValueError):
        index.renew(fresh, 3, 1)  # an id taken


def test_a_box_left_with_one_plain_membership_can_subscribe_again(fastpath_impl):
    """Two subscriptions, one dropped without `settle`: the box is a plain member of the other
    node, not a solo member of any; a new subscription must not take it for one (the compiled
    index once dereferenced the missing solo node here)."""
    impl = fastpath_impl
    index = impl.Index()
    box = impl.Outbox("a", 1 << 30)
    state = impl.TopicState(0, "x", 1)
    index.add_topic(state)
    assert index.subscribe("*", box) and index.subscribe("*.*", box) and index.unsubscribe("*", box)
    assert box.solo_node is None and box.nsubs == 1
    assert index.subscribe("*", box)
    assert box.nsubs == 2 and index.receivers("x") == [box] and index.receivers("x.y") == [box]


PATTERNS = ["a", "a.b", "a.b.c", "a.*", "a.>", "*.b", "*.*", ">", "a.*.c", "*.b.>", "x.>", "a.b.*", "*", "b.*.c"]
TOPICS = ["a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "b.b.c", "a.b.c.d", "x.y", "x"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["sub", "unsub", "topic", "pub", "flush"]), st.integers(0, 3), st.integers(0, 100)), max_size=120)
)
def test_index_and_emit_agree_with_a_model_and_between_twins(steps):
    """Any sequence of subscription changes, new topics and publishes: both twins deliver the
    same bytes, and every connection gets exactly the messages of the topics it matches."""
    outputs = []
    for impl in (compiled, pure):
        index = impl.Index()
        boxes = [impl.Outbox(i, 1 << 30) for i in range(4)]
        held = [set() for _ in boxes]
        dirty, emission, out = [], 0, []
        for kind, who, k in steps:
            box = boxes[who]
            if kind == "sub":
                pattern = PATTERNS[k % len(PATTERNS)]
                assert index.subscribe(pattern, box) == (pattern not in held[who])
                held[who].add(pattern)
            elif kind == "unsub":
                pattern = PATTERNS[k % len(PATTERNS)]
                assert index.unsubscribe(pattern, box) == (pattern in held[who])
                held[who].discard(pattern)
            elif kind in ("topic", "pub"):
                name = TOPICS[k % len(TOPICS)]
                state = index.topics.get(name)
                if state is None:
                    state = impl.TopicState(len(index.states), name, 3)
                    index.add_topic(state)
                if kind == "pub":
                    impl.stamp(state, b"%d" % k, dirty)
            else:
                touched = []
                for state in dirty:
                    expected = {b.owner for b, h in zip(boxes, held) if any(matches(p, state.name) for p in h)}
                    assert {b.owner for b in index.receivers(state.name)} == expected
                emission, nodes = emit_all(impl, index, dirty, emission, touched, [])
                out.append(sorted(take_all(touched, nodes).items()))
        outputs.append((out, index.work))
    assert outputs[0] == outputs[1]


# fast_publish: the compiled parser and the pure one agree, and both agree with the general path

from broker.messages import Pub, Sub, decode_client_frame  # noqa: E402

KNOWN = ["md.a", "md.b", "x" * 40, "y" * 300]


def states(impl):
    by_key = {}
    for i, name in enumerate(KNOWN):
        state = impl.TopicState(i, name, 7)
        by_key[state.key] = state
    return by_key


def outcome(impl, data, max_payload=1000, max_count=50):
    by_key = states(impl)
    dirty = []
    count = impl.fast_publish(data, by_key, max_payload, max_count, dirty)
    return count, [(s.name, s.seq, s.first, list(s.pending), s.dirty) for s in dirty]


frames = st.lists(
    st.tuples(
        st.sampled_from(KNOWN + ["unknown"]),
        st.sampled_from([0, 0, 0, 5]),
        st.sampled_from([0, 1, 255, 256, 1000, 1001, 70000]),
    ),
    min_size=1,
    max_size=60,
).map(lambda items: [Pub(i, t, bytes(n)) for t, i, n in items])


@settings(max_examples=300, deadline=None)
@given(frames, st.booleans())
def test_fast_publish_parity_and_agreement_with_general_path(messages, single):
    from broker import _fastpath as compiled

    data = msgspec.msgpack.encode(messages[0] if single else messages)
    got = outcome(compiled, data, max_payload=70000)
    assert got == outcome(pure, data, max_payload=70000)
    count, stamped = got
    decoded, bad = decode_client_frame(data)
    simple = (
        not bad and all(type(m) is Pub and m.id == 0 and m.topic in KNOWN and len(m.data) <= 70000 for m in decoded) and len(decoded) <= 50
    )
    assert (count >= 0) == simple
    if count >= 0:
        assert count == len(decoded)
        flat = {name: pending for name, _, _, pending, _ in stamped}
        for name in KNOWN:
            assert flat.get(name, []) == [m.data for m in decoded if m.topic == name]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x90",
        b"\xc1",
        msgspec.msgpack.encode(Sub(0, "md.a")),
        msgspec.msgpack.encode(["pub", 0, "md.a", b"x", "extra"]),
        msgspec.msgpack.encode(["pub", False, "md.a", b"x"]),
        msgspec.msgpack.encode(["pub", 0, "md.a", "text"]),
        msgspec.msgpack.encode([["pub", 0, "md.a", b"x"]]) + b"\x00",  # trailing bytes
        msgspec.msgpack.encode([["pub", 0, "md.a", b"x"]])[:-1],  # truncated
        b"\xdc\x00\x01" + msgspec.msgpack.encode(["pub", 0, "md.a", b"x"]),  # non-canonical array16
        b"\x94\xa3pub\xcc\x00\xa4md.a\xc4\x01x",  # non-canonical id
    ],
)
def test_fast_publish_leaves_unusual_frames_to_the_general_path(fastpath_impl, data):
    assert outcome(fastpath_impl, data)[0] == -1
    assert outcome(fastpath_impl, data) == (-1, [])


def test_fast_publish_limits(fastpath_impl):
    batch = msgspec.msgpack.encode([Pub(0, "md.a", b"12345")] * 3)
    assert outcome(fastpath_impl, batch, max_payload=5, max_count=3)[0] == 3
    assert outcome(fastpath_impl, batch, max_payload=4, max_count=3)[0] == -1
    assert outcome(fastpath_impl, batch, max_payload=5, max_count=2)[0] == -1


def test_fast_publish_takes_an_empty_msg_id_and_leaves_a_real_one_to_the_general_path(fastpath_impl):
    empty = msgspec.msgpack.encode([["pub", 0, "md.a", b"x", ""], ["pub", 0, "md.a", b"y"]])
    assert outcome(fastpath_impl, empty, max_payload=5, max_count=3)[0] == 2
    real = msgspec.msgpack.encode([["pub", 0, "md.a", b"x", "id-1"]])
    assert outcome(fastpath_impl, real, max_payload=5, max_count=3)[0] == -1


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(0, 1500)), max_size=60), st.integers(1, 12), st.integers(200, 3000)
)
def test_history_store_parity_and_bounds(steps, max_messages, max_bytes):
    """Both history stores keep the same messages of every topic, within the bounds."""
    from broker import _fastpath as compiled
    from broker import _fastpath_py as twin

    kept = []
    for impl in (compiled, twin):
        store = impl.HistoryStore(max_messages, max_bytes)
        states = [impl.TopicState(i, f"t{i}", 1) for i in range(4)]
        for topic, count, now in steps:
            state = states[topic]
            first = state.seq + 1
            state.seq += count
            store.retain(state, first, [b"%d" % (first + i) * 7 for i in range(count)], now)
        snapshot = []
        for state in states:
            log = state.history
            if log is None:
                snapshot.append(None)
                continue
            messages = [p for i, c in enumerate(log.chunks) for p in (c.payloads[log.skip :] if i == 0 else c.payloads)]
            assert log.count == len(messages) <= max_messages
            assert log.size <= max_bytes or log.count == 0
            assert messages == [b"%d" % s * 7 for s in range(log.first_seq(), state.seq + 1)]
            snapshot.append((log.first_seq(), log.count, log.size, len(log.chunks), log.trimmed_time))
        kept.append((snapshot, store.total, store.trimmed))
    assert kept[0] == kept[1]
