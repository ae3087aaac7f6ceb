"""Regression tests for the review findings fixed in the broker and its client.

Each test names the finding it guards (r1, r2, ...). They drive the real server where the wire
matters and the sans-I/O core where the amount of work must be shown to be bounded: work is
counted, not timed, apart from one very generous wall-clock bound per case.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import msgspec
import pytest

from broker.client import Client, ConnectionClosed, Message

from conftest import (
    connect_tracked,
    eventually,
    run,
    serving,
    url,
)

pack = msgspec.msgpack.encode


# r7: a cancelled subscribe


@pytest.mark.parametrize("ticks", [1, 2, 5])
def test_cancelled_subscribe_leaves_no_subscription_at_the_broker(ticks):
    """r7. Cancelling Client.subscribe() after its Sub was queued, before the ack: the broker
    ends up without the subscription, the client without a trace of it, and subscribing to the
    same pattern again works. (When the ack was already read, asyncio may complete the request
    despite the cancel; client and broker must then agree that the subscription exists.)"""

    async def main():
        async with serving() as server:
            client, conn = await connect_tracked(server)
            pub = await Client.connect(url(server))
            try:
                task = asyncio.ensure_future(client.subscribe("cs.t"))
                for _ in range(ticks):
                    await asyncio.sleep(0)
                if task.done():  # the ack came back within these ticks: nothing to cancel
                    assert ticks > 1
                    held = task.result()
                else:
                    task.cancel()
                    try:
                        held = await task
                    except asyncio.CancelledError:
                        held = None
                if ticks == 1:
                    assert held is None  # the Sub had not even been written yet
                if held is None:
                    # the Sub did reach the broker, then the client took it back
                    await eventually(
                        lambda: conn.session.received == 2 and conn.session.subscriptions == set(),
                        3,
                        "the broker to drop the cancelled subscription",
                    )
                    assert server.router.index.receivers("cs.t") == []
                else:
                    assert conn.session.subscriptions == {"cs.t"}
                    await held.unsubscribe()
                    assert conn.session.subscriptions == set()
                assert server.router.stats.errors == {}

                sub = await client.subscribe("cs.t")
                assert conn.session.subscriptions == {"cs.t"}
                ack = await pub.publish_acked("cs.t", b"after")
                message = await sub.next(3)
                assert (message.seq, message.data) == (ack.seq, b"after")
                with pytest.raises(asyncio.TimeoutError):
                    await sub.next(0.05)  # delivered once, not twice
                assert server.router.stats.errors == {}
            finally:
                await client.close()
                await pub.close()

    run(main())


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


# r9: a subscription callback that raises


def test_callback_exception_is_logged_and_does_not_close_the_connection(caplog):
    """r9. An exception in one subscription's callback is logged on `broker.client`; the
    connection stays open and every other subscription keeps receiving, including the same
    message when it matches several."""
    caplog.set_level(logging.ERROR, logger="broker.client")
    calls = []

    def bad(message: Message) -> None:
        calls.append(message.seq)
        raise ValueError("user bug")

    async def main():
        async with serving() as server:
            async with Client(url(server)) as client, Client(url(server)) as pub:
                other = await client.subscribe("cb.u")
                good = []
                await client.subscribe("cb.v", good.append)
                await client.subscribe("cb.t", bad)
                wide = await client.subscribe("cb.>")
                for data in (b"t1", b"t2"):
                    pub.publish("cb.t", data)
                pub.publish("cb.u", b"u1")
                pub.publish("cb.v", b"v1")
                await pub.publish_acked("cb.t", b"t3")

                assert (await other.next(3)).data == b"u1"
                await eventually(lambda: len(calls) == 3 and len(good) == 1, 3, "the callbacks")
                assert calls == [1, 2, 3]
                assert [m.data for m in good] == [b"v1"]
                # the same messages reached the overlapping subscription, in topic batches
                seen = [(await wide.next(3)).data for _ in range(5)]
                assert sorted(seen) == [b"t1", b"t2", b"t3", b"u1", b"v1"]

                assert not client.closed
                assert server.router.stats.closes == {}
                assert len(server.connections) == 2
                # and it keeps working afterwards
                ack = await client.publish_acked("cb.u", b"u2")
                assert (await other.next(3)).seq == ack.seq
                assert len(calls) == 3

    run(main())
    records = [r for r in caplog.records if r.name == "broker.client" and r.levelno >= logging.ERROR]
    assert len(records) == 3
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], ValueError) for r in records)
    assert all("cb.t" in r.getMessage() for r in records)


# r14: two consumers of one Subscription


def test_second_concurrent_consumer_of_a_subscription_gets_runtime_error():
    """r14. Only one coroutine may wait on a Subscription at a time; a second one is refused
    with RuntimeError instead of silently stealing or losing messages."""

    async def main():
        async with serving() as server:
            async with Client(url(server)) as client, Client(url(server)) as pub:
                sub = await client.subscribe("two.t")
                first = asyncio.ensure_future(sub.__anext__())
                await asyncio.sleep(0)
                second = asyncio.ensure_future(sub.__anext__())
                await asyncio.sleep(0)
                assert second.done()
                with pytest.raises(RuntimeError):
                    second.result()
                with pytest.raises(RuntimeError):
                    await sub.next(1)

                async def iterate():
                    async for message in sub:
                        return message

                with pytest.raises(RuntimeError):
                    await iterate()

                ack = await pub.publish_acked("two.t", b"1")
                message = await asyncio.wait_for(first, 3)
                assert (message.seq, message.data) == (ack.seq, b"1")
                # once the first consumer got its message, the subscription can be read again
                pub.publish("two.t", b"2")
                assert (await sub.next(3)).data == b"2"
                # a cancelled wait frees it as well
                waiting = asyncio.ensure_future(sub.__anext__())
                await asyncio.sleep(0)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                pub.publish("two.t", b"3")
                assert (await sub.next(3)).data == b"3"

    run(main())


# r15: a failed connect


@pytest.mark.parametrize("failure", ["refused", "http-error", "handshake-timeout"])
def test_failed_open_leaves_the_client_closed(failure):
    """r15. When Client.open() (or Client.connect()) fails, the client is closed: publish raises
    ConnectionClosed, requests fail at once and wait_closed() returns 1006 promptly."""

    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        try:
            if failure == "handshake-timeout":
                listener.listen()  # accepts TCP connections, never answers the upgrade
            if failure == "http-error":
                async with serving() as server:
                    await check(url(server) + "nope")
            else:
                await check(f"ws://127.0.0.1:{port}/")
        finally:
            listener.close()

    async def check(target: str) -> None:
        client = Client(target, connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            await client.open()
        assert info.value.code == 1006
        assert time.monotonic() - started < 2.0
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.publish("t", b"x")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.publish_acked("t", b"x"), 1)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.subscribe("t"), 1)
        code, reason = await asyncio.wait_for(client.wait_closed(), 1)
        assert code == 1006 and reason
        await asyncio.wait_for(client.close(), 1)
        with pytest.raises(ConnectionClosed):
            await Client.connect(target, connect_timeout=0.3)
        await asyncio.sleep(0.05)  # anything left behind would reach the loop's exception handler

    run(main())
