"""Recovery through a real server and the Python client: a subscriber whose socket dies comes
back with `since` and misses nothing, twice nothing; gaps and last values as the client sees
them; the client's batching and its tolerance of unknown server messages."""

from __future__ import annotations

import asyncio

import pytest

from broker.client import BrokerError, Client, Gap, Message, Subscription
from broker.messages import Ack, Delivery, GapNotice, Sub, encode
from conftest import RawSocketClient, eventually, run, serving, url

TOPICS = 100
PER_TOPIC = 1000


def test_a_killed_subscriber_recovers_100000_messages_on_many_topics_without_loss_or_duplicate():
    async def main():
        async with serving(history_max_messages=2 * PER_TOPIC) as server:
            async with Client(url(server)) as pub:
                first = await Client.connect(url(server), reconnect=False)
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
                first.abort()  # the socket dies mid-stream
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
                assert got[0] == Gap("short", ack.epoch, 4, 7, "history no longer holds these messages", "history")
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
                for _i in range(25_000):
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
                (conn,) = [c for c in server.connections.values() if set(c.session.subscriptions) == {"fc"}]
                server.router.send(conn.session.box, encode(["news", 1, {"from": "a later revision"}]))
                await pub.publish_acked("fc", b"after")
                await eventually(lambda: len(got) == 1, 5, "the delivery after the unknown message")
                assert not sub_client.closed and got[0].data == b"after"

    run(main())


def test_a_client_whose_socket_dies_reconnects_by_itself_and_delivers_every_message_once():
    async def main():
        async with serving(history_max_messages=2 * PER_TOPIC) as server:
            async with Client(url(server)) as pub:
                states: list[str] = []
                client = await Client.connect(url(server), reconnect_delay=(0.01, 0.1), on_state=lambda s, _: states.append(s))
                got: list = []
                await client.subscribe("auto.>", got.append)
                await client.subscribe("auto.0", (exact := []).append)

                async def publish():
                    for round_ in range(PER_TOPIC // 10):
                        for t in range(TOPICS):
                            for i in range(10):
                                pub.publish(f"auto.{t}", b"%d" % (round_ * 10 + i + 1))
                        await pub.drain()
                        await asyncio.sleep(0.001)

                publisher = asyncio.create_task(publish())
                for kill in range(3):  # the socket dies three times mid-stream
                    await eventually(lambda: len(got) > (kill + 1) * 20_000, 20, "part of the stream")
                    client.abort()
                    await eventually(lambda: client.state == "connected", 10, "the reconnection")
                await publisher
                await eventually(lambda: len(got) >= TOPICS * PER_TOPIC and len(exact) >= PER_TOPIC, 30, "every message")
                await asyncio.sleep(0.1)
                assert client.reconnects == 3
                assert not [g for g in got + exact if isinstance(g, Gap)]
                assert sorted((m.topic, m.seq) for m in got) == sorted(
                    (f"auto.{t}", s) for t in range(TOPICS) for s in range(1, PER_TOPIC + 1)
                )
                assert [m.seq for m in exact] == list(range(1, PER_TOPIC + 1))
                assert states[:2] == ["connecting", "connected"] and states.count("disconnected") == 3 and states[-1] == "connected"
                await client.close()
                assert states[-1] == "closed"

    run(main(), timeout=120)


def test_backoff_is_exponential_with_full_jitter_and_bounded():
    client = Client(reconnect_delay=(0.05, 1.0), jitter=lambda: 1.0)
    assert [client.backoff(i) for i in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    client.jitter = lambda: 0.25
    assert client.backoff(3) == 0.1


def test_reconnection_ends_after_max_reconnect_attempts_or_at_a_close_that_blames_the_client():
    """A close code that blames the client (1002, 1003, 1007 to 1010) ends the client at once,
    another (1001, 1011, 1006) starts a reconnection; with max_reconnect_attempts the client
    gives up after that many failed attempts and says so."""

    async def main():
        async with serving() as server:

            async def closed_by_broker(code: int) -> tuple[Client, list[str]]:
                states: list[str] = []
                client = await Client.connect(url(server), reconnect_delay=(0.05, 0.05), on_state=lambda state, _: states.append(state))
                await client.subscribe("rc.end")
                del states[:]
                (conn,) = [c for c in server.connections.values() if "rc.end" in c.session.subscriptions]
                conn.close(code, "closed by the test")
                await eventually(lambda: states and states[-1] in ("closed", "connected"), 5, f"the client's answer to {code}")
                return client, states

            for code in (1002, 1003, 1007, 1008, 1009, 1010):
                client, states = await closed_by_broker(code)
                assert states == ["closed"] and client.closed, (code, states)
                assert await client.wait_closed() == (code, "closed by the test")
            for code in (1001, 1011):
                client, states = await closed_by_broker(code)
                await eventually(lambda: client.state == "connected" and len(server.connections) == 1, 5, f"a reconnection after {code}")
                assert "disconnected" in states and not client.closed, (code, states)
                await client.close()
            port = server.port
            client = await Client.connect(url(server), reconnect_delay=(0.05, 0.05), max_reconnect_attempts=3)
        # the broker is gone: three attempts, then the client ends
        code, reason = await asyncio.wait_for(client.wait_closed(), 10)
        assert client.closed and code == 1006 and reason.startswith("gave up after 3 reconnection attempts: "), (code, reason, port)

    run(main())


def test_after_a_broker_restart_the_client_reconnects_is_told_what_it_lost_and_sends_what_waited():
    async def main():
        async with serving() as first:
            port = first.port
            pub = await Client.connect(url(first), reconnect=False)
            states: list[tuple[str, float]] = []
            loop = asyncio.get_running_loop()
            client = await Client.connect(
                url(first),
                reconnect_delay=(0.05, 0.4),
                jitter=lambda: 1.0,
                on_state=lambda state, _: states.append((state, loop.time())),
            )
            got: list = []
            await client.subscribe("rs.t", got.append)
            for i in range(1, 4):
                ack = await pub.publish_acked("rs.t", b"%d" % i)
            await eventually(lambda: len(got) == 3, 5, "the first epoch")
            old_epoch = ack.epoch
            await pub.close()
        # the broker is gone: publishes wait in the offline queue
        client.publish("rs.t", b"queued while down")
        await asyncio.sleep(1.0)
        assert client.state in ("disconnected", "connecting")
        async with serving(port=port) as second:
            await eventually(lambda: client.state == "connected", 10, "the reconnection")
            await eventually(lambda: len(got) == 5, 5, "the gap and the queued publish")
            assert got[3] == Gap("rs.t", old_epoch, 4, 0, "the topic has no messages in this broker any more: its epoch ended", "ended")
            assert (got[4].data, got[4].epoch, got[4].seq) == (b"queued while down", second.router.epoch, 1)
        # the attempts after the broker went away: waits of 0.05, 0.1, 0.2, 0.4, 0.4, ... s
        lost = next(i for i, (state, _) in enumerate(states) if state == "disconnected")
        attempts = [t for state, t in states[lost:] if state == "connecting"]
        waits = [b - a for a, b in zip([states[lost][1], *attempts], attempts)]
        expected = [client.backoff(i) for i in range(len(waits))]
        assert len(waits) >= 4 and all(e * 0.9 <= w <= e + 0.3 for w, e in zip(waits, expected)), (waits, expected)
        await client.close()

    run(main(), timeout=60)


def test_the_offline_queue_is_bounded_and_never_silent():
    async def main():
        async with serving() as server:
            port = server.port
            strict = await Client.connect(url(server), max_offline_messages=2, reconnect_delay=(0.05, 0.5))
            lossy = await Client.connect(url(server), max_offline_messages=2, offline_overflow="drop_oldest", reconnect_delay=(0.05, 0.5))
        await eventually(lambda: strict.state != "connected" and lossy.state != "connected", 5, "the disconnection")
        strict.publish("o.t", b"1")
        strict.publish("o.t", b"2")
        with pytest.raises(BrokerError, match="max_offline_messages"):
            strict.publish("o.t", b"3")
        for i in range(5):
            lossy.publish("o.t", b"%d" % i)
        assert lossy.offline_dropped == 3
        async with serving(port=port) as server:
            async with Client(url(server)) as sub_client:
                got: list = []
                # from the start of the topic's history: whenever the queued publishes arrive
                await sub_client.subscribe("o.t", got.append, since=(0, 0))
                await eventually(lambda: strict.state == "connected" and lossy.state == "connected", 15, "the reconnections")
                await eventually(lambda: len(got) == 4, 5, "the queued publishes")
                assert sorted(m.data for m in got) == [b"1", b"2", b"3", b"4"]
            await strict.close()
            await lossy.close()

    run(main(), timeout=60)


def test_overlapping_subscriptions_recover_across_a_restart_with_one_ended_gap_each():
    """`r.a` and `r.>` on one connection both recover `r.a` after a broker restart. The wire
    carries each `sub`'s own gap (and replay); each subscription hands the application the
    end of the old epoch once, then the new epoch once."""

    async def main():
        async with serving() as first:
            port = first.port
            async with Client(url(first)) as pub:
                client = await Client.connect(url(first), reconnect_delay=(0.05, 0.2), jitter=lambda: 1.0)
                exact: list = []
                pattern: list = []
                await client.subscribe("r.a", exact.append)
                await client.subscribe("r.>", pattern.append)
                for i in range(1, 4):
                    ack = await pub.publish_acked("r.a", b"%d" % i)
                await eventually(lambda: len(exact) == 3 and len(pattern) == 3, 5, "the first epoch")
                old_epoch = ack.epoch
        async with serving(port=port) as second:
            async with Client(url(second)) as pub:
                new = await pub.publish_acked("r.a", b"new 1")
                raw = await RawSocketClient.connect(port)
                try:
                    await raw.send(Sub(1, "r.a", [old_epoch, 3]))
                    await raw.send(Sub(2, "r.>", [0, {"r.a": [old_epoch, 3]}]))
                    got = [await raw.recv() for _ in range(6)]
                finally:
                    raw.close()
                ended = GapNotice(
                    "r.a", old_epoch, 4, 0, f"epoch {old_epoch} of the topic ended; it continues in epoch {new.epoch}", "ended"
                )
                replay = Delivery("r.a", new.epoch, 1, [b"new 1"])
                assert got[0] == Ack(1, new.epoch, 1) and got[1:3] == [ended, replay]
                assert isinstance(got[3], Ack) and got[3].id == 2 and got[4:] == [ended, replay]
                await eventually(lambda: client.state == "connected", 10, "the reconnection")
                await pub.publish_acked("r.a", b"new 2")
                await eventually(lambda: len(exact) >= 6 and len(pattern) >= 6, 5, "the new epoch")
                await asyncio.sleep(0.1)  # nothing more comes
                gap = Gap("r.a", old_epoch, 4, 0, ended.reason, "ended")
                for items in (exact, pattern):
                    assert items[3:] == [gap, Message("r.a", new.epoch, 1, b"new 1"), Message("r.a", new.epoch, 2, b"new 2")], "\n".join(
                        map(repr, items)
                    )
                await client.close()

    run(main(), timeout=60)


def test_a_subscription_hands_on_the_end_of_an_epoch_once():
    items: list = []
    sub = Subscription(None, "r.>", items.append, 100)  # type: ignore[arg-type]
    sub.receive("r.a", 7, 1, [b"1", b"2"])
    ended = Gap("r.a", 7, 3, 0, "ended", "ended")
    sub.gap(ended)
    sub.receive("r.a", 9, 1, [b"new"])
    sub.gap(ended)  # another subscription's recovery told the connection again
    sub.gap(Gap("r.a", 7, 5, 0, "ended", "ended"))
    sub.receive("r.a", 9, 1, [b"new"])
    assert items == [Message("r.a", 7, 1, b"1"), Message("r.a", 7, 2, b"2"), ended, Message("r.a", 9, 1, b"new")]
    # an end reported from further on than the subscription got covers what it did not get
    others: list = []
    other = Subscription(None, "r.b", others.append, 100)  # type: ignore[arg-type]
    other.receive("r.b", 7, 1, [b"1"])
    other.gap(Gap("r.b", 7, 5, 0, "ended", "ended"))
    assert others[-1] == Gap("r.b", 7, 2, 0, "ended", "ended")


def test_a_client_closed_as_a_slow_consumer_comes_back_and_recovers_all_that_history_holds():
    """The subscriber stops reading and is closed (1013) while a publisher goes on; when it
    reconnects it asks for everything after what it delivered, many times max_pending_bytes:
    the broker replays it as the connection drains, the live messages after it, and the
    application gets every message once, in order, without a gap."""
    topics = [f"sc.{i}" for i in range(10)]
    per_topic = 1500
    payload = bytes(1000)

    async def main():
        async with serving(
            max_pending_bytes=256 << 10,
            max_payload_bytes=16 << 10,
            slow_consumer_timeout_s=0.3,
            history_max_messages=10_000,
            history_max_bytes=16 << 20,
        ) as server:
            async with Client(url(server)) as pub:
                got: list = []
                sub_client = await Client.connect(url(server), reconnect_delay=(0.05, 0.2))
                await sub_client.subscribe("sc.*", got.append)
                for _i, topic in enumerate(topics):
                    pub.publish(topic, b"1:" + payload)
                await pub.publish_acked("sc.sync.x", b"")
                await eventually(lambda: len(got) == len(topics), 5, "the first messages")
                raw = sub_client._transport.underlying_transport
                raw.pause_reading()  # stops reading
                for seq in range(2, per_topic + 1):
                    for topic in topics:
                        pub.publish(topic, b"%d:" % seq + payload)
                    if seq % 50 == 0:
                        await pub.drain()
                        await asyncio.sleep(0)
                await eventually(lambda: server.router.stats.slow_consumers == 1, 10, "the slow-consumer close")
                raw.resume_reading()  # it reads what reached it, then the close
                await eventually(lambda: sub_client.reconnects == 1, 10, "the reconnection")
                for topic in topics:  # live, while the replay runs
                    pub.publish(topic, b"%d:" % (per_topic + 1) + payload)
                await eventually(lambda: len(got) >= len(topics) * (per_topic + 1), 20, "the replay")
                await asyncio.sleep(0.1)
                assert not [m for m in got if isinstance(m, Gap)], [m for m in got if isinstance(m, Gap)][:3]
                for topic in topics:
                    seqs = [m.seq for m in got if m.topic == topic]
                    assert seqs == list(range(1, per_topic + 2)), topic
                    assert all(m.data.startswith(b"%d:" % m.seq) for m in got if m.topic == topic)
                # far more than max_pending_bytes came from history (the rest had reached the client)
                assert server.router.stats.replayed * len(payload) > 8 * (256 << 10) and not server.router.replaying
                await sub_client.close()

    run(main(), timeout=60)


def test_a_subscription_made_while_another_ones_replay_waits_gets_only_what_follows_its_ack():
    async def main():
        async with serving(max_pending_bytes=64 << 10, max_payload_bytes=8 << 10, history_max_messages=1000) as server:
            async with Client(url(server)) as pub:
                for seq in range(1, 301):
                    pub.publish("pq.a", b"%d:" % seq + bytes(1000))
                await pub.publish_acked("pq.a", b"301")
                async with Client(url(server)) as client:
                    everything: list = []
                    exact: list = []
                    await client.subscribe("pq.*", everything.append, since=(0, {}))
                    assert server.router.replaying, "the replay fits at once"
                    sub = await client.subscribe("pq.a", exact.append)
                    await pub.publish_acked("pq.a", b"302")
                    await eventually(
                        lambda: len(everything) == 302 and exact and exact[-1].seq == 302, 10, "the replay and the live message"
                    )
                    assert [m.seq for m in everything] == list(range(1, 303))
                    assert [m.seq for m in exact] == list(range(sub.seq + 1, 303)) and sub.seq == 301

    run(main())
