"""Broker nodes joined through Redis Streams: real servers, real Redis, real clients.

One Redis (REDIS_URL, or a throwaway redis-server) serves every test here, each under its own
key prefix; the fault tests (test_cluster_faults.py) start their own."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis

from broker.client import Client, Gap
from conftest import run, serving, url


def node(redis_url: str, prefix: str, **settings):
    return serving(redis_url=redis_url, redis_prefix=prefix, **settings)


async def take(sub, count: int, timeout: float = 10.0) -> list:
    """The next `count` items (messages and gaps) of a subscription."""
    got = []

    async def collect():
        async for item in sub:
            got.append(item)
            if len(got) == count:
                return

    await asyncio.wait_for(collect(), timeout)
    return got


def test_a_message_published_on_one_node_reaches_every_node_with_the_same_numbers(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as b:
            async with Client(url(a)) as pa, Client(url(a)) as sa, Client(url(b)) as sb:
                on_a = await sa.subscribe("md.x")
                on_b = await sb.subscribe("md.>")
                acks = [await pa.publish_acked("md.x", b"first")]
                for i in range(200):
                    pa.publish("md.x", b"m%d" % i)
                acks.append(await pa.publish_acked("md.x", b"last"))
                got_a = await take(on_a, 202)
                got_b = await take(on_b, 202)
                expected = [(1, b"first")] + [(i + 2, b"m%d" % i) for i in range(200)] + [(202, b"last")]
                assert [(m.seq, m.data) for m in got_a] == expected
                assert [(m.seq, m.data) for m in got_b] == expected
                assert {m.epoch for m in got_a} == {m.epoch for m in got_b} == {acks[0].epoch}
                assert [a.seq for a in acks] == [1, 202]
            # each node wrote what its clients published, and read everything
            assert a.cluster.stats.messages_written == 202 and b.cluster.stats.messages_written == 0
            assert a.cluster.stats.messages_read == b.cluster.stats.messages_read == 202
            # published counts what a node's own clients published; delivered, what each queued
            assert a.router.stats.published == 202 and b.router.stats.published == 0
            assert a.router.stats.delivered == b.router.stats.delivered == 202

    run(main())


def test_publishers_on_two_nodes_share_one_sequence_per_topic(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as b:
            async with Client(url(a)) as pa, Client(url(b)) as pb, Client(url(a)) as sa, Client(url(b)) as sb:
                subs = [await sa.subscribe("t"), await sb.subscribe("t")]
                for i in range(100):
                    pa.publish("t", b"a%d" % i)
                    pb.publish("t", b"b%d" % i)
                got = [await take(sub, 200) for sub in subs]
                # both nodes deliver the one order the stream holds, numbered 1..200
                assert [m.seq for m in got[0]] == list(range(1, 201))
                assert [(m.seq, m.data) for m in got[0]] == [(m.seq, m.data) for m in got[1]]
                datas = [m.data for m in got[0]]
                assert [d for d in datas if d[:1] == b"a"] == [b"a%d" % i for i in range(100)]
                assert [d for d in datas if d[:1] == b"b"] == [b"b%d" % i for i in range(100)]

    run(main())


def test_a_client_moves_to_another_node_and_recovers_without_gap_or_repeat(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as c:
            async with Client(url(a)) as publisher:
                b_server = node(redis_url, redis_prefix)
                b = await b_server.__aenter__()
                # the subscriber knows every node; it starts on B
                client = Client([url(b), url(c)], reconnect_delay=(0.05, 0.2))
                await client.open()
                try:
                    sub = await client.subscribe("md.y")
                    for i in range(50):
                        publisher.publish("md.y", b"%d" % (i + 1))
                    first = await take(sub, 50)
                    await b_server.__aexit__(None, None, None)  # node B goes away (its clients get 1001)
                    for i in range(50, 120):
                        publisher.publish("md.y", b"%d" % (i + 1))
                    rest = await take(sub, 70)
                finally:
                    await client.close()
                assert client.url == url(c) and client.reconnects == 1
                got = first + rest
                assert not [g for g in got if isinstance(g, Gap)]
                assert [m.seq for m in got] == list(range(1, 121))
                assert [m.data for m in got] == [b"%d" % i for i in range(1, 121)]

    run(main())


def test_a_node_started_later_recovers_from_the_streams(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a:
            async with Client(url(a)) as publisher:
                for i in range(30):
                    ack = await publisher.publish_acked("h.t", b"%d" % (i + 1)) if i == 29 else publisher.publish("h.t", b"%d" % (i + 1))
                async with node(redis_url, redis_prefix) as late:
                    async with Client(url(late)) as client:
                        sub = await client.subscribe("h.t", since=(ack.epoch, 10))
                        got = await take(sub, 20)
                        assert [(m.seq, m.data) for m in got] == [(i, b"%d" % i) for i in range(11, 31)]
                        last = await client.subscribe("h.*", last=True)
                        (latest,) = await take(last, 1)
                        assert (latest.topic, latest.seq, latest.data) == ("h.t", 30, b"30")

    run(main())


def test_a_position_ahead_of_a_lagging_node_is_not_refused(redis_url, redis_prefix):
    """A client may have seen messages on its old node that its new node has not read yet:
    the new node takes the position and delivers what follows it."""

    async def main():
        async with node(redis_url, redis_prefix) as a:
            async with Client(url(a)) as client:
                ack = await client.publish_acked("lag", b"1")
                sub = await client.subscribe("lag", since=(ack.epoch, 5))  # 5: ahead of everything
                client.publish("lag", b"2")
                for i in range(3, 8):
                    client.publish("lag", b"%d" % i)
                got = await take(sub, 2)
                assert [(m.seq, m.data) for m in got] == [(6, b"6"), (7, b"7")]

    run(main())


def test_many_topics_over_every_shard_with_patterns(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix, redis_shards=8) as a, node(redis_url, redis_prefix, redis_shards=8) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("px.*.q")
                names = [f"px.{i}.q" for i in range(64)]
                for round_ in range(3):
                    for name in names:
                        publisher.publish(name, b"%d" % round_)
                got = await take(sub, 192)
                per_topic: dict[str, list] = {}
                for m in got:
                    per_topic.setdefault(m.topic, []).append((m.seq, m.data))
                assert per_topic == {name: [(1, b"0"), (2, b"1"), (3, b"2")] for name in names}
                assert len({a.cluster.shard_of(name) for name in names}) == 8
            # every write was sent once, each one script call for all its shards' entries
            stats = a.cluster.stats
            assert stats.scripts == stats.writes <= stats.entries_written and stats.in_doubt == 0
        client = redis.Redis.from_url(redis_url)
        try:
            streams = sorted(k.decode() for k in client.scan_iter(f"{{{redis_prefix}:*}}:s"))
            assert streams == sorted(f"{{{redis_prefix}:{i}}}:s" for i in range(8))
            for key in streams:  # one entry per shard per write, not one per message
                assert client.xlen(key) < 3 * 8
        finally:
            client.close()

    run(main())


def test_few_redis_commands_per_message_when_publishing_fast(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("fast")
                for _i in range(20_000):
                    publisher.publish("fast", b"x" * 16)
                got = await take(sub, 20_000, timeout=30)
                assert got[-1].seq == 20_000
            stats = a.cluster.stats
            assert stats.messages_written == 20_000
            assert stats.entries_written < 2_000  # batches of tens to hundreds of messages each

    run(main())


def test_settings_that_cannot_work_are_refused_with_their_names(redis_prefix):
    from broker.errors import ConfigError
    from broker.server import Server
    from broker.settings import load

    with pytest.raises(ConfigError, match="redis_url"):
        load({"workers": 2}, environ={})
    with pytest.raises(ConfigError, match="redis_url"):
        load({"redis_url": "http://127.0.0.1:1"}, environ={})
    with pytest.raises(ConfigError, match="redis_prefix"):
        load({"redis_url": "redis://127.0.0.1:1", "redis_prefix": "a{b"}, environ={})

    async def main():
        server = Server(load({"port": 0, "redis_url": "redis://127.0.0.1:1", "redis_timeout_s": 0.5, "log_level": "error"}, environ={}))
        with pytest.raises(ConfigError, match="redis_url: cannot reach Redis at redis://127.0.0.1:1"):
            await server.start()

    run(main())


@pytest.mark.redis
def test_the_redis_password_may_come_from_a_file_and_stay_out_of_the_url(tmp_path, redis_prefix):
    """A Redis that wants a password: a node given it in redis_password_file works (and the URL
    it logs or refuses with holds no password); without it, the start stops naming redis_url."""
    from broker.errors import ConfigError
    from broker.server import Server
    from broker.settings import load
    from redis_support import RedisProcess

    password = "a-redis-password-kept-in-a-file"
    path = tmp_path / "redis-password"
    path.write_text(password + "\n")
    with RedisProcess() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", password)

        async def main():
            async with node(server.url, redis_prefix, redis_password_file=str(path)) as broker:
                async with Client(url(broker)) as client:
                    sub = await client.subscribe("pw.t")
                    await client.publish_acked("pw.t", b"x")
                    assert [m.data for m in await take(sub, 1)] == [b"x"]
            refused = Server(
                load(
                    {"port": 0, "redis_url": server.url, "redis_prefix": redis_prefix, "redis_timeout_s": 1, "log_level": "error"},
                    environ={},
                )
            )
            with pytest.raises(
                ConfigError,
                match=r"redis_url: Redis at redis://127.0.0.1:[0-9]+ refused the credentials \(the password in redis_url, or redis_password_file\)",
            ):
                await refused.start()
            path.write_text("wrong\n")
            wrong = Server(
                load(
                    {
                        "port": 0,
                        "redis_url": server.url,
                        "redis_prefix": redis_prefix,
                        "redis_password_file": str(path),
                        "log_level": "error",
                    },
                    environ={},
                )
            )
            with pytest.raises(ConfigError, match=r"refused the credentials \(redis_password_file\)"):
                await wrong.start()

        run(main())


def test_entries_no_broker_wrote_are_skipped_and_the_node_reads_on(redis_url, redis_prefix):
    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("z.t")
                shard = b.cluster.shard_of("z.t")
                key = f"{{{redis_prefix}:{shard}}}:s"
                epoch = b.cluster.epochs[shard]
                r = redis.Redis.from_url(redis_url)
                try:
                    r.xadd(key, {"junk": b"\x00"})
                    r.xadd(key, {"e": str(epoch), "s": b"\xc1", "d": b"\x90"})
                    huge = msgspec.msgpack.encode([1 << 63])
                    r.xadd(key, {"e": str(epoch), "s": huge, "d": msgspec.msgpack.encode([["z.t", [b"x"]]])})
                    r.xadd(key, {"e": str(epoch), "s": msgspec.msgpack.encode([1]), "d": msgspec.msgpack.encode([["a..b", [b"x"]]])})
                    one = msgspec.msgpack.encode([1])
                    data = msgspec.msgpack.encode([["z.t", [b"x"]]])
                    for bad_epoch in ("0", "-5", str(1 << 63), "x"):  # an epoch out of range must not hold the topic
                        r.xadd(key, {"e": bad_epoch, "s": one, "d": data})
                finally:
                    r.close()
                ack = await publisher.publish_acked("z.t", b"real")
                (message,) = await take(sub, 1)
                assert (message.seq, message.data) == (ack.seq, b"real")
                again = await publisher.publish_acked("z.t", b"next")
                (message,) = await take(sub, 1)
                assert (message.seq, message.data) == (again.seq, b"next")
            # a node started later loads history past the same entries and recovers from it
            async with node(redis_url, redis_prefix) as c, Client(url(c)) as late:
                sub = await late.subscribe("z.t", since=(ack.epoch, ack.seq - 1))
                got = await take(sub, 2)
                assert [(m.seq, m.data) for m in got] == [(ack.seq, b"real"), (again.seq, b"next")]

    run(main())


def test_a_lagging_node_gives_a_raw_client_only_what_follows_its_position(redis_url, redis_prefix):
    """protocol.md promises no repeats: a node behind a client's `since` lets the topic's
    batches up to the position pass the connection by and cuts the batch that passes it,
    for a topic and for a pattern's listed topic, while the pattern's other topics flow."""
    import time

    from broker.messages import Ack, Delivery, GapNotice
    from conftest import recv_message, ws_raw

    async def deliveries(ws, until_seq: dict[str, int]) -> list[tuple[str, int, bytes]]:
        got = []
        while any(until_seq.values()):
            message = await recv_message(ws)
            assert not isinstance(message, GapNotice), message
            if isinstance(message, Delivery):
                for i, data in enumerate(message.data):
                    got.append((message.topic, message.seq + i, data))
                    if until_seq.get(message.topic) == message.seq + i:
                        until_seq[message.topic] = 0
        return got

    def pubs(topic: str, seqs: range, request: int) -> bytes:
        frame = [["pub", 0, topic, b"%d" % n] for n in seqs]
        frame[-1][1] = request
        return msgspec.msgpack.encode(frame)

    async def main():
        async with node(redis_url, redis_prefix) as a, node(redis_url, redis_prefix) as b:
            async with Client(url(a)) as publisher:
                first = {t: await publisher.publish_acked(t, b"1") for t in ("lag", "pat.a", "pat.b")}
            pub = await ws_raw(a)
            raw = await ws_raw(b)
            try:
                await raw.send(msgspec.msgpack.encode(["sub", 1, "lag", [first["lag"].epoch, 5]]))
                assert await recv_message(raw) == Ack(1, first["lag"].epoch, 1)
                positions = {"pat.a": [first["pat.a"].epoch, 5]}
                await raw.send(msgspec.msgpack.encode(["sub", 2, "pat.>", [int(time.time() * 1000), positions]]))
                assert isinstance(await recv_message(raw), Ack)
                # a batch wholly before the position, then one across it
                await pub.send(pubs("lag", range(2, 4), 10))
                await pub.send(pubs("pat.a", range(2, 4), 11))
                for _ in range(2):
                    assert isinstance(await recv_message(pub), Ack)
                await pub.send(pubs("pat.b", range(2, 3), 12))  # flows while pat.a waits
                assert isinstance(await recv_message(pub), Ack)
                got = await deliveries(raw, {"pat.b": 2})
                assert got == [("pat.b", 2, b"2")]
                await pub.send(pubs("lag", range(4, 9), 13))
                await pub.send(pubs("pat.a", range(4, 9), 14))
                for _ in range(2):
                    assert isinstance(await recv_message(pub), Ack)
                got = await deliveries(raw, {"lag": 8, "pat.a": 8})
                assert sorted(got) == sorted([(t, n, b"%d" % n) for t in ("lag", "pat.a") for n in (6, 7, 8)])
                # then live as usual
                await pub.send(pubs("lag", range(9, 10), 15))
                assert isinstance(await recv_message(pub), Ack)
                assert await deliveries(raw, {"lag": 9}) == [("lag", 9, b"9")]
                assert not b.router.awaiting and not b.router.awaits_of
                assert b.router.stats.recoveries == {"awaited": 2}
                # a position dropped with its subscription: a new one gets what follows its ack
                await raw.send(msgspec.msgpack.encode(["unsub", 3, "lag"]))
                await raw.send(msgspec.msgpack.encode(["sub", 4, "lag", [first["lag"].epoch, 50]]))
                await raw.send(msgspec.msgpack.encode(["unsub", 5, "lag"]))
                await raw.send(msgspec.msgpack.encode(["sub", 6, "lag"]))
                for _ in range(4):
                    assert isinstance(await recv_message(raw), Ack)
                assert not b.router.awaiting and not b.router.awaits_of
                await pub.send(pubs("lag", range(10, 12), 16))
                assert isinstance(await recv_message(pub), Ack)
                assert await deliveries(raw, {"lag": 11}) == [("lag", 10, b"10"), ("lag", 11, b"11")]
            finally:
                await pub.close()
                await raw.close()

    run(main())
