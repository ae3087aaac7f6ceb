"""End to end: a real server on a free port, real clients (broker.client.Client), raw WebSocket
clients where the wire itself must be observed (frames, duplicates, a consumer that never reads)."""

from __future__ import annotations

import asyncio
import time

from broker.client import Client
from broker.messages import Ack, Delivery, Sub, Unsub, encode
from conftest import eventually, record_writes, recv_message, run, server_conn_with, serving, split_frames, url, ws_raw

# helpers


def collector():
    """A subscription callback that records every Message, and the list it records into."""
    got = []
    return got, got.append


def test_many_subscribers_get_every_message_in_order():
    n_subs, n_msgs, burst = 50, 2000, 50

    async def main():
        async with serving() as server:
            subscribers = await asyncio.gather(*(Client.connect(url(server)) for _ in range(n_subs)))
            publisher = await Client.connect(url(server))
            try:
                received = []
                for client in subscribers:
                    got, callback = collector()
                    received.append(got)
                    sub = await client.subscribe("fan.out", callback)
                    assert (sub.epoch, sub.seq) == (0, 0)
                expected = [b"payload-%d" % i for i in range(n_msgs)]
                for start in range(0, n_msgs, burst):
                    for data in expected[start : start + burst]:
                        publisher.publish("fan.out", data)
                    await asyncio.sleep(0)
                await eventually(lambda: all(len(got) == n_msgs for got in received), 10, "every delivery")
                epoch = server.router.epoch
                for got in received:
                    assert [m.seq for m in got] == list(range(1, n_msgs + 1))
                    assert [m.data for m in got] == expected
                    assert {(m.topic, m.epoch) for m in got} == {("fan.out", epoch)}
                stats = server.router.stats
                assert stats.published == n_msgs
                assert stats.delivered == n_msgs * n_subs
                # each burst left the client in one frame and became at most one batch frame
                assert stats.batches <= n_msgs // burst
                assert not stats.closes and not stats.errors
            finally:
                await asyncio.gather(publisher.close(), *(c.close() for c in subscribers))

    run(main())


def test_order_per_topic_with_several_publishers_and_topics():
    topics = ["ord.a", "ord.b", "ord.c"]
    n_pubs, per_pub = 4, 300

    async def main():
        async with serving() as server:
            async with Client(url(server)) as wild, Client(url(server)) as exact:
                all_got, on_all = collector()
                a_got, on_a = collector()
                await wild.subscribe("ord.>", on_all)
                await exact.subscribe("ord.a", on_a)
                publishers = await asyncio.gather(*(Client.connect(url(server)) for _ in range(n_pubs)))

                async def publish(p: int, client: Client) -> None:
                    for k in range(per_pub):
                        client.publish(topics[k % len(topics)], b"%d:%d" % (p, k))
                        if k % 7 == 6:
                            await asyncio.sleep(0)

                await asyncio.gather(*(publish(p, c) for p, c in enumerate(publishers)))
                total = n_pubs * per_pub
                await eventually(lambda: len(all_got) == total, 10, "all messages")
                await eventually(lambda: len(a_got) == total // len(topics), 5, "ord.a messages")
                for topic in topics:
                    mine = [m for m in all_got if m.topic == topic]
                    assert [m.seq for m in mine] == list(range(1, len(mine) + 1))
                    for p in range(n_pubs):
                        ks = [int(m.data.split(b":")[1]) for m in mine if m.data.startswith(b"%d:" % p)]
                        assert ks == [k for k in range(per_pub) if topics[k % len(topics)] == topic]
                # two subscribers of one topic see the very same sequence
                assert a_got == [m for m in all_got if m.topic == "ord.a"]
                for c in publishers:
                    await c.close()

    run(main())


def test_wildcard_matching():
    published = ["md.NASDAQ.AAPL", "md.NYSE.AAPL", "md.NASDAQ.MSFT", "md.AAPL", "md.a.b.AAPL", "md", "other.x"]
    marker = "md.zz.AAPL"  # matches every subscription below

    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub:
                subs = {p: await sub_client.subscribe(p) for p in ("md.*.AAPL", "md.>", ">", "*.AAPL", "md.*")}
                for topic in published + [marker]:
                    await pub.publish_acked(topic, topic.encode())

                async def topics_until(sub, last: str) -> list[str]:
                    topics = []
                    while True:
                        message = await sub.next(5)
                        assert message.data == message.topic.encode()
                        if message.topic == last:
                            return topics
                        topics.append(message.topic)

                assert await topics_until(subs["md.*.AAPL"], marker) == ["md.NASDAQ.AAPL", "md.NYSE.AAPL"]
                assert await topics_until(subs["md.>"], marker) == [t for t in published if t.startswith("md.")]
                assert await topics_until(subs[">"], marker) == published
                # `*.AAPL` and `md.*` are exactly two tokens long
                await pub.publish_acked("end.AAPL", b"end.AAPL")
                await pub.publish_acked("md.end", b"md.end")
                assert await topics_until(subs["*.AAPL"], "end.AAPL") == ["md.AAPL"]
                assert await topics_until(subs["md.*"], "md.end") == ["md.AAPL"]

    run(main())


def test_overlapping_subscriptions_receive_each_message_once():
    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                for rid, pattern in enumerate(("md.>", "md.X", "md.*", ">"), 1):
                    await ws.send(encode(Sub(rid, pattern)))
                    ack = await recv_message(ws)
                    assert type(ack) is Ack and ack.id == rid and ack.seq == 0
                    assert ack.epoch > 1_700_000_000_000 if pattern != "md.X" else ack.epoch == 0  # a pattern's ack: its start time
                async with Client(url(server)) as pub, Client(url(server)) as both:
                    wide = await both.subscribe("md.>")
                    narrow = await both.subscribe("md.X")
                    ack = await pub.publish_acked("md.X", b"one")
                    await pub.publish_acked("md.Y", b"marker")
                    first = await recv_message(ws)
                    assert first == Delivery("md.X", ack.epoch, 1, [b"one"])
                    # the next frame is the marker: md.X was not sent a second time
                    assert await recv_message(ws) == Delivery("md.Y", ack.epoch, 1, [b"marker"])
                    # the Python client hands the one message to each matching subscription
                    assert (await wide.next(5)).data == b"one"
                    assert (await narrow.next(5)).data == b"one"
                    assert (await wide.next(5)).data == b"marker"
                    assert server.router.stats.delivered == 4  # md.X and md.Y to 2 connections
            finally:
                await ws.close()

    run(main())


def test_new_subscription_overlapping_an_existing_one_starts_after_its_ack():
    """A client holding `t.>` subscribes to `t.aN` while messages on t.aN flow: the new
    Subscription receives exactly the messages with seq > its ack's seq, none from before."""
    n_topics = 5

    async def main():
        async with serving() as server:
            async with Client(url(server)) as client, Client(url(server)) as pub:
                wide_got = []
                await client.subscribe("t.>", wide_got.append)
                for k in range(n_topics):
                    topic = f"t.a{k}"
                    flowing = True

                    async def flow():
                        while flowing:
                            pub.publish(topic, b"x")
                            pub.publish(topic, b"y")
                            await asyncio.sleep(0)

                    task = asyncio.get_running_loop().create_task(flow())
                    try:
                        await eventually(lambda: any(m.topic == topic for m in wide_got), 3, "messages to flow")
                        narrow = await client.subscribe(topic)
                        await eventually(lambda: wide_got[-1].topic == topic and wide_got[-1].seq > narrow.seq + 5, 3, "more messages")
                    finally:
                        flowing = False
                        await task
                    last = await pub.publish_acked(topic, b"last")
                    assert narrow.seq > 0  # messages were published before the subscription
                    seqs = []
                    while not seqs or seqs[-1] < last.seq:
                        seqs.append((await narrow.next(3)).seq)
                    assert seqs == list(range(narrow.seq + 1, last.seq + 1))
                    # the wide subscription saw everything, once
                    assert [m.seq for m in wide_got if m.topic == topic] == list(range(1, last.seq + 1))

    run(main())


def test_many_topics_all_delivered():
    n = 1000
    names = [f"many.t{i}" for i in range(n)]

    async def main():
        async with serving() as server:
            async with Client(url(server)) as exact, Client(url(server)) as wild, Client(url(server)) as pub:
                per_topic = {name: [] for name in names}
                subs = await asyncio.gather(*(exact.subscribe(name, per_topic[name].append) for name in names))
                assert all((s.epoch, s.seq) == (0, 0) for s in subs)
                all_got, on_all = collector()
                await wild.subscribe("many.>", on_all)
                frames_before = server.router.stats.batches
                for name in names:  # one tick: one client frame, one batch frame per topic
                    pub.publish(name, name.encode())
                await eventually(lambda: len(all_got) == n, 10, "the '>' subscriber")
                await eventually(lambda: all(per_topic.values()), 10, "every exact subscriber")
                epoch = server.router.epoch
                for name in names:
                    assert [tuple(m)[:4] for m in per_topic[name]] == [(name, epoch, 1, name.encode())]
                assert sorted(m.topic for m in all_got) == sorted(names)
                assert all(m.seq == 1 and m.data == m.topic.encode() for m in all_got)
                assert server.router.stats.batches - frames_before == n
                assert len(server.router.topics) == n

    run(main())


def test_acked_publish_and_subscribe_ack():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as pub, Client(url(server)) as sub_client:
                epoch = server.router.epoch
                acks = [await pub.publish_acked("acks.t", b"%d" % i) for i in range(5)]
                assert [tuple(a) for a in acks] == [(epoch, i) for i in range(1, 6)]
                # requests in one frame are answered in order
                acks = await asyncio.gather(*(pub.publish_acked("acks.t", b"x") for _ in range(10)))
                assert [a.seq for a in acks] == list(range(6, 16))
                assert {a.epoch for a in acks} == {epoch}
                # topics count independently
                assert tuple(await pub.publish_acked("acks.other", b"y")) == (epoch, 1)

                sub = await sub_client.subscribe("acks.t")
                assert (sub.epoch, sub.seq) == (epoch, 15)
                never = await sub_client.subscribe("acks.never")
                assert (never.epoch, never.seq) == (0, 0)
                pattern = await sub_client.subscribe("acks.>")
                assert pattern.seq == 0 and abs(pattern.epoch - time.time() * 1000) < 60_000  # a pattern's ack: its start time

                ack = await pub.publish_acked("acks.t", b"next")
                assert ack.seq == 16
                message = await sub.next(5)
                assert (message.seq, message.epoch, message.data) == (16, epoch, b"next")
                assert (await pattern.next(5)).seq == 16

    run(main())


def test_unsubscribe_stops_delivery():
    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(encode(Sub(1, "u.a")))
                assert await recv_message(ws) == Ack(1)
                await ws.send(encode(Sub(2, "u.b")))
                assert await recv_message(ws) == Ack(2)
                async with Client(url(server)) as pub, Client(url(server)) as client:
                    sub = await client.subscribe("u.a")
                    await pub.publish_acked("u.a", b"before")
                    assert (await recv_message(ws)).data == [b"before"]
                    assert (await sub.next(5)).data == b"before"

                    await ws.send(encode(Unsub(3, "u.a")))
                    assert await recv_message(ws) == Ack(3)
                    await sub.unsubscribe()
                    await pub.publish_acked("u.a", b"after")
                    await pub.publish_acked("u.b", b"marker")
                    message = await recv_message(ws)
                    assert (message.topic, message.data) == ("u.b", [b"marker"])
                    # a client-side subscription ends when unsubscribed
                    assert [m async for m in sub] == []
                    assert server.router.index.receivers("u.a") == []
                    for conn in server.connections.values():
                        assert "u.a" not in conn.session.subscriptions
            finally:
                await ws.close()

    run(main())


def test_publishes_of_one_tick_arrive_as_one_msg_frame():
    n = 200

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(encode(Sub(1, "batch.t")))
                assert await recv_message(ws) == Ack(1)
                async with Client(url(server)) as pub:
                    payloads = [b"m%d" % i for i in range(n)]
                    for data in payloads:
                        pub.publish("batch.t", data)
                    frames, messages = [], 0
                    while messages < n:
                        frame = await recv_message(ws)
                        frames.append(frame)
                        messages += len(frame.data)
                    assert len(frames) == 1
                    assert frames[0] == Delivery("batch.t", server.router.epoch, 1, payloads)
            finally:
                await ws.close()

    run(main())


def test_one_write_per_connection_per_tick():
    topics = ["w.a", "w.b", "w.c"]
    per_topic = 10

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                for rid, topic in enumerate(topics, 1):
                    await ws.send(encode(Sub(rid, topic)))
                    assert await recv_message(ws) == Ack(rid)
                conn = server_conn_with(server, set(topics))
                writes = record_writes(conn)
                async with Client(url(server)) as pub:
                    for k in range(per_topic):  # one tick, interleaved topics
                        for topic in topics:
                            pub.publish(topic, b"%s-%d" % (topic.encode(), k))
                    received = [await recv_message(ws) for _ in topics]
                epoch = server.router.epoch
                expected = [Delivery(t, epoch, 1, [b"%s-%d" % (t.encode(), k) for k in range(per_topic)]) for t in topics]
                assert received == expected
                assert len(writes) == 1, f"{len(writes)} writes for one tick"
                assert len(split_frames(writes[0])) == 1, "one frame for the three topics"
            finally:
                await ws.close()

    run(main())
