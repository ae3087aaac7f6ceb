"""Slow-consumer policies (protocol.md section 7): `drop` drops the oldest queued batches and
names every lost range in a gap; `conflate` keeps the newest message of each topic and marks
what it skipped; a subscription may choose its own policy and the most careful one wins."""

from __future__ import annotations

import asyncio

import pytest

from broker import policy
from broker.client import Client, Gap, Message, Subscription
from broker.fastpath import Outbox, assemble, encode_batch, encode_topic
from broker.messages import Ack, Delivery, Err, GapNotice, Sub, decode_server_frame, encode
from broker.router import Router
from conftest import RawSocketClient, conns_with, run, serving, split_frames, url

SIZE = 4 << 10
LIMIT = 256 << 10


def payload(topic: str, seq: int) -> bytes:
    head = f"{topic}:{seq}:".encode()
    return head + bytes(SIZE - len(head))


async def flood(pub: Client, topics: list[str], conn, samples: list[int], until) -> dict[str, int]:
    """Publish to each topic, round robin, until `until()` holds (what the kernel's socket
    buffers take first varies), recording the slow connection's queue in the broker as it
    goes; returns the last sequence number of each topic."""
    rounds = 0
    while not until():
        for _ in range(8):
            rounds += 1
            for topic in topics:
                pub.publish(topic, payload(topic, rounds))
        await pub.publish_acked(topics[0] + ".sync", b"")  # wait until the broker took them
        samples.append(conn.box.size)
        assert rounds < 20_000, "the broker never fell behind"
    return {topic: rounds for topic in topics}


async def read_until(client: RawSocketClient, last: dict[str, int], extra: int = 0) -> list:
    """Read until every topic's last sequence number was delivered or covered by a gap (and
    `extra` more non-delivery messages arrived); returns what came, in order."""
    seen = {topic: 0 for topic in last}
    got: list = []
    others = 0
    while any(seen[t] < last[t] for t in last) or others < extra:
        message = await asyncio.wait_for(client.recv(), 10)
        got.append(message)
        if isinstance(message, Delivery) and message.topic in seen:
            seen[message.topic] = max(seen[message.topic], message.seq + len(message.data) - 1)
        elif isinstance(message, GapNotice) and message.topic in seen:
            seen[message.topic] = max(seen[message.topic], message.last)
        else:
            others += 1
    return got


def per_topic(got: list, topic: str) -> list:
    """(kind, first, last, item) for the deliveries and gaps of one topic, in arrival order."""
    out = []
    for m in got:
        if isinstance(m, Delivery) and m.topic == topic:
            out.append(("msg", m.seq, m.seq + len(m.data) - 1, m))
        elif isinstance(m, GapNotice) and m.topic == topic:
            out.append(("gap", m.first, m.last, m))
    return out


def assert_exact_cover(items: list, last: int) -> tuple[int, int]:
    """Deliveries and gaps of one topic follow each other without overlap or hole from 1 to
    `last`, and every delivered payload is the one published with its sequence number.
    Returns (messages delivered, messages in gaps)."""
    expected = 1
    delivered = lost = 0
    for kind, first, end, item in items:
        assert first == expected, f"{kind} starts at {first}, expected {expected}: {items[:8]}"
        if kind == "msg":
            for i, data in enumerate(item.data):
                assert data == payload(item.topic, first + i)
            delivered += end - first + 1
        else:
            lost += end - first + 1
        expected = end + 1
    assert expected == last + 1
    return delivered, lost


def test_drop_tells_the_exact_ranges_it_dropped_and_keeps_the_connection():
    topics = ["d.a", "d.b", "d.c"]

    async def main():
        async with serving(max_pending_bytes=LIMIT, max_payload_bytes=64 << 10, slow_consumer_timeout_s=0.3) as server:
            async with Client(url(server)) as pub:
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "d.*", None, False, False, "drop"))
                    assert isinstance(await slow.recv(), Ack)
                    (conn,) = conns_with(server, {"d.*"})
                    samples: list[int] = []
                    last = await flood(pub, topics, conn, samples, lambda: server.router.stats.sheds >= 3)
                    await slow.send(Sub(7, "other"))  # a reply queued behind the deliveries
                    await asyncio.sleep(0.6)  # twice slow_consumer_timeout_s: still open
                    assert conn.close_reason is None
                    got = await read_until(slow, last, extra=1)
                    assert Ack(7, 0, 0) in got, "the ack of a request made while behind was dropped"
                    lost_total = 0
                    for topic in topics:
                        items = per_topic(got, topic)
                        delivered, lost = assert_exact_cover(items, last[topic])
                        assert lost and delivered, f"{topic}: nothing dropped or nothing delivered"
                        assert items[-1][0] == "msg", "the newest messages are the ones kept"
                        gaps = [item for kind, _, _, item in items if kind == "gap"]
                        assert all(g.cause == "dropped" and g.reason.startswith("dropped") for g in gaps)
                        lost_total += lost
                    stats = server.router.stats
                    assert stats.dropped == lost_total and stats.conflated == 0 and stats.sheds > 0
                    assert stats.slow_consumers == 0 and conn.close_reason is None
                    assert max(samples) <= LIMIT, f"queued {max(samples)} bytes, bound {LIMIT}"
                finally:
                    slow.close()

    run(main())


def test_conflate_keeps_the_newest_message_of_each_topic_and_marks_what_it_skipped():
    topics = [f"c.{i}" for i in range(5)]

    async def main():
        async with serving(max_pending_bytes=LIMIT, max_payload_bytes=64 << 10, slow_consumer_timeout_s=0.3) as server:
            async with Client(url(server)) as pub:
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "c.*", None, False, False, "conflate"))
                    assert isinstance(await slow.recv(), Ack)
                    (conn,) = conns_with(server, {"c.*"})
                    samples: list[int] = []
                    last = await flood(pub, topics, conn, samples, lambda: server.router.stats.sheds >= 3)
                    await asyncio.sleep(0.6)
                    got = await read_until(slow, last)
                    for topic in topics:
                        items = per_topic(got, topic)
                        delivered, lost = assert_exact_cover(items, last[topic])
                        assert lost and delivered, f"{topic}: {delivered} delivered, {lost} conflated"
                        assert items[-1][0] == "msg" and items[-1][2] == last[topic], "the newest message arrives"
                        for i, (kind, _first, end, item) in enumerate(items):
                            if kind == "gap":
                                assert item.cause == "conflated"
                                # right after it: one message, the topic's newest at that moment
                                assert items[i + 1][0] == "msg" and items[i + 1][1] == end + 1
                    assert server.router.stats.conflated > 0 and server.router.stats.dropped == 0
                    assert conn.close_reason is None and max(samples) <= LIMIT
                finally:
                    slow.close()

    run(main())


def test_a_subscription_chooses_its_policy_and_the_most_careful_one_wins():
    """Server default conflate. Connection A holds `p.>` (the default); connection B holds
    `p.>` too and `p.a` with policy disconnect. A flood on p.a conflates for A and closes B."""

    async def main():
        async with serving(
            max_pending_bytes=LIMIT,
            max_payload_bytes=64 << 10,
            slow_consumer_timeout_s=0.3,
            close_timeout_s=0.2,
            slow_consumer_policy="conflate",
        ) as server:
            async with Client(url(server)) as pub:
                a = await RawSocketClient.connect(server.port, rcvbuf=4096)
                b = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await a.send(Sub(1, "p.>"))
                    assert isinstance(await a.recv(), Ack)
                    await b.send(Sub(1, "p.>"))
                    assert isinstance(await b.recv(), Ack)
                    await b.send(Sub(2, "p.a", None, False, False, "disconnect"))
                    assert isinstance(await b.recv(), Ack)
                    (conn_a,) = conns_with(server, {"p.>"})
                    (conn_b,) = conns_with(server, {"p.>", "p.a"})
                    assert conn_a.session.policy_of(server.router.topic("p.a").id) == policy.CONFLATE
                    assert conn_b.session.policy_of(server.router.topic("p.a").id) == policy.DISCONNECT
                    assert conn_b.session.policy_of(server.router.topic("p.b").id) == policy.CONFLATE
                    samples: list[int] = []
                    last = await flood(
                        pub, ["p.a"], conn_a, samples, lambda: conn_b.close_reason is not None and server.router.stats.sheds >= 2
                    )
                    assert conn_b.close_reason[0] == 1013
                    assert conn_a.close_reason is None
                    got = await read_until(a, last)
                    assert_exact_cover(per_topic(got, "p.a"), last["p.a"])
                    assert server.router.stats.slow_consumers == 1
                finally:
                    a.close()
                    b.close()

    run(main())


def test_an_unknown_policy_is_refused_with_the_request_id():
    async def main():
        async with serving() as server:
            client = await RawSocketClient.connect(server.port)
            try:
                await client.send(["sub", 5, "t", None, False, False, "sometimes"])
                reply = await client.recv()
                assert isinstance(reply, Err) and reply.id == 5 and reply.code == 1
                assert "policy" in reply.text or "sometimes" in reply.text or "one of" in reply.text
                await client.send(Sub(6, "t"))
                assert await client.recv() == Ack(6, 0, 0)
            finally:
                client.close()
            with pytest.raises(ValueError):
                async with Client(url(server)) as c:
                    await c.subscribe("t", policy="sometimes")

    run(main())


# the shedding pass on a queue, without sockets


def _router_with(*names: str) -> Router:
    router = Router(lambda: None)
    for name in names:
        router.topic(name)
    return router


def _read(pieces: list[bytes], router: Router) -> list:
    """The server messages of a queue, as a client reads them."""
    return _read_frames(assemble(pieces, 1 << 20))


def _read_frames(data: bytes) -> list:
    """The server messages of a stream of frames."""
    out = []
    for _, payload in split_frames(data):
        out.extend(decode_server_frame(payload))
    return out


def test_shedding_merges_into_its_own_earlier_gap_and_keeps_everything_else_in_order():
    router = _router_with("s.a", "s.b")
    a, b = router.topics["s.a"], router.topics["s.b"]
    box = Outbox(None, 1000)
    shed = policy.Shed(lambda topic_id: policy.DROP, router.index.states)
    box.push(encode_topic(a.id, a.name, a.epoch))
    box.push(encode_batch(a.id, 1, [b"a1", b"a2"]))
    box.push(encode(Ack(3, 0, 0)))
    box.push(encode_batch(a.id, 3, [b"a3"]))
    box.push(encode_topic(b.id, b.name, b.epoch))
    box.push(encode_batch(b.id, 1, [b"b1"]))
    dropped, conflated = shed.shed(box, 0)
    assert (dropped, conflated) == (4, 0)
    out = _read(box.pieces, router)
    kinds = [type(m).__name__ for m in out]
    assert kinds == ["Topic", "GapNotice", "Ack", "Topic", "GapNotice"]
    assert (out[1].topic, out[1].first, out[1].last, out[1].cause) == ("s.a", 1, 3, "dropped")
    assert (out[4].topic, out[4].first, out[4].last) == ("s.b", 1, 1)
    # more arrives before any of it was written: the second pass extends the same gaps
    box.push(encode_batch(a.id, 4, [b"a4", b"a5"]))
    box.push(encode_batch(b.id, 2, [b"b2"]))
    assert shed.shed(box, 0) == (3, 0)
    out = _read(box.pieces, router)
    assert [type(m).__name__ for m in out] == ["Topic", "GapNotice", "Ack", "Topic", "GapNotice"]
    assert (out[1].first, out[1].last, out[4].first, out[4].last) == (1, 5, 1, 2)
    assert box.size == sum(map(len, box.pieces))


def test_conflating_holds_each_topics_newest_message_and_writes_it_after_its_gap():
    router = _router_with("k.a", "k.b", "k.c")
    a, b, c = router.topics["k.a"], router.topics["k.b"], router.topics["k.c"]
    box = Outbox(None, 1 << 20)
    conflating = {a.id, c.id}
    shed = policy.Shed(lambda topic_id: policy.CONFLATE if topic_id in conflating else policy.DISCONNECT, router.index.states)
    alone = encode_batch(c.id, 1, [b"c1"])
    for piece in (
        a.announce,
        encode_batch(a.id, 1, [b"a1", b"a2"]),
        b.announce,
        encode_batch(b.id, 1, [b"b1", b"b2"]),
        encode_batch(a.id, 3, [b"a3", b"a4", b"a5"]),
        c.announce,
        alone,
        encode_batch(b.id, 3, [b"b3"]),
    ):
        box.push(piece)
    assert shed.shed(box, 0) == (0, 4)
    # k.b (disconnect) stays queued; k.a and k.c wait out of the queue, one message each
    assert [(bt.topic_id, bt.seq) for m in _read(box.pieces, router) if type(m).__name__ == "Msg" for bt in m.batches] == [
        (b.id, 1),
        (b.id, 3),
    ]
    assert set(shed.held) == {a.id, c.id} and shed.held[c.id].piece is alone  # a batch of one is kept as it is, shared
    box.push(encode_batch(a.id, 6, [b"a6"]))  # a later one replaces it; the gap grows
    out = _read_frames(shed.take(box, 1 << 20, 1 << 20, {}, {}))
    assert not shed.held and not box.pieces and shed.held_bytes == 0
    names = [type(m).__name__ for m in out]
    assert names == ["Topic", "Topic", "Msg", "Topic", "Msg", "GapNotice", "Msg"]
    assert [(bt.topic_id, bt.seq, bt.data) for bt in out[2].batches + out[4].batches] == [(b.id, 1, [b"b1", b"b2"]), (b.id, 3, [b"b3"])]
    assert (out[5].topic, out[5].first, out[5].last, out[5].cause) == ("k.a", 1, 5, "conflated")
    assert [(bt.topic_id, bt.seq, bt.data) for bt in out[6].batches] == [(a.id, 6, [b"a6"]), (c.id, 1, [b"c1"])]


def test_a_held_message_goes_back_in_line_when_its_topic_stops_conflating():
    router = _router_with("h.a")
    a = router.topics["h.a"]
    box = Outbox(None, 1 << 20)
    policies = {a.id: policy.CONFLATE}
    shed = policy.Shed(policies.__getitem__, router.index.states)
    box.push(a.announce)
    box.push(encode_batch(a.id, 1, [b"1", b"2"]))
    shed.shed(box, None)
    box.push(encode_batch(a.id, 3, [b"3"]))
    policies[a.id] = policy.DISCONNECT
    shed.policies_changed()
    shed.shed(box, None)
    out = _read(box.pieces, router)
    assert not shed.held and [type(m).__name__ for m in out] == ["Topic", "GapNotice", "Msg"]
    assert (out[1].first, out[1].last) == (1, 1)
    assert [(bt.seq, bt.data) for bt in out[2].batches] == [(2, [b"2"]), (3, [b"3"])]


def test_the_python_client_marks_the_message_after_a_conflated_gap():
    sub = Subscription.__new__(Subscription)
    items: list = []
    Subscription.__init__(sub, None, "q.*", items.append, 100)  # type: ignore[arg-type]
    sub.receive("q.a", 9, 1, [b"1"])
    sub.gap(Gap("q.a", 9, 2, 6, "conflated", "conflated"))
    sub.receive("q.a", 9, 7, [b"7", b"8"])
    sub.gap(Gap("q.a", 9, 9, 9, "dropped", "dropped"))
    sub.receive("q.a", 9, 10, [b"10"])
    assert items == [
        Message("q.a", 9, 1, b"1"),
        Gap("q.a", 9, 2, 6, "conflated", "conflated"),
        Message("q.a", 9, 7, b"7", True),
        Message("q.a", 9, 8, b"8"),
        Gap("q.a", 9, 9, 9, "dropped", "dropped"),
        Message("q.a", 9, 10, b"10"),
    ]


@pytest.mark.parametrize("chosen, size", [("drop", 4 << 10), ("conflate", 512)])
def test_a_shedding_connection_is_written_within_its_bound_and_never_closed_at_a_small_one(chosen, size):
    """max_pending_bytes 64 KiB, 50 topics, publishes of far more than that per loop iteration
    to a subscriber that reads slowly: what the broker hands its socket at once stays within
    the bound, the rest waits where the policy sheds it; the connection is never closed, and
    every topic's messages arrive or are named by gaps, to the last one."""
    limit = 64 << 10
    topics = [f"b.{i}" for i in range(50)]

    def data(topic: str, seq: int) -> bytes:
        head = f"{topic}:{seq}:".encode()
        return head + bytes(size - len(head))

    async def main():
        async with serving(max_pending_bytes=limit, max_payload_bytes=16 << 10, slow_consumer_timeout_s=0.3) as server:
            async with Client(url(server)) as pub:
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "b.*", None, False, False, chosen))
                    assert isinstance(await slow.recv(), Ack)
                    (conn,) = conns_with(server, {"b.*"})
                    backlog: list[int] = []
                    rounds = 0
                    while server.router.stats.sheds < 5:
                        for _ in range(4):
                            rounds += 1
                            for topic in topics:
                                pub.publish(topic, data(topic, rounds))
                        await pub.publish_acked("b.sync.x", b"")
                        backlog.append(conn.box.size + conn.buffer_size())
                        assert conn.close_reason is None, conn.close_reason
                        assert rounds < 4000, "the broker never fell behind"
                    await asyncio.sleep(0.6)  # twice slow_consumer_timeout_s
                    assert conn.close_reason is None and server.router.stats.slow_consumers == 0
                    assert max(backlog) <= limit, f"{max(backlog)} bytes queued, bound {limit}"
                    got = await read_until(slow, {topic: rounds for topic in topics})
                    for topic in topics:
                        items = per_topic(got, topic)
                        expected = 1
                        for kind, first, end, item in items:
                            assert first == expected, f"{topic}: {kind} starts at {first}, expected {expected}"
                            if kind == "msg":
                                assert item.data == [data(topic, seq) for seq in range(first, end + 1)]
                            else:
                                assert item.cause in ("dropped", "conflated")
                            expected = end + 1
                        assert items[-1][0] == "msg" or chosen == "drop"
                finally:
                    slow.close()

    run(main())


def test_a_shedding_connection_is_handed_at_most_its_budget_cutting_a_batch_between_messages():
    router = _router_with("w.a", "w.b")
    a, b = router.topics["w.a"], router.topics["w.b"]
    box = Outbox(None, 1 << 20)
    payloads = [bytes([i]) * 1000 for i in range(10)]
    box.push(a.announce)
    box.push(encode_batch(a.id, 1, payloads))
    box.push(encode_batch(b.id, 1, [b"b1"]))
    shed = policy.Shed(lambda topic_id: policy.DROP, router.index.states)
    written = _read_frames(shed.take(box, 3000, 1 << 20, {}, {}))
    assert [type(m).__name__ for m in written] == ["Topic", "Msg"]
    (batch,) = written[1].batches
    assert (batch.topic_id, batch.seq, batch.data) == (a.id, 1, payloads[:2])
    assert box.size == sum(map(len, box.pieces)) and len(box.pieces) == 2
    rest = _read(box.pieces, router)
    assert [(bt.topic_id, bt.seq, len(bt.data)) for bt in rest[0].batches] == [(a.id, 3, 8), (b.id, 1, 1)]
    # one message larger than the budget goes alone; what fits is all taken, as one frame
    assert len(_read_frames(shed.take(box, 500, 1 << 20, {}, {}))[0].batches[0].data) == 1
    small = Outbox(None, 1 << 20)
    small.push(encode_batch(b.id, 2, [b"b2"]))
    assert _read_frames(shed.take(small, 500, 1 << 20, {}, {}))[0].batches[0].data == [b"b2"]
    assert not small.pieces and small.size == 0


def test_conflate_delivers_the_newest_message_of_every_topic_however_many_bytes_that_is():
    """400 topics of 1.9 KB messages behind a 512 KiB bound: their newest messages alone are
    more than the bound, and every one of them still arrives, after a `conflated` gap for what
    was skipped; nothing is dropped and the connection stays open."""
    limit = 512 << 10
    topics = [f"n.{i}" for i in range(400)]
    size = 1900

    def data(topic: str, seq: int) -> bytes:
        head = f"{topic}:{seq}:".encode()
        return head + bytes(size - len(head))

    async def main():
        async with serving(max_pending_bytes=limit, max_payload_bytes=64 << 10, slow_consumer_timeout_s=0.3) as server:
            async with Client(url(server)) as pub:
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "n.*", None, False, False, "conflate"))
                    assert isinstance(await slow.recv(), Ack)
                    (conn,) = conns_with(server, {"n.*"})
                    rounds = 0
                    while server.router.stats.sheds < 4:
                        rounds += 1
                        for topic in topics:
                            pub.publish(topic, data(topic, rounds))
                        await pub.publish_acked("n.sync.x", b"")
                        assert rounds < 2000, "the broker never fell behind"
                    await asyncio.sleep(0.6)  # twice slow_consumer_timeout_s
                    assert conn.close_reason is None and server.router.stats.slow_consumers == 0
                    got = await read_until(slow, {topic: rounds for topic in topics})
                    for topic in topics:
                        items = per_topic(got, topic)
                        expected = 1
                        for kind, first, end, item in items:
                            assert first == expected, f"{topic}: {kind} starts at {first}, expected {expected}"
                            if kind == "msg":
                                assert item.data == [data(topic, seq) for seq in range(first, end + 1)]
                            else:
                                assert item.cause == "conflated", item
                            expected = end + 1
                        assert items[-1][0] == "msg" and items[-1][2] == rounds, f"{topic}: the newest message did not arrive"
                    stats = server.router.stats
                    assert stats.conflated > 0 and stats.dropped == 0
                finally:
                    slow.close()

    run(main())


@pytest.mark.slow
def test_a_conflating_screen_over_100000_topics_gets_every_newest_message_with_the_defaults():
    """A `md.>` screen with policy conflate, every setting at its default (except the bursts of
    topics the publisher, and its address, may create), stops reading while each of ~100,000 topics is
    published three times: it stays open, and once it reads it gets each topic's newest
    message (after a `conflated` gap where it missed some)."""
    count = 99_000  # max_topics is 100,000; the publisher's sync topic is one more
    topics = [f"md.{i // 1000}.{i % 1000}" for i in range(count)]
    rounds = 3

    def data(i: int, seq: int) -> bytes:
        return b"%d:%d:" % (i, seq) + bytes(80)

    async def main():
        async with serving(new_topic_burst=200_000, ip_new_topic_burst=200_000) as server:
            async with Client(url(server)) as pub:
                screen = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await screen.send(Sub(1, "md.>", None, False, False, "conflate"))
                    assert isinstance(await screen.recv(), Ack)
                    (conn,) = conns_with(server, {"md.>"})
                    for seq in range(1, rounds + 1):
                        for i, topic in enumerate(topics):
                            pub.publish(topic, data(i, seq))
                            if i % 5000 == 4999:
                                await pub.drain()
                        await pub.publish_acked("sync", b"")
                    stats = server.router.stats
                    assert stats.sheds > 0, "the screen never fell behind"
                    assert stats.dropped == 0, f"{stats.dropped} messages dropped"
                    assert conn.close_reason is None and server.router.stats.slow_consumers == 0
                    newest: dict[str, int] = {}
                    done = 0  # topics whose newest message arrived
                    while done < count:
                        message = await asyncio.wait_for(screen.recv(), 10)
                        if isinstance(message, Delivery):
                            last = message.seq + len(message.data) - 1
                            assert last > newest.get(message.topic, 0)
                            i = int(message.data[-1].split(b":")[0])
                            assert message.data[-1] == data(i, last) and topics[i] == message.topic
                            done += last == rounds
                        else:
                            assert isinstance(message, GapNotice) and message.cause == "conflated", message
                            assert message.first == newest.get(message.topic, 0) + 1 and message.last < rounds
                        newest[message.topic] = last if isinstance(message, Delivery) else message.last
                    assert conn.close_reason is None
                finally:
                    screen.close()

    run(main(), timeout=110)
