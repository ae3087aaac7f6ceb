"""Every wait of the Redis backplane has a hard bound, and a slow or dead master delays only its
own shards: publishes to the shards of the masters that answer are acknowledged as fast as
ever while another master is paused, and every publish is answered within redis_timeout_s.

Each test starts its own redis-server or Redis Cluster and real broker nodes; docs/cluster.md
says what holds."""

from __future__ import annotations

import asyncio
import time

from redis.cluster import RedisCluster as SyncCluster

from broker.client import Client
from conftest import Ledger, run, serving, settled, url
from redis_support import RedisCluster


class Paced:
    """Acknowledged publishes sent at a steady pace, each topic in turn (unique payloads, into a
    Ledger), each one's topic, send time, answer time and outcome recorded, until stopped."""

    def __init__(self, ledger: Ledger, client: Client, topics: list[str], every: float = 0.02) -> None:
        self.ledger = ledger
        self.client = client
        self.topics = topics
        self.every = every
        self.answers: list[tuple[str, float, float, bool]] = []  # topic, sent, answered (monotonic), acked
        self.running = True
        self.inflight: set[asyncio.Task] = set()
        self.task = asyncio.ensure_future(self._run())

    async def _one(self, topic: str, payload: bytes) -> None:
        sent = time.monotonic()
        acked = await self.ledger.publish(self.client, topic, payload)
        self.answers.append((topic, sent, time.monotonic(), acked))

    async def _run(self) -> None:
        i = 0
        while self.running:
            task = asyncio.ensure_future(self._one(self.topics[i % len(self.topics)], b"p%d" % i))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            i += 1
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        self.running = False
        await self.task
        await asyncio.gather(*list(self.inflight))

    def within(self, start: float, end: float, topics: set[str]) -> list[tuple[str, float, float, bool]]:
        """The answers to publishes sent between `start` and `end` to `topics`."""
        return [a for a in self.answers if start <= a[1] <= end and a[0] in topics]


def test_a_paused_master_delays_only_its_own_shards_and_every_publish_is_answered_within_the_timeout(redis_prefix):
    """Three masters (`cluster-require-full-coverage no`: the others serve while one is out);
    one is paused for 4 s while a node publishes to every shard. Publishes to the other two
    masters' shards are acknowledged within a fraction of a second all along; those to the
    paused one's are answered (err 18) within redis_timeout_s; once it is back they are
    acknowledged again within a few seconds; every acknowledged message reaches a subscriber
    on another node."""
    timeout = 2.0
    with RedisCluster(masters=3, node_timeout_ms=1000, extra_args=("--cluster-require-full-coverage", "no")) as cluster:
        paused = cluster.nodes[1]
        slots = SyncCluster.from_url(cluster.url)
        try:
            owner = {shard: slots.get_node_from_key(f"{{{redis_prefix}:{shard}}}:s").port for shard in range(6)}
        finally:
            slots.close()

        async def main():
            ledger = Ledger()
            settings = dict(redis_url=cluster.url, redis_prefix=redis_prefix, redis_shards=6, redis_timeout_s=timeout)
            async with serving(**settings) as a, serving(**settings) as b:
                names = [f"w.{i}" for i in range(60)]
                dark = {t for t in names if owner[a.cluster.shard_of(t)] == paused.port}
                lit = set(names) - dark
                assert dark and lit
                async with Client(url(a), request_timeout=60) as publisher, Client(url(b)) as subscriber:
                    await subscriber.subscribe("w.>", ledger.subscriber())
                    paced = Paced(ledger, publisher, names)
                    await asyncio.sleep(0.5)
                    paused.pause()
                    out = time.monotonic()
                    await asyncio.sleep(4.0)
                    paused.resume()
                    back = time.monotonic()
                    await asyncio.sleep(4.0)
                    await paced.stop()
                    await settled(ledger)
                    assert not ledger.problems(), ledger.problems()[:20]
                    during = paced.within(out, back, lit)
                    assert len(during) > 100 and all(acked for _, _, _, acked in during), [a for a in during if not a[3]][:5]
                    slowest = max(answered - sent for _, sent, answered, _ in during)
                    assert slowest < 0.5, f"a publish to a master that answers waited {slowest:.2f} s while another was paused"
                    for _, sent, answered, _ in paced.answers:
                        assert answered - sent < timeout + 0.3, (
                            f"a publish was answered after {answered - sent:.2f} s (redis_timeout_s {timeout})"
                        )
                    dark_during = paced.within(out + 0.1, back - timeout - 0.3, dark)
                    assert dark_during and not any(acked for _, _, _, acked in dark_during)
                    recovered = [a for a in paced.within(back + 3.0, time.monotonic(), dark)]
                    assert recovered and all(acked for _, _, _, acked in recovered), "the paused master's shards take publishes again"

        run(main(), timeout=90)


def test_a_paused_redis_answers_every_publish_within_the_timeout(own_redis):
    """A standalone Redis paused for 3 s while publishes flow: each is answered (err 18)
    within redis_timeout_s of being sent, also those that waited behind a write that was
    out when Redis stopped answering; after it resumes, publishes are acknowledged again."""
    timeout = 1.0

    async def main():
        ledger = Ledger()
        async with serving(redis_url=own_redis.url, redis_prefix="wt", redis_timeout_s=timeout) as a:
            async with Client(url(a), request_timeout=60) as publisher, Client(url(a)) as subscriber:
                await subscriber.subscribe("wt.>", ledger.subscriber())
                paced = Paced(ledger, publisher, [f"wt.{i}" for i in range(16)], every=0.01)
                await asyncio.sleep(0.3)
                own_redis.pause()
                await asyncio.sleep(3.0)
                own_redis.resume()
                back = time.monotonic()
                await asyncio.sleep(2.0)
                await paced.stop()
                await settled(ledger)
                assert not ledger.problems(), ledger.problems()[:20]
                late = [(answered - sent) for _, sent, answered, _ in paced.answers if answered - sent >= timeout + 0.2]
                assert not late, f"{len(late)} publishes answered after redis_timeout_s ({timeout} s), the latest after {max(late):.2f} s"
                assert [a for a in paced.within(back + 1.0, time.monotonic(), {f"wt.{i}" for i in range(16)}) if a[3]]

    run(main(), timeout=60)
