"""The sans-I/O core: router and session driven with plain calls, no sockets, no loop."""

from broker.errors import ErrorCode
from broker.messages import Ack, Delivery, Err, Pub, Sub, Unsub, encode
from broker.session import HARD_LIMIT_FACTOR
from conftest import MAX_FRAME, Harness


def test_one_flush_request_per_tick_and_one_frame_per_connection():
    h = Harness()
    a, b = h.session("a"), h.session("b")
    a.receive(encode([Sub(0, "md.x"), Sub(1, "md.z")]))
    b.receive(encode([Pub(0, "md.x", b"1"), Pub(0, "md.x", b"2"), Pub(0, "md.y", b"3"), Pub(0, "md.z", b"4")]))
    b.receive(encode(Pub(0, "md.x", b"5")))
    assert h.flush_requests == 1
    written, slow = h.tick()
    assert written == {"a": [Ack(1, 0, 0), Delivery("md.x", 42, 1, [b"1", b"2", b"5"]), Delivery("md.z", 42, 1, [b"4"])]}
    assert len(h.frames["a"]) == 1  # the ack and both topics' batches in one frame
    assert slow == []
    b.receive(encode(Pub(0, "md.x", b"6")))
    assert h.flush_requests == 2
    assert h.tick()[0] == {"a": [Delivery("md.x", 42, 4, [b"6"])]}


def test_connections_receiving_the_same_pieces_share_one_bytes_object():
    h = Harness()
    subs = [h.session(i) for i in range(5)]
    for s in subs:
        s.receive(encode(Sub(0, "t.>")))
    odd = h.session("odd")
    odd.receive(encode(Sub(0, "t.a")))
    h.session("p").receive(encode([Pub(0, "t.a", b"x"), Pub(0, "t.b", b"y")]))
    touched, _ = h.router.flush()
    shared: dict = {}
    data = {box.owner: box.take(MAX_FRAME, shared) for box in touched}
    assert len({id(data[i]) for i in range(5)}) == 1  # built once, shared
    assert data["odd"] != data[0]
    assert h.router.stats.batches == 2 and h.router.stats.delivered == 11


def test_acks_carry_epoch_and_sequence():
    h = Harness()
    p = h.session("p")
    p.receive(encode([Pub(1, "t", b"a"), Pub(2, "t", b"b"), Pub(0, "t", b"c"), Pub(3, "u", b"d")]))
    p.receive(encode([Sub(4, "t"), Sub(5, "nothing.yet"), Sub(6, "t.>"), Unsub(7, "t.>")]))
    written, _ = h.tick()
    assert written["p"] == [
        Ack(1, 42, 1),
        Ack(2, 42, 2),
        Ack(3, 42, 1),
        Ack(4, 42, 3),
        Ack(5, 0, 0),
        Ack(6, int(h.now * 1000), 0),
        Ack(7, 0, 0),
    ]


def test_errors_echo_ids_and_are_counted():
    h = Harness(max_payload_bytes=4, max_subscriptions=1)
    s = h.session("s")
    s.receive(
        encode([Pub(1, "a.*", b""), Pub(2, "a..b", b""), Pub(3, "t", b"12345"), Sub(4, "x"), Sub(5, "x"), Sub(6, "y"), Unsub(7, "z")])
    )
    s.receive(b"\xc1")
    written, _ = h.tick()
    codes = [(m.id, m.code) for m in written["s"] if isinstance(m, Err)]
    assert codes == [
        (1, ErrorCode.PATTERN_NOT_ALLOWED),
        (2, ErrorCode.INVALID_TOPIC),
        (3, ErrorCode.PAYLOAD_TOO_LARGE),
        (5, ErrorCode.ALREADY_SUBSCRIBED),
        (6, ErrorCode.TOO_MANY_SUBSCRIPTIONS),
        (7, ErrorCode.NOT_SUBSCRIBED),
        (0, ErrorCode.BAD_MESSAGE),
    ]
    assert s.errors == 7
    assert sum(h.router.stats.errors.values()) == 7
    assert h.router.stats.published == 0


def test_topic_limit():
    h = Harness(max_topics=2)
    s = h.session("s")
    s.receive(encode([Pub(1, "a", b""), Pub(2, "b", b""), Pub(3, "c", b""), Pub(4, "a", b"")]))
    written, _ = h.tick()
    assert [type(m).__name__ for m in written["s"]] == ["Ack", "Ack", "Err", "Ack"]
    assert written["s"][2].code == ErrorCode.TOO_MANY_TOPICS


def test_past_its_hard_limit_a_consumer_is_reported_once_and_neighbours_keep_receiving():
    h = Harness(max_pending_bytes=1000)
    slow, fast = h.session("slow"), h.session("fast")
    slow.receive(encode(Sub(0, "t")))
    fast.receive(encode(Sub(0, "t")))
    slow.box.paused = True  # its transport stopped accepting writes
    assert slow.box.hard_limit == HARD_LIMIT_FACTOR * 1000
    delivered = []
    reported = []
    for _i in range(20):
        h.session("p").receive(encode(Pub(0, "t", bytes(300))))
        touched, slow_boxes = h.router.flush()  # what the server does with them:
        for box in touched:
            box.scheduled = False
            if box.closed:
                continue
            if box.paused:
                if box.keep():  # its share of the tick waits, up to the hard limit
                    slow_boxes.append(box)
                continue
            delivered += [m.seq for m in h.read(box, box.take(MAX_FRAME))]
        h.router.end_tick()
        reported += [box.owner for box in slow_boxes]
        for _box in slow_boxes:
            slow.close()  # the server closes it; here the session just goes away
    assert reported == ["slow"]
    assert delivered == list(range(1, 21))
    assert h.router.index.receivers("t") == [fast.box]


def test_closing_a_session_drops_its_subscriptions():
    h = Harness()
    s = h.session("s")
    s.receive(encode([Sub(0, "a"), Sub(0, "b.>")]))
    s.close()
    s.close()
    assert len(h.router.index) == 0
    s.receive(encode(Pub(1, "a", b"x")))
    assert h.router.stats.published == 0


def test_a_subscriber_receives_exactly_the_messages_after_its_ack():
    h = Harness()
    early, late, pattern = h.session("early"), h.session("late"), h.session("pattern")
    early.receive(encode(Sub(0, "t")))
    publisher = h.session("p")
    publisher.receive(encode([Pub(0, "t", b"1"), Pub(0, "t", b"2")]))
    late.receive(encode(Sub(1, "t")))
    pattern.receive(encode(Sub(2, "*")))
    publisher.receive(encode(Pub(0, "t", b"3")))
    written, _ = h.tick()
    assert written["early"] == [Delivery("t", 42, 1, [b"1", b"2"]), Delivery("t", 42, 3, [b"3"])]
    assert written["late"] == [Ack(1, 42, 2), Delivery("t", 42, 3, [b"3"])]
    assert written["pattern"] == [Ack(2, int(h.now * 1000), 0), Delivery("t", 42, 3, [b"3"])]


def test_unsubscribe_delivers_what_was_published_before_it():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Sub(0, "t")))
    h.tick()
    s.receive(encode([Pub(0, "t", b"1"), Unsub(2, "t"), Pub(0, "t", b"2")]))
    written, _ = h.tick()
    assert written["s"] == [Delivery("t", 42, 1, [b"1"]), Ack(2, 0, 0)]


def test_within_a_frame_replies_come_before_the_live_deliveries():
    """protocol.md 2.2: what the server produced handling the client's frames first, then the
    iteration's live deliveries, so a pub's ack precedes that message's own delivery."""
    h = Harness()
    a, b = h.session("a"), h.session("b")
    a.receive(encode(Sub(1, "t")))
    h.tick()
    b.receive(encode(Pub(0, "t", b"first")))  # published first in the iteration
    a.receive(encode([Pub(2, "t", b"mine"), Unsub(3, "other")]))
    written, _ = h.tick()
    epoch = h.router.topics["t"].epoch
    assert written["a"] == [
        Ack(2, epoch, 2),
        Err(3, ErrorCode.NOT_SUBSCRIBED, "not subscribed to 'other'"),
        Delivery("t", epoch, 1, [b"first", b"mine"]),
    ]
    assert len(h.frames["a"]) == 1
