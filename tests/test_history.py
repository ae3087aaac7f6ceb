"""History and recovery: what a subscription with `since` or `last` receives (sans-I/O core),
and the bounds history keeps."""

import pytest

from broker.backplane import MemoryBackplane
from broker.client import Client
from broker.errors import ErrorCode
from broker.fastpath import MESSAGE_OVERHEAD, TopicState, stamp
from broker.messages import Ack, Delivery, Err, GapNotice, Pub, Sub, encode
from conftest import Harness, eventually, run, serving, url


def publish(h, topic, payloads, ticks=1):
    """Publish `payloads` to `topic`, spread over `ticks` loop iterations."""
    p = h.session("publisher")
    per = max(1, len(payloads) // ticks)
    for i in range(0, len(payloads), per):
        p.receive(encode([Pub(0, topic, data) for data in payloads[i : i + per]]))
        h.tick()


def messages(written):
    """(topic, seq, payload) of every delivered message, in order."""
    return [(d.topic, d.seq + i, data) for d in written if type(d) is Delivery for i, data in enumerate(d.data)]


def numbered(n, start=1):
    return [b"m%d" % i for i in range(start, start + n)]


def test_since_replays_exactly_what_came_after_then_continues_live():
    h = Harness()
    publish(h, "t", numbered(10), ticks=5)
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [42, 4])))
    h.session("publisher").receive(encode(Pub(0, "t", b"m11")))
    written, _ = h.tick()
    out = written["s"]
    assert out[0] == Ack(1, 42, 10)
    assert messages(out) == [("t", seq, b"m%d" % seq) for seq in range(5, 12)]
    # the replay arrives as one batch however many ticks it was published in
    assert [type(m) for m in out] == [Ack, Delivery, Delivery]


def test_since_at_the_last_message_replays_nothing():
    h = Harness()
    publish(h, "t", numbered(3))
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [42, 3])))
    assert h.tick()[0]["s"] == [Ack(1, 42, 3)]


def test_history_too_short_reports_the_exact_gap_and_replays_the_rest():
    h = Harness(history={"max_messages": 4})
    publish(h, "t", numbered(10), ticks=10)
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [42, 2])))
    out = h.tick()[0]["s"]
    assert out[:2] == [Ack(1, 42, 10), GapNotice("t", 42, 3, 6, "history no longer holds these messages", "history")]
    assert messages(out) == [("t", seq, b"m%d" % seq) for seq in range(7, 11)]


def test_an_unknown_epoch_is_reported_and_the_current_one_replayed_from_its_start():
    h = Harness()
    publish(h, "t", numbered(3))
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [41, 7])))
    out = h.tick()[0]["s"]
    assert out[1] == GapNotice("t", 41, 8, 0, "epoch 41 of the topic ended; it continues in epoch 42", "ended")
    assert messages(out) == [("t", 1, b"m1"), ("t", 2, b"m2"), ("t", 3, b"m3")]


def test_a_topic_this_broker_does_not_hold_ends_the_clients_epoch():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Sub(1, "gone", [17, 5])))
    out = h.tick()[0]["s"]
    assert out == [Ack(1, 0, 0), GapNotice("gone", 17, 6, 0, "the topic has no messages in this broker any more: its epoch ended", "ended")]


def test_since_epoch_zero_means_from_the_start_of_the_current_epoch():
    h = Harness()
    publish(h, "t", numbered(2))
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [0, 0])))
    assert messages(h.tick()[0]["s"]) == [("t", 1, b"m1"), ("t", 2, b"m2")]


@pytest.mark.parametrize(
    "since, code",
    [
        ([42, 99], ErrorCode.BAD_POSITION),  # ahead of the topic
        ([0, 3], ErrorCode.BAD_POSITION),
        ([42], ErrorCode.BAD_MESSAGE),
        ([42, -1], ErrorCode.BAD_MESSAGE),
        (["42", 1], ErrorCode.BAD_MESSAGE),
        ([42, 2**63], ErrorCode.BAD_MESSAGE),
    ],
)
def test_a_bad_since_is_refused_with_the_request_id_and_subscribes_nothing(since, code):
    h = Harness()
    publish(h, "t", numbered(3))
    s = h.session("s")
    s.receive(encode(Sub(7, "t", since)))
    out = h.tick()[0]["s"]
    assert len(out) == 1 and type(out[0]) is Err and out[0].id == 7 and out[0].code == code
    assert not s.subscriptions


@pytest.mark.parametrize(
    "since, code",
    [
        ([5, {"u.a": [42, 1]}], ErrorCode.BAD_POSITION),  # a topic the pattern does not match
        ([5, {"t.a": [42, 9]}], ErrorCode.BAD_POSITION),  # ahead of the topic
        ([5, {"t.*": [42, 1]}], ErrorCode.INVALID_TOPIC),
        ([5, {"t.a": 1}], ErrorCode.BAD_MESSAGE),
        ([5, [1, 2]], ErrorCode.BAD_MESSAGE),
        ([-5, {}], ErrorCode.BAD_MESSAGE),
    ],
)
def test_a_bad_pattern_since_is_refused(since, code):
    h = Harness()
    publish(h, "t.a", numbered(3))
    s = h.session("s")
    s.receive(encode(Sub(7, "t.*", since)))
    out = h.tick()[0]["s"]
    assert len(out) == 1 and type(out[0]) is Err and out[0].id == 7 and out[0].code == code


def test_a_pattern_since_recovers_listed_topics_and_unlisted_ones_from_its_time():
    h = Harness()
    publish(h, "t.a", numbered(3))
    publish(h, "t.old", [b"before"])
    h.now += 1.0
    subscribed_at = int(h.now * 1000)
    h.now += 1.0
    publish(h, "t.a", numbered(2, start=4))
    publish(h, "t.new", [b"n1", b"n2"])
    publish(h, "u.x", [b"elsewhere"])
    s = h.session("s")
    s.receive(encode(Sub(1, "t.*", [subscribed_at, {"t.a": [42, 3]}])))
    out = h.tick()[0]["s"]
    assert out[0] == Ack(1, int(h.now * 1000), 0)
    assert sorted(messages(out)) == [("t.a", 4, b"m4"), ("t.a", 5, b"m5"), ("t.new", 1, b"n1"), ("t.new", 2, b"n2")]


def test_a_pattern_since_reports_listed_topics_that_are_gone():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Sub(1, "t.*", [5, {"t.gone": [40, 2]}])))
    out = h.tick()[0]["s"]
    assert out[1] == GapNotice("t.gone", 40, 3, 0, "the topic has no messages in this broker any more: its epoch ended", "ended")


def test_a_pattern_since_reports_what_history_trimmed_after_its_time():
    h = Harness(history={"max_messages": 2})
    h.now += 1.0
    subscribed_at = int(h.now * 1000)
    publish(h, "t.a", numbered(5), ticks=5)
    s = h.session("s")
    s.receive(encode(Sub(1, "t.*", [subscribed_at, {}])))
    out = h.tick()[0]["s"]
    assert type(out[1]) is GapNotice and (out[1].topic, out[1].first, out[1].last) == ("t.a", 1, 3)
    assert messages(out) == [("t.a", 4, b"m4"), ("t.a", 5, b"m5")]


def test_last_gives_the_latest_message_of_each_matching_topic_aligned_with_live():
    h = Harness()
    publish(h, "q.a", numbered(3))
    publish(h, "q.b", [b"b1"])
    s = h.session("s")
    s.receive(encode([Sub(1, "q.*", None, True), Sub(2, "q.a", None, True)]))
    h.session("publisher").receive(encode(Pub(0, "q.b", b"b2")))
    out = h.tick()[0]["s"]
    got = messages(out)
    assert sorted(got[:2]) == [("q.a", 3, b"m3"), ("q.b", 1, b"b1")]
    assert got[2:] == [("q.a", 3, b"m3"), ("q.b", 2, b"b2")]


def test_last_on_a_topic_without_history_sends_nothing_old():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Sub(1, "none", None, True)))
    assert h.tick()[0]["s"] == [Ack(1, 0, 0)]


def test_a_replay_larger_than_max_pending_bytes_continues_as_the_connection_drains():
    """A replay that does not fit in the connection's queue sends what fits and continues from
    history as the connection drains; the topic's live messages wait behind it: the subscriber
    gets every message once and in order, and never more than max_pending_bytes at once."""
    h = Harness(max_pending_bytes=4096)
    publish(h, "t", [b"%d" % i + bytes(99) for i in range(1, 101)], ticks=10)
    s = h.session("s")
    p = h.session("live")
    s.receive(encode(Sub(1, "t", [42, 0])))
    got = []
    for tick in range(20):
        if tick < 5:
            p.receive(encode(Pub(0, "t", b"%d" % (101 + tick) + bytes(99))))
        written, slow = h.tick()
        assert not slow
        out = written.get("s", [])
        assert not [m for m in out if type(m) is GapNotice]
        assert sum(len(payload) for _, payload in h.frames.get("s", [])) <= 4096 + 64
        got += messages(out)
        if not h.router.replaying and len(got) >= 105:
            break
    assert [seq for _, seq, _ in got] == list(range(1, 106))
    assert all(data.startswith(b"%d" % seq) for _, seq, data in got)
    assert tick >= 3  # it took several loop iterations
    assert s.box.solo_node is not None  # it shares its subscription's frames again
    # live again: the next message is delivered at once
    p.receive(encode(Pub(0, "t", b"106")))
    assert messages(h.tick()[0]["s"]) == [("t", 106, b"106")]


def test_a_pattern_replay_waits_topic_after_topic_and_live_messages_of_each_follow_their_own():
    h = Harness(max_pending_bytes=4096)
    p = h.session("live")
    for seq in range(1, 41):
        p.receive(encode([Pub(0, f"pt.{t}", b"%d" % seq + bytes(99)) for t in range(4)]))
        h.tick()
    s = h.session("s")
    s.receive(encode(Sub(1, "pt.*", [0, {}])))
    got = []
    for tick in range(40):
        if tick < 6:  # live messages of every topic while the replay waits
            p.receive(encode([Pub(0, f"pt.{t}", b"%d" % (41 + tick) + bytes(99)) for t in range(4)]))
        written, slow = h.tick()
        assert not slow and not [m for m in written.get("s", []) if type(m) is GapNotice]
        got += messages(written.get("s", []))
        if not h.router.replaying and len(got) == 4 * 46:
            break
    for t in range(4):
        assert [seq for topic, seq, _ in got if topic == f"pt.{t}"] == list(range(1, 47))
    assert tick > 3


def test_a_replay_waiting_for_room_reports_what_history_dropped_meanwhile():
    h = Harness(history={"max_messages": 50}, max_pending_bytes=2048)
    publish(h, "t", [bytes(100) for _ in range(50)], ticks=5)
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [42, 0])))
    out = h.tick()[0]["s"]
    assert h.router.replaying  # it did not fit
    h.session("publisher").receive(encode([Pub(0, "t", bytes(100)) for _ in range(50)]))  # history keeps 51 ... 100 only
    while h.router.replaying:
        out += h.tick()[0].get("s", [])
    out += h.tick()[0].get("s", [])
    items = [("gap", m.first, m.last, m.cause) if type(m) is GapNotice else ("msg", m.seq, m.seq + len(m.data) - 1) for m in out[1:]]
    (at,) = [i for i, item in enumerate(items) if item[0] == "gap"]
    sent = items[at - 1][2]
    assert 10 <= sent < 50 and items[at] == ("gap", sent + 1, 50, "history")
    assert [seq for _, seq, _ in messages(out)] == list(range(1, sent + 1)) + list(range(51, 101))


def test_messages_published_in_the_same_tick_before_the_subscription_are_replayed_once():
    h = Harness()
    publish(h, "t", numbered(2))
    s = h.session("s")
    h.session("publisher").receive(encode(Pub(0, "t", b"m3")))
    s.receive(encode(Sub(1, "t", [42, 1])))
    h.session("publisher").receive(encode(Pub(0, "t", b"m4")))
    out = h.tick()[0]["s"]
    assert out[0] == Ack(1, 42, 3)
    assert messages(out) == [("t", 2, b"m2"), ("t", 3, b"m3"), ("t", 4, b"m4")]


# the store's bounds


def state(topic_id=0):
    return TopicState(topic_id, f"t{topic_id}", 1)


def retain(store, st, payloads, now_ms=0):
    first = st.seq + 1
    st.seq += len(payloads)
    store.retain(st, first, list(payloads), now_ms)


def test_history_keeps_at_most_max_messages_cutting_inside_a_chunk():
    store = MemoryBackplane(max_messages=5, clock=lambda: 0)
    st = state()
    retain(store, st, numbered(3))
    retain(store, st, numbered(4, start=4))
    assert store.since(st, 0) == (3, [(3, [b"m3", b"m4", b"m5", b"m6", b"m7"])])
    assert store.trimmed == 2


def test_history_keeps_at_most_max_bytes():
    store = MemoryBackplane(max_bytes=3 * (MESSAGE_OVERHEAD + 10) + 200, clock=lambda: 0)
    st = state()
    for _ in range(10):
        retain(store, st, [bytes(10)])
    first, batches = store.since(st, 0)
    # one chunk (one second): its overhead once, then 58 bytes per message: 4 fit
    assert first == 7 and len(batches[0][1]) == 4
    assert st.history.size <= store.history.max_bytes


def test_history_forgets_by_age_on_read_and_on_sweep():
    now = [0.0]
    store = MemoryBackplane(max_age_s=10, clock=lambda: now[0])
    a, b = state(0), state(1)
    retain(store, a, [b"old"], now_ms=0)
    retain(store, b, [b"old"], now_ms=0)
    retain(store, a, [b"new"], now_ms=8000)
    now[0] = 12.0
    assert store.since(a, 0) == (2, [(2, [b"new"])])
    store.sweep()
    assert store.latest(b) is None and store.total == 0 + a.history.size


def test_history_total_bound_drops_the_oldest_messages_of_any_topic():
    one = 100 + MESSAGE_OVERHEAD + 120
    store = MemoryBackplane(max_total_bytes=3 * one, clock=lambda: 0)
    states = [state(i) for i in range(5)]
    for st in states:
        retain(store, st, [bytes(100)])
    assert store.total <= 3 * one
    assert [store.latest(st) is not None for st in states] == [False, False, True, True, True]


def test_history_off_keeps_nothing():
    h = Harness(history={"max_messages": 0})
    publish(h, "t", numbered(3))
    s = h.session("s")
    s.receive(encode(Sub(1, "t", [42, 1], True)))
    out = h.tick()[0]["s"]
    assert out == [Ack(1, 42, 3), GapNotice("t", 42, 2, 3, "history no longer holds these messages", "history")]


def test_stale_entries_of_the_age_queue_are_compacted():
    store = MemoryBackplane(max_messages=1, clock=lambda: 5000)
    st = state()
    for i in range(5000):
        retain(store, st, [b"x"], now_ms=i * 1000)  # a chunk each
    assert len(store.store.order) < 2100
    assert store.since(st, 0) == (5000, [(5000, [b"x"])])


def test_one_chunk_per_topic_per_second_and_cut_chunks_are_compacted():
    store = MemoryBackplane(max_messages=100, clock=lambda: 0)
    st = state()
    for i in range(1000):
        retain(store, st, [b"m%d" % (i + 1)], now_ms=i)  # 1,000 ticks within one second
    (chunk,) = st.history.chunks
    assert len(chunk.payloads) < 200 and st.history.count == 100
    first, batches = store.since(st, 950)
    assert first == 901 and batches == [(951, [b"m%d" % i for i in range(951, 1001)])]
    retain(store, st, [b"m1001"], now_ms=1000)
    assert len(st.history.chunks) == 2


class LaterBackplane(MemoryBackplane):
    """Numbers publishes one step later, as a backplane shared through an external log does
    (the Redis one's seam, without Redis): `stage` takes the tick's batches, `sequence` numbers
    them per topic and hands them back through `Router.deliver_remote`."""

    sequences_at_once = False

    def __init__(self, **bounds) -> None:
        super().__init__(**bounds)
        self.staged = []
        self.waiting = {}
        self.counters = {}

    def topic_epoch(self, name):
        return 42

    def publish(self, state, payload, dirty, on_sequenced=None, on_failed=None, msg_id=""):
        stamp(state, payload, dirty)
        if on_sequenced is not None:
            self.waiting.setdefault(state, []).append((state.seq, on_sequenced))

    def stage(self, states):
        taken = 0
        for state in states:
            state.dirty = False
            if not state.pending:
                continue
            acks = [(seq - state.first, ok) for seq, ok in self.waiting.pop(state, [])]
            self.staged.append((state.name, list(state.pending), acks))
            taken += len(state.pending)
            state.seq -= len(state.pending)
            state.pending = []
        return taken

    def sequence(self, router) -> None:
        staged, self.staged = self.staged, []
        batches, firsts = [], []
        for name, payloads, acks in staged:
            first = self.counters.get(name, 0) + 1
            self.counters[name] = first + len(payloads) - 1
            batches.append((name, payloads))
            firsts.append(first)
            for index, ok in acks:
                ok(42, first + index)
        router.deliver_remote([(42, batches, firsts)])


def test_a_backplane_that_sequences_later_delays_acks_and_delivers_through_the_same_path():
    h = Harness()
    h.router.use_backplane(backplane := LaterBackplane(clock=lambda: h.now))
    s, p = h.session("s"), h.session("p")
    s.receive(encode(Sub(0, "t")))
    p.receive(encode([Pub(1, "t", b"a"), Pub(0, "t", b"b")]))
    assert h.tick()[0] == {}  # nothing is sequenced yet: no ack, no delivery
    backplane.sequence(h.router)
    written, _ = h.tick()
    assert written["p"] == [Ack(1, 42, 1)]
    assert written["s"] == [Delivery("t", 42, 1, [b"a", b"b"])]
    # a batch numbered elsewhere, after numbers this node never got: a gap, then the batch
    h.router.deliver_remote([(42, [("t", [b"remote"])], [5])])
    written = h.tick()[0]
    gap, delivery = written["s"]
    assert (gap.topic, gap.epoch, gap.first, gap.last, gap.cause) == ("t", 42, 3, 4, "backplane")
    assert delivery == Delivery("t", 42, 5, [b"remote"])
    h.router.deliver_remote([(42, [("t", [b"old", b"remote"]), ("t", [b"next"])], [4, 6])])  # repeats are skipped
    assert h.tick()[0] == {"s": [Delivery("t", 42, 6, [b"next"])]}
    late = h.session("late")
    late.receive(encode(Sub(1, "t", [42, 0])))
    assert messages(h.tick()[0]["late"]) == [("t", 1, b"a"), ("t", 2, b"b"), ("t", 5, b"remote"), ("t", 6, b"next")]


def test_a_position_beyond_what_a_cluster_node_delivered_is_settled_by_the_next_batch():
    """A node that has not delivered a topic up to a client's position (it started later, or
    lags) cannot tell at once whether messages after it are missing; the next batch does."""
    h = Harness()
    h.router.use_backplane(LaterBackplane(clock=lambda: h.now))
    behind, level = h.session("behind"), h.session("level")
    behind.receive(encode(Sub(1, "t", [42, 3])))
    level.receive(encode(Sub(1, "t", [42, 6])))
    written = h.tick()[0]
    assert [type(m) for m in written["behind"]] == [Ack] and [type(m) for m in written["level"]] == [Ack]
    h.router.deliver_remote([(42, [("t", [b"7", b"8"])], [7])])
    written = h.tick()[0]
    gap, delivery = written["behind"]
    assert (gap.first, gap.last, gap.cause) == (4, 6, "history") and delivery == Delivery("t", 42, 7, [b"7", b"8"])
    assert written["level"] == [Delivery("t", 42, 7, [b"7", b"8"])]
    h.router.deliver_remote([(42, [("t", [b"9"])], [9])])
    assert h.tick()[0] == {"behind": [Delivery("t", 42, 9, [b"9"])], "level": [Delivery("t", 42, 9, [b"9"])]}


def test_the_python_client_gets_the_last_value_of_a_topic_and_of_a_pattern():
    """`subscribe(topic, last=True)` starts with the topic's latest retained message, whose
    sequence number is the ack's own (the client must not take it for one from before the
    subscription), and a pattern with each matching topic's."""

    async def main():
        async with serving() as server:
            publisher = await Client.connect(url(server))
            reader = await Client.connect(url(server))
            try:
                for i in range(3):
                    await publisher.publish_acked("lv.a", b"a%d" % i)
                await publisher.publish_acked("lv.b", b"b0")
                exact, pattern = [], []
                await reader.subscribe("lv.a", exact.append, last=True)
                await reader.subscribe("lv.*", pattern.append, last=True)
                await eventually(lambda: len(exact) == 1 and len(pattern) == 2, 5, "the last values")
                assert [(m.seq, m.data) for m in exact] == [(3, b"a2")]
                assert sorted((m.topic, m.seq, m.data) for m in pattern) == [("lv.a", 3, b"a2"), ("lv.b", 1, b"b0")]
                await publisher.publish_acked("lv.a", b"a3")  # and live after it, once each
                await eventually(lambda: len(exact) == 2 and len(pattern) == 3, 5, "the next message")
                assert exact[-1].seq == 4 and pattern[-1].seq == 4
            finally:
                await publisher.close()
                await reader.close()

    run(main())
