"""The ways docs/cluster.md ("What the backplane can lose") lists that a message can be lost
which no other test file covers: a node that stops while Redis does not answer, a node that
holds max_topics topics, and an entry in a shard stream that no broker wrote. Each is
reported, none is silent. Real redis-server, real nodes and clients."""

from __future__ import annotations

import asyncio
import logging

import redis
from test_cluster import take

from broker.client import Client
from broker.errors import ErrorCode, RequestError
from broker.server.metrics import Collector
from conftest import eventually, run, serving, url


def test_a_node_that_stops_while_redis_does_not_answer_answers_what_it_could_not_write(own_redis):
    """The node stops (as on SIGTERM) while Redis is paused: the publish it could not write
    gets err 18 within redis_timeout_s, before the clients are closed."""

    async def main():
        server_settings = dict(redis_url=own_redis.url, redis_prefix="ls", redis_timeout_s=1.0)
        async with serving(**server_settings) as a:
            async with Client(url(a), request_timeout=30, reconnect=False) as publisher:
                assert (await publisher.publish_acked("ls.t", b"before")).seq == 1
                own_redis.pause()
                try:
                    pending = asyncio.ensure_future(publisher.publish_acked("ls.t", b"during"))
                    await asyncio.sleep(0.2)
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    await a.stop()
                    assert loop.time() - started < 2.5
                    error = await asyncio.gather(pending, return_exceptions=True)
                finally:
                    own_redis.resume()
                (exc,) = error
                assert isinstance(exc, RequestError) and exc.code == ErrorCode.UNAVAILABLE, exc
                assert "may have been published" in exc.text or "not published" in exc.text

    run(main(), timeout=30)


def test_a_node_that_holds_max_topics_topics_counts_the_messages_of_others_it_cannot_deliver(own_redis):
    """Node B may hold 2 topics; node A publishes to 5: B's `>` subscriber gets the first two
    topics' messages, and B counts (broker_backplane_unknown_topics) the batches of the others."""

    async def main():
        settings = dict(redis_url=own_redis.url, redis_prefix="mt")
        async with serving(**settings) as a, serving(max_topics=2, **settings) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as subscriber:
                got = []
                await subscriber.subscribe("mt.>", got.append)
                for i in range(5):
                    await publisher.publish_acked(f"mt.{i}", b"%d" % i)
                await eventually(lambda: b.router.stats.unknown_topics >= 3, 5, "the batches B could not take")
                assert sorted(m.topic for m in got) == ["mt.0", "mt.1"]
                families = {family.name: family for family in Collector(b).collect()}
                assert families["broker_backplane_unknown_topics"].samples[0].value >= 3

    run(main())


def test_an_entry_no_broker_wrote_is_logged_and_skipped_and_reading_goes_on(own_redis, caplog):
    caplog.set_level(logging.ERROR, logger="broker.cluster")

    async def main():
        async with serving(redis_url=own_redis.url, redis_prefix="fe") as a:
            async with Client(url(a)) as publisher, Client(url(a)) as subscriber:
                sub = await subscriber.subscribe("fe.t")
                await publisher.publish_acked("fe.t", b"one")
                stream = a.cluster.streams[a.cluster.shard_of("fe.t")]
                r = redis.Redis.from_url(own_redis.url)
                try:
                    for i in range(500):  # whoever writes into the streams cannot flood the log
                        r.xadd(stream, {"hello": str(i)})
                finally:
                    r.close()
                await publisher.publish_acked("fe.t", b"two")
                assert [m.data for m in await take(sub, 2)] == [b"one", b"two"]
                assert a.cluster.foreign_entries == 500
        said = [r.getMessage() for r in caplog.records if "is not one of this broker's; skipped" in r.getMessage()]
        assert len(said) == 1 and said[0].endswith("(1 such entries since the last line)"), said

    run(main())
