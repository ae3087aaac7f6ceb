"""Interest-based reading: a node reads only the shard streams its subscriptions need, and a
node that gains interest in a shard loads what the stream holds first, so that the ack of a
subscription and its recovery (`since`, `last`) are exact. Real redis-server, real nodes and
clients; docs/cluster.md ("Reading and delivering") says what holds."""

from __future__ import annotations

import asyncio

from test_cluster import take

from broker.client import Client, Gap, Message
from broker.errors import ErrorCode, RequestError
from conftest import eventually, run, serving, url


def test_nodes_of_different_audiences_read_only_the_shards_they_need(own_redis):
    """A publishes to 64 topics over the 16 shards; B's only subscription is one topic, C's a
    pattern, D has none. C reads every entry, B only those of its topic's shard, D and A none:
    adding nodes for other audiences does not multiply what Redis sends them."""

    async def main():
        settings = dict(redis_url=own_redis.url, redis_prefix="ia")
        async with serving(**settings) as a, serving(**settings) as b, serving(**settings) as c, serving(**settings) as d:
            async with Client(url(a)) as publisher, Client(url(b)) as on_b, Client(url(c)) as on_c, Client(url(d)):
                got_b: list = []
                got_c: list = []
                await on_b.subscribe("ia.7", got_b.append)
                await on_c.subscribe("ia.>", got_c.append)
                names = [f"ia.{i}" for i in range(64)]
                for round_ in range(20):
                    for name in names:
                        publisher.publish(name, b"%d" % round_)
                    await asyncio.sleep(0.01)
                await publisher.publish_acked("ia.7", b"last")
                await eventually(lambda: len(got_c) == 64 * 20 + 1 and len(got_b) == 21, 10, "the deliveries")
                assert [m.data for m in got_b] == [b"%d" % i for i in range(20)] + [b"last"]
                shard = b.cluster.shard_of("ia.7")
                same_shard = sum(1 for name in names if a.cluster.shard_of(name) == shard)
                assert c.cluster.stats.messages_read == 64 * 20 + 1
                assert b.cluster.stats.messages_read == same_shard * 20 + 1 < c.cluster.stats.messages_read / 4
                assert a.cluster.stats.messages_read == d.cluster.stats.messages_read == 0
                assert a.cluster.stats.entries_read == d.cluster.stats.entries_read == 0
                return {node: server.cluster.stats.bytes_read for node, server in zip("ABCD", (a, b, c, d))}

    run(main(), timeout=60)


def test_a_node_that_gains_interest_loads_the_shard_first_so_acks_and_recovery_are_exact(own_redis):
    """B has no subscription while A publishes 50 messages to a topic. A client subscribing on
    B with `since` gets exactly what followed its position, one without gets an ack naming the
    topic's last message and then only what follows, and `last` the newest message."""

    async def main():
        settings = dict(redis_url=own_redis.url, redis_prefix="ib")
        async with serving(**settings) as a, serving(**settings) as b:
            async with Client(url(a)) as publisher:
                for i in range(1, 51):
                    ack = await publisher.publish_acked("ib.t", b"%d" % i)
                assert b.cluster.stats.entries_read == 0  # nobody on B wanted them
                async with Client(url(b)) as recovering, Client(url(b)) as live, Client(url(b)) as newest:
                    since = await recovering.subscribe("ib.t", since=(ack.epoch, 20))
                    got = await take(since, 30)
                    assert [(m.epoch, m.seq, m.data) for m in got] == [(ack.epoch, i, b"%d" % i) for i in range(21, 51)]
                    plain = await live.subscribe("ib.t")
                    assert (plain.epoch, plain.seq) == (ack.epoch, 50)
                    latest = await newest.subscribe("ib.*", last=True)  # a pattern: every shard is loaded
                    assert [(m.topic, m.seq, m.data) for m in await take(latest, 1)] == [("ib.t", 50, b"50")]
                    after = await publisher.publish_acked("ib.t", b"51")
                    for sub in (since, plain, latest):
                        (message,) = await take(sub, 1)
                        assert isinstance(message, Message) and (message.seq, message.data) == (after.seq, b"51")

    run(main(), timeout=60)


def test_a_subscription_that_needs_a_shard_redis_cannot_give_is_refused_within_the_timeout(own_redis):
    """While Redis does not answer, a subscription that needs a shard the node does not read
    yet waits at most redis_timeout_s, then gets err 18 (and its connection goes on)."""

    async def main():
        async with serving(redis_url=own_redis.url, redis_prefix="ic", redis_timeout_s=1.0) as b:
            async with Client(url(b), request_timeout=30) as client:
                own_redis.pause()
                try:
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    try:
                        await client.subscribe("ic.t")
                        raise AssertionError("subscribed while Redis was paused")
                    except RequestError as exc:
                        assert exc.code == ErrorCode.UNAVAILABLE, exc
                    assert loop.time() - started < 2.5
                finally:
                    own_redis.resume()
                await eventually(lambda: b.cluster.ready, 10, "Redis answers again")
                sub = await client.subscribe("ic.u")
                async with Client(url(b)) as publisher:
                    await publisher.publish_acked("ic.u", b"x")
                    (message,) = await take(sub, 1)
                    assert not isinstance(message, Gap) and message.data == b"x"

    run(main(), timeout=60)


def test_a_shard_no_subscription_needs_is_read_no_more_and_loaded_again_when_one_does(own_redis):
    """Once no subscription has needed a shard for INTEREST_GRACE_S, the node stops reading
    it; a later subscription loads what it missed first, so its recovery is exact."""
    import time

    from broker.cluster.shards import INTEREST_GRACE_S

    async def main():
        settings = dict(redis_url=own_redis.url, redis_prefix="id")
        async with serving(**settings) as a, serving(**settings) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("id.t")
                first = await publisher.publish_acked("id.t", b"1")
                assert [m.data for m in await take(sub, 1)] == [b"1"]
                await client.unsubscribe("id.t")
                shard = b.cluster.shard_of("id.t")
                now = time.monotonic()
                b.cluster.review_interest(now)
                assert shard in b.cluster.reading  # within the grace period
                b.cluster.review_interest(now + INTEREST_GRACE_S + 1)
                assert shard not in b.cluster.reading
                await publisher.publish_acked("id.t", b"2")  # the read out when it was dropped may take this one
                await asyncio.sleep(0.3)
                read = b.cluster.stats.entries_read
                for i in range(3, 7):
                    await publisher.publish_acked("id.t", b"%d" % i)
                await asyncio.sleep(0.3)
                assert b.cluster.stats.entries_read == read  # not read meanwhile
                again = await client.subscribe("id.t", since=(first.epoch, 1))
                assert [(m.seq, m.data) for m in await take(again, 5)] == [(i, b"%d" % i) for i in range(2, 7)]

    run(main(), timeout=60)


def test_a_node_that_reads_no_shard_still_knows_within_seconds_that_redis_is_gone(own_redis):
    """No subscription: the node reads nothing, and pings Redis once per block (2 s) instead,
    so readiness and broker_backplane_connected still follow Redis (docs/operations.md)."""
    import time

    async def main():
        async with serving(redis_url=own_redis.url, redis_prefix="ie", redis_timeout_s=1.0) as d:
            await eventually(lambda: d.cluster.connected and d.cluster.ready, 3, "connected")
            commands = d.cluster.stats.commands
            await asyncio.sleep(4.1)
            assert d.cluster.stats.commands - commands <= 3  # a ping per 2 s, nothing else
            own_redis.pause()
            try:
                started = time.monotonic()
                await eventually(lambda: not d.cluster.connected and not d.cluster.ready, 4, "Redis seen gone")
                assert time.monotonic() - started < 3.2
            finally:
                own_redis.resume()
            await eventually(lambda: d.cluster.connected and d.cluster.ready, 5, "Redis seen back")
            assert d.cluster.stats.entries_read == 0

    run(main(), timeout=60)
