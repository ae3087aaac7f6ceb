"""Redis that comes back older than the nodes saw it (restarted from an older snapshot): the
nodes end the epoch of every shard that went back with exact `ended` gaps, and no position is
acknowledged for two payloads. And Redis that comes back with all its data: nothing ends.

Each test starts its own redis-server and real broker nodes; docs/cluster.md says what holds."""

from __future__ import annotations

import os
import signal

from test_cluster_faults import until

from broker.client import Client, Gap, Message
from conftest import Ledger, Publishers, eventually, run, serving, settled, url
from redis_support import BrokerNode

TOPICS = [f"rb.{i}" for i in range(8)]  # spread over the default 16 shards


def node(redis_url: str, **settings):
    return serving(redis_url=redis_url, redis_prefix="rb", redis_timeout_s=1.0, **settings)


def test_redis_back_from_an_older_snapshot_ends_the_epoch_and_numbers_no_position_twice(own_redis):
    """The snapshot is taken while publishes flow; more are acknowledged after it; Redis is
    killed and comes back with the snapshot. The nodes knew positions Redis no longer holds:
    the shards move to a new epoch, every subscriber's old epoch ends right after the last
    message it got, and what is published after the restart is delivered in the new epoch."""

    async def main():
        ledger = Ledger()
        async with node(own_redis.url) as a, node(own_redis.url) as b:
            async with (
                Client(url(a), request_timeout=30) as pa,
                Client(url(b), request_timeout=30) as pb,
                Client(url(a)) as sa,
                Client(url(b)) as sb,
            ):
                for client in (sa, sb):
                    await client.subscribe("rb.>", ledger.subscriber())
                publishers = Publishers(ledger, {b"a": pa, b"b": pb}, TOPICS)
                await publishers.acked(200)
                own_redis.snapshot()
                before = set(ledger.acked)
                await publishers.acked(300)  # acknowledged after the snapshot: Redis loses them
                own_redis.kill()
                own_redis.start(keep_data=True)
                await publishers.acked(300, timeout=30)
                await publishers.stop()
                await settled(ledger)
                assert not ledger.problems(), ledger.problems()[:20]
                old = {epoch for payload, (_, epoch, _) in ledger.acked.items() if payload in before}
                new = {epoch for _, epoch, _ in ledger.acked.values()} - old
                assert new, "what was published after the restart is in a new epoch"
                for items in ledger.received:
                    ended = [item for item in items if isinstance(item, Gap) and item.cause == "ended"]
                    assert {gap.topic for gap in ended} == set(TOPICS) and {gap.epoch for gap in ended} <= old
                    assert all(gap.last == 0 for gap in ended)
                    assert [item for item in items if isinstance(item, Gap) and item.cause != "ended"] == []
                assert a.cluster.stats.rollbacks + b.cluster.stats.rollbacks >= 1

    run(main(), timeout=90)


def test_redis_restarted_with_all_its_data_goes_on_in_the_same_epoch(own_redis):
    """A clean restart (everything Redis acknowledged is in its snapshot) is not a rollback:
    no epoch ends, and the numbers go on without a gap."""

    async def main():
        ledger = Ledger()
        async with node(own_redis.url) as a, node(own_redis.url) as b:
            async with Client(url(a), request_timeout=30) as pa, Client(url(b)) as sb:
                await sb.subscribe("rb.>", ledger.subscriber())
                for i in range(40):
                    assert await ledger.publish(pa, TOPICS[i % len(TOPICS)], b"before%d" % i)
                await settled(ledger)
                own_redis.snapshot()
                own_redis.kill()
                own_redis.start(keep_data=True)

                async def published() -> bool:
                    return await ledger.publish(pa, TOPICS[0], b"after%d" % len(ledger.failed))

                await until(published, 15, 0.1)
                for i in range(40):
                    assert await ledger.publish(pa, TOPICS[i % len(TOPICS)], b"later%d" % i)
                await settled(ledger)
                assert not ledger.problems(), ledger.problems()
                (items,) = ledger.received
                assert all(isinstance(item, Message) for item in items)
                for topic in TOPICS:  # one epoch per topic before and after the restart
                    assert len({epoch for name, epoch, _ in ledger.acked.values() if name == topic}) == 1
                for topic in TOPICS:
                    assert [m.seq for m in items if m.topic == topic] == list(range(1, 12 if topic == TOPICS[0] else 11))
                assert a.cluster.stats.rollbacks == b.cluster.stats.rollbacks == 0

    run(main(), timeout=60)


def test_a_node_that_saw_more_ends_the_epoch_a_node_started_after_the_rollback_went_on_with(own_redis):
    """What cannot be told and what can (docs/cluster.md): a node started after Redis went
    back knows only what Redis holds, so its publishes are numbered on in the old epoch, at
    positions acknowledged before for messages Redis lost. The node that saw those (stopped
    meanwhile) reads entries whose write counts it has read already: it delivers none of
    them, and the shard moves to a new epoch, which both nodes' subscribers are told of."""
    settings = ["--redis-url", own_redis.url, "--redis-prefix", "rb", "--redis-timeout-s", "1"]
    with BrokerNode(*settings) as knowing:

        async def main():
            seen: list = []
            async with Client(knowing.url, request_timeout=30) as publisher, Client(knowing.url) as client:
                await client.subscribe("rb.0", seen.append)
                for i in range(5):
                    await publisher.publish_acked("rb.0", b"kept%d" % i)
                own_redis.snapshot()
                lost = [await publisher.publish_acked("rb.0", b"lost%d" % i) for i in range(5)]
                await eventually(lambda: len(seen) == 10, 10, "the messages on the knowing node")
                os.kill(knowing.pid, signal.SIGSTOP)
                try:
                    own_redis.kill()
                    own_redis.start(keep_data=True)
                    async with (
                        node(own_redis.url) as later,
                        Client(url(later), request_timeout=30) as late_publisher,
                        Client(url(later)) as late_client,
                    ):
                        late: list = []
                        await late_client.subscribe("rb.0", late.append)
                        forked = [await late_publisher.publish_acked("rb.0", b"fork%d" % i) for i in range(8)]
                        # the documented limit: the later node could not know, positions 6..10 were acknowledged twice
                        assert [(a.epoch, a.seq) for a in forked[:5]] == [(a.epoch, a.seq) for a in lost]
                        os.kill(knowing.pid, signal.SIGCONT)
                        ended = lambda items: [i for i in items if isinstance(i, Gap)]  # noqa: E731
                        await eventually(lambda: ended(seen) and ended(late), 15, "the old epoch ended on both nodes")
                        after = await late_publisher.publish_acked("rb.0", b"after")
                        assert after.epoch > lost[0].epoch and after.seq == 1
                        arrived = lambda items: isinstance(items[-1], Message) and items[-1].data == b"after"  # noqa: E731
                        await eventually(lambda: arrived(seen) and arrived(late), 10, "the new epoch on both nodes")
                finally:
                    os.kill(knowing.pid, signal.SIGCONT)
            old = lost[0].epoch
            # the node that saw more delivered nothing of what the later node numbered in the old epoch
            assert [(m.epoch, m.seq, m.data) for m in seen[:10]] == [
                (old, i + 1, d) for i, d in enumerate([b"kept%d" % i for i in range(5)] + [b"lost%d" % i for i in range(5)])
            ]
            assert seen[10:] == [Gap("rb.0", old, 11, 0, seen[10].reason, "ended"), Message("rb.0", after.epoch, 1, b"after")]
            assert [m.data for m in late[:8]] == [b"fork%d" % i for i in range(8)]
            assert late[8:] == [Gap("rb.0", old, 14, 0, late[8].reason, "ended"), Message("rb.0", after.epoch, 1, b"after")]
            assert "repeats write" in knowing.stderr()

        run(main(), timeout=60)
