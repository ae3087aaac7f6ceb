"""Regression tests for the review findings fixed in the broker and its client.

Each test names the finding it guards (r1, r2, ...). They drive the real server where the wire
matters and the sans-I/O core where the amount of work must be shown to be bounded: work is
counted, not timed, apart from one very generous wall-clock bound per case.
"""

from __future__ import annotations

import asyncio

import msgspec

from broker.client import Client

from conftest import (
    eventually,
    run,
    serving,
    url,
)

pack = msgspec.msgpack.encode


# r8: a new subscription overlapping an existing one


def test_new_subscription_overlapping_an_existing_one_starts_after_its_ack():
    """r8. A client holding `t.>` subscribes to `t.aN` while messages on t.aN flow: the new
    Subscription receives exactly the messages with seq > its ack's seq, none from before."""
    rounds = 5

    async def main():
        async with serving() as server:
            async with Client(url(server)) as client, Client(url(server)) as pub:
                wide_got = []
                await client.subscribe("t.>", wide_got.append)
                for k in range(rounds):
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
                        await eventually(
                            lambda: wide_got[-1].topic == topic and wide_got[-1].seq > narrow.seq + 5, 3, "more messages"
                        )
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

