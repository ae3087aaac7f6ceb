"""Topics retire: a topic with no subscribers, no history and no publishes for topic_idle_s is
forgotten, so max_topics cannot be exhausted for ever; its name comes back as a new topic with
a new id and a new epoch, which recovery reports."""

import pytest

from broker.backplane import unique_epoch
from broker.errors import ErrorCode
from broker.messages import Ack, Delivery, Err, GapNotice, Pub, Sub, Unsub, encode
from conftest import Harness

IDLE_MS = 1000


def settle(h, seconds=1.5, rounds=3):
    """Let the retirement scan see every topic quiet for long enough."""
    for _ in range(rounds):
        h.router.retire_idle(IDLE_MS)
        h.now += seconds / rounds
    return h.router.retire_idle(IDLE_MS)


def test_a_quiet_topic_is_forgotten_and_comes_back_with_a_new_id_and_epoch():
    h = Harness(history={"max_messages": 0})
    p = h.session("p")
    p.receive(encode(Pub(1, "t.a", b"1")))
    h.tick()
    old = h.router.topics["t.a"]
    settle(h)
    assert "t.a" not in h.router.topics and h.router.stats.retired == 1
    assert h.router.index.states[old.id] is None and h.router.index.matching("t.>") == []
    p.receive(encode(Pub(2, "t.a", b"again")))
    new = h.router.topics["t.a"]
    assert new.id != old.id and new.epoch > old.epoch and new.seq == 1
    assert h.tick()[0]["p"] == [Ack(2, new.epoch, 1)]


def test_subscribers_history_and_publishes_keep_a_topic():
    h = Harness(history={"max_messages": 10, "max_age_s": 2})
    s, p = h.session("s"), h.session("p")
    s.receive(encode(Sub(0, "kept.*")))
    p.receive(encode([Pub(0, "kept.a", b"1"), Pub(0, "busy", b"1"), Pub(0, "hist", b"1")]))
    h.tick()
    settle(h)  # kept.a: a pattern subscriber; hist: its message is in history (2 s)
    assert set(h.router.topics) == {"kept.a", "busy", "hist"}
    for _ in range(6):
        p.receive(encode(Pub(0, "busy", b"x")))  # published between scans, never quiet long
        h.tick()
        h.now += 0.4
        h.router.retire_idle(IDLE_MS)
    assert "busy" in h.router.topics
    h.now += 3  # the history of "hist" expires
    settle(h)
    assert "hist" not in h.router.topics and "kept.a" in h.router.topics
    s.receive(encode(Unsub(0, "kept.*")))
    settle(h)
    assert "kept.a" not in h.router.topics


def test_history_and_idle_time_run_together_not_one_after_the_other():
    """A topic goes once its history expired and it was idle for topic_idle_s, whichever is
    later, not history_max_age_s + topic_idle_s after its last publish."""
    h = Harness(history={"max_messages": 10, "max_age_s": 2})
    p = h.session("p")
    p.receive(encode(Pub(0, "hist", b"1")))
    h.tick()
    h.router.retire_idle(IDLE_MS)  # the scan sees its last publish (history still holds it)
    h.now += 1.5
    h.router.retire_idle(IDLE_MS)
    assert "hist" in h.router.topics  # idle long enough, but its history holds it
    h.now += 0.6  # the history expired (2 s), and it was idle 2.1 s > 1 s
    h.router.retire_idle(IDLE_MS)
    assert "hist" not in h.router.topics


def test_max_topics_is_not_exhausted_for_ever():
    h = Harness(max_topics=2, history={"max_messages": 0})
    p = h.session("p")
    p.receive(encode([Pub(1, "a", b""), Pub(2, "b", b""), Pub(3, "c", b"")]))
    written, _ = h.tick()
    assert type(written["p"][2]) is Err and written["p"][2].code == ErrorCode.TOO_MANY_TOPICS
    settle(h)
    p.receive(encode(Pub(4, "c", b"")))
    assert h.tick()[0]["p"] == [Ack(4, h.router.topics["c"].epoch, 1)]


def test_recovery_across_a_retirement_reports_the_ended_epoch():
    h = Harness(history={"max_messages": 10, "max_age_s": 1})
    p = h.session("p")
    p.receive(encode([Pub(0, "r", b"1"), Pub(0, "r", b"2")]))
    h.tick()
    old_epoch = h.router.topics["r"].epoch
    h.now += 2
    settle(h)
    assert "r" not in h.router.topics
    p.receive(encode(Pub(0, "r", b"new 1")))
    h.tick()
    s = h.session("s")
    s.receive(encode(Sub(1, "r", [old_epoch, 2])))
    out = h.tick()[0]["s"]
    new_epoch = h.router.topics["r"].epoch
    assert out == [
        Ack(1, new_epoch, 1),
        GapNotice("r", old_epoch, 3, 0, f"epoch {old_epoch} of the topic ended; it continues in epoch {new_epoch}", "ended"),
        Delivery("r", new_epoch, 1, [b"new 1"]),
    ]


def test_a_pattern_subscriber_gets_the_topic_when_it_comes_back():
    h = Harness(history={"max_messages": 0})
    p = h.session("p")
    p.receive(encode(Pub(0, "x.a", b"1")))
    h.tick()
    settle(h)
    s = h.session("s")
    s.receive(encode(Sub(0, "x.*")))
    p.receive(encode(Pub(0, "x.a", b"back")))
    (delivery,) = h.tick()[0]["s"]
    assert (delivery.topic, delivery.seq, delivery.data) == ("x.a", 1, [b"back"])


def test_a_connection_that_knew_the_old_id_is_told_the_new_one():
    h = Harness(history={"max_messages": 0})
    s, p = h.session("s"), h.session("p")
    s.receive(encode(Sub(0, "k.a")))
    p.receive(encode(Pub(0, "k.a", b"1")))
    h.tick()
    s.receive(encode(Unsub(0, "k.a")))
    h.tick()
    settle(h)
    s.receive(encode(Sub(0, "k.a")))
    p.receive(encode(Pub(0, "k.a", b"2")))
    written, _ = h.tick()
    new = h.router.topics["k.a"]
    assert written["s"] == [Delivery("k.a", new.epoch, 1, [b"2"])]
    assert len(h.frames["s"]) == 1


def test_epochs_are_unique_and_grow():
    first = unique_epoch()
    epochs = [unique_epoch() for _ in range(1000)]
    assert len(set(epochs)) > 990 and min(epochs) >> 20 >= first >> 20
    assert unique_epoch(after=first + 10**9) == first + 10**9 + 1


def test_the_index_refuses_to_retire_a_topic_with_subscribers(fastpath_impl):
    index = fastpath_impl.Index()
    state = fastpath_impl.TopicState(0, "a.b", 1)
    index.add_topic(state)
    box = fastpath_impl.Outbox("o", 1 << 20)
    index.subscribe("a.*", box)
    with pytest.raises(ValueError):
        index.retire(state)
    index.unsubscribe("a.*", box)
    index.retire(state)
    assert index.topics == {} and index.by_key == {} and index.states == [None] and index.matching("a.>") == []
    again = fastpath_impl.TopicState(1, "a.b", 2)
    index.add_topic(again)
    assert index.matching("a.*") == [again]
