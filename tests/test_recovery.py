"""Recovery through a real server and the Python client: a subscriber whose socket dies comes
back with `since` and misses nothing, twice nothing; gaps and last values as the client sees
them; the client's batching and its tolerance of unknown server messages."""

from __future__ import annotations

import asyncio

from broker.client import Client, Gap, Message
from broker.messages import encode

from conftest import eventually, run, serving, url

TOPICS = 100
PER_TOPIC = 1000


def test_a_killed_subscriber_recovers_100000_messages_on_many_topics_without_loss_or_duplicate():
    async def main():
        async with serving(history_max_messages=2 * PER_TOPIC) as server:
            async with Client(url(server)) as pub:
                first = await Client.connect(url(server))
                got_first: list[Message] = []
                sub = await first.subscribe("rc.>", got_first.append)
                killed = asyncio.Event()

                async def publish():
                    for round_ in range(PER_TOPIC // 10):
                        for t in range(TOPICS):
                            for i in range(10):
                                pub.publish(f"rc.{t}", b"%d" % (round_ * 10 + i + 1))
                        await pub.drain()
                        await asyncio.sleep(0.001)
                        if round_ == 30:
                            killed.set()

                publisher = asyncio.create_task(publish())
                await killed.wait()
                await eventually(lambda: len(got_first) > 10_000, 10, "part of the stream")
                first._transport.disconnect(graceful=False)  # the socket dies mid-stream
                await first.wait_closed()
                positions = dict(sub.positions)

                second = await Client.connect(url(server))
                got_second: list[Message | Gap] = []
                await second.subscribe("rc.>", got_second.append, since=(sub.epoch, positions))
                await publisher
                total = TOPICS * PER_TOPIC
                await eventually(lambda: len(got_first) + len(got_second) >= total, 30, "every message")
                await asyncio.sleep(0.1)
                assert not [g for g in got_second if isinstance(g, Gap)]
                seen: dict[str, list[int]] = {}
                for m in got_first + got_second:
                    seen.setdefault(m.topic, []).append(m.seq)
                    assert m.data == b"%d" % m.seq
                assert len(got_first) + len(got_second) == total
                assert {t: sorted(s) for t, s in seen.items()} == {f"rc.{t}": list(range(1, PER_TOPIC + 1)) for t in range(TOPICS)}
                assert 0 < len(got_first) < total and server.router.stats.replayed > 0
                await second.close()

    run(main(), timeout=120)


def test_recovery_past_history_arrives_as_a_gap_then_the_rest():
    async def main():
        async with serving(history_max_messages=5) as server:
            async with Client(url(server)) as pub, Client(url(server)) as sub_client:
                for i in range(1, 13):
                    ack = await pub.publish_acked("short", b"%d" % i)
                got: list = []
                await sub_client.subscribe("short", got.append, since=(ack.epoch, 3))
                await eventually(lambda: len(got) == 6, 5, "gap and replay")
                assert got[0] == Gap("short", ack.epoch, 4, 7, "history no longer holds these messages")
                assert [(m.seq, m.data) for m in got[1:]] == [(i, b"%d" % i) for i in range(8, 13)]

    run(main())


def test_last_value_on_subscribe_then_live():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as pub, Client(url(server)) as sub_client:
                for symbol, price in (("AAPL", b"189.1"), ("AAPL", b"189.2"), ("MSFT", b"410.0")):
                    await pub.publish_acked(f"px.{symbol}", price)
                got: list = []
                await sub_client.subscribe("px.*", got.append, last=True)
                await eventually(lambda: len(got) == 2, 5, "the last values")
                assert sorted((m.topic, m.seq, m.data) for m in got) == [("px.AAPL", 2, b"189.2"), ("px.MSFT", 1, b"410.0")]
                await pub.publish_acked("px.AAPL", b"189.3")
                await eventually(lambda: len(got) == 3, 5, "live")
                assert (got[2].topic, got[2].seq) == ("px.AAPL", 3)

    run(main())


def test_a_replay_overlapping_a_live_subscription_reaches_each_subscription_once():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as pub, Client(url(server)) as sub_client:
                live: list = []
                await sub_client.subscribe("ov.a", live.append)
                for i in range(1, 4):
                    ack = await pub.publish_acked("ov.a", b"%d" % i)
                await eventually(lambda: len(live) == 3, 5, "live messages")
                replayed: list = []
                await sub_client.subscribe("ov.*", replayed.append, since=(0, {"ov.a": (ack.epoch, 1)}))
                await eventually(lambda: len(replayed) == 2, 5, "the replay")
                await asyncio.sleep(0.05)
                assert [m.seq for m in live] == [1, 2, 3]  # the other subscription gets no duplicate
                assert [m.seq for m in replayed] == [2, 3]

    run(main())


def test_more_publishes_in_one_tick_than_a_batch_may_hold_all_arrive():
    async def main():
        async with serving(max_batch_messages=1000) as server:
            async with Client(url(server), max_batch_messages=1000) as pub, Client(url(server)) as sub_client:
                got: list = []
                await sub_client.subscribe("many", got.append)
                for i in range(25_000):
                    pub.publish("many", b"x")
                await eventually(lambda: len(got) == 25_000, 10, "every publish")
                assert server.router.stats.errors == {}

    run(main())


def test_the_client_ignores_server_messages_of_unknown_types():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as pub, Client(url(server)) as sub_client:
                got: list = []
                await sub_client.subscribe("fc", got.append)
                (conn,) = [c for c in server.connections.values() if c.session.subscriptions == {"fc"}]
                server.router.send(conn.session.box, encode(["news", 1, {"from": "a later revision"}]))
                await pub.publish_acked("fc", b"after")
                await eventually(lambda: len(got) == 1, 5, "the delivery after the unknown message")
                assert not sub_client.closed and got[0].data == b"after"

    run(main())
