"""Cluster-wide idempotent publish: a msg_id published through one node is recognised when it
is published again through another, within the dedupe window, so the Python client's publishes
are exactly once across a node failure. Real redis-server, real nodes (in-process and killed
subprocesses), real clients; docs/cluster.md (Dedupe) says what holds."""

from __future__ import annotations

import asyncio

from broker.client import Client, Message
from conftest import Ledger, eventually, run, serving, settled, url
from redis_support import BrokerNode


def test_a_msg_id_published_through_one_node_is_acknowledged_through_another_with_the_first_numbers(own_redis):
    async def main():
        settings = dict(redis_url=own_redis.url, redis_prefix="dd")
        async with serving(**settings) as a, serving(**settings) as b:
            async with Client(url(a)) as on_a, Client(url(b)) as on_b, Client(url(b)) as subscriber:
                got: list = []
                await subscriber.subscribe("dd.>", got.append)
                first = await on_a.publish_acked("dd.t", b"once", msg_id="order-17")
                again = await on_b.publish_acked("dd.t", b"once", msg_id="order-17")
                assert again == first
                # in the same write as messages that are new: they are published, it is not
                await asyncio.gather(
                    *(on_b.publish_acked("dd.t", b"new%d" % i, msg_id=f"new-{i}") for i in range(3)),
                    on_b.publish_acked("dd.t", b"once", msg_id="order-17"),
                )
                other = await on_b.publish_acked("dd.u", b"other topic", msg_id="order-17")  # per topic
                last = await on_a.publish_acked("dd.t", b"last")
                await eventually(lambda: len(got) == 6, 5, "the deliveries")
                assert sorted(m.data for m in got if m.topic == "dd.t") == sorted([b"once", b"new0", b"new1", b"new2", b"last"])
                assert [m.seq for m in got if m.topic == "dd.t"] == [1, 2, 3, 4, 5] and last.seq == 5
                assert other.seq == 1
                assert b.cluster.stats.repeats == 1 and b.router.stats.duplicates == 1  # the second repeat: B knew it by then

    run(main())


def test_the_python_clients_acknowledged_publishes_are_exactly_once_across_a_node_kill(own_redis):
    """A publisher with many acknowledged publishes out is on node A when A is killed: it moves
    to B and sends again what was not acknowledged, with the same msg_ids. What A had written
    before it died is recognised: every payload is delivered exactly once, at the position its
    ack gave."""
    settings = ["--redis-url", own_redis.url, "--redis-prefix", "dk", "--redis-timeout-s", "2"]
    with BrokerNode(*settings) as a, BrokerNode(*settings) as b:

        async def main():
            ledger = Ledger()
            publisher = Client([a.url, b.url], reconnect_delay=(0.02, 0.1), request_timeout=30)
            await publisher.open()
            try:
                async with Client(b.url) as subscriber:
                    await subscriber.subscribe("dk.>", ledger.subscriber())
                    topics = [f"dk.{i}" for i in range(8)]
                    running = True

                    async def publish(k: int) -> None:
                        i = 0
                        while running:
                            await ledger.publish(publisher, topics[(i + k) % 8], b"p%d.%d" % (k, i))
                            i += 1

                    tasks = [asyncio.ensure_future(publish(k)) for k in range(32)]
                    await eventually(lambda: len(ledger.acked) >= 500, 15, "acked publishes on A")
                    a.kill()
                    target = len(ledger.acked) + 500
                    await eventually(lambda: len(ledger.acked) >= target, 30, "acked publishes on B")
                    running = False
                    await asyncio.gather(*tasks)
                    await settled(ledger)
            finally:
                await publisher.close()
            assert publisher.url == b.url
            assert not ledger.failed, list(ledger.failed.items())[:3]
            assert not ledger.problems(), ledger.problems()[:20]
            (items,) = ledger.received
            delivered = [item.data for item in items if isinstance(item, Message)]
            assert sorted(delivered) == sorted(ledger.acked)  # each once, nothing else

        run(main(), timeout=90)


def test_a_publish_answered_may_have_been_published_and_sent_again_is_published_once(own_redis):
    """Redis is paused with a write out: its publish is answered err 18 "may have been
    published". Sent again with the same msg_id once Redis answers, it is acknowledged with
    the numbers the first one got if that one was made, and published if not: either way the
    subscriber gets it once, at the position of the ack."""
    from broker.errors import RequestError

    async def main():
        async with serving(redis_url=own_redis.url, redis_prefix="dm", redis_timeout_s=1.0) as a:
            async with Client(url(a), request_timeout=30) as publisher, Client(url(a)) as subscriber:
                got: list = []
                await subscriber.subscribe("dm.t", got.append)
                await publisher.publish_acked("dm.t", b"first")
                own_redis.pause()
                try:
                    try:
                        await publisher.publish_acked("dm.t", b"doubt", msg_id="doubt-1")
                        raise AssertionError("acknowledged while Redis was paused")
                    except RequestError as exc:
                        assert "may have been published" in exc.text, exc.text
                finally:
                    own_redis.resume()

                async def again():
                    try:
                        return await publisher.publish_acked("dm.t", b"doubt", msg_id="doubt-1")
                    except RequestError:  # refused until the node's check finds Redis back
                        return None

                ack = None
                for _ in range(50):
                    ack = await again()
                    if ack is not None:
                        break
                    await asyncio.sleep(0.1)
                assert ack is not None
                await publisher.publish_acked("dm.t", b"last")
                await eventually(lambda: got and got[-1].data == b"last", 5, "the last message")
                assert [m.data for m in got].count(b"doubt") == 1
                assert [(m.epoch, m.seq) for m in got if m.data == b"doubt"] == [(ack.epoch, ack.seq)]

    run(main(), timeout=30)
