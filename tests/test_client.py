"""The asyncio client (broker.client) against a real server: its API and its error behaviour."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from broker.client import (
    BrokerError,
    Client,
    ConnectionClosed,
    Gap,
    Message,
    PublishAck,
    RequestError,
    Subscription,
    SubscriptionOverflow,
)
from broker.errors import ErrorCode
from broker.messages import Ack, Delivery, Sub, encode
from conftest import connect_tracked, eventually, recv_message, run, serving, url, ws_raw


class FrameCountingSession:
    """Stands in for a connection's Session and counts the frames the server receives."""

    def __init__(self, session) -> None:
        self.__dict__["_session"] = session
        self.__dict__["frames"] = 0

    def receive(self, data) -> None:
        self.__dict__["frames"] += 1
        self._session.receive(data)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_subscribe_with_callback():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub:
                got = []
                sub = await sub_client.subscribe("cb.>", got.append)
                assert isinstance(sub, Subscription) and sub.pattern == "cb.>"
                pub.publish("cb.a", b"1")
                pub.publish("cb.b", b"2")
                await pub.publish_acked("cb.a", b"3")
                await eventually(lambda: len(got) == 3, 5, "three callbacks")
                epoch = server.router.epoch
                # one tick: each topic's messages form one batch, in the order topics were first published
                assert got == [
                    Message("cb.a", epoch, 1, b"1"),
                    Message("cb.a", epoch, 2, b"3"),
                    Message("cb.b", epoch, 1, b"2"),
                ]
                assert all(isinstance(m, Message) and type(m.data) is bytes for m in got)

    run(main())


def test_async_iterator():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub:
                sub = await sub_client.subscribe("it.t")
                for i in range(5):
                    pub.publish("it.t", b"%d" % i)
                seen = []
                async for message in sub:
                    seen.append((message.seq, message.data))
                    if len(seen) == 5:
                        break
                assert seen == [(i + 1, b"%d" % i) for i in range(5)]
            # closing the client with 1000 ends the iteration without an error
            assert [m async for m in sub] == []

    run(main())


def test_next_with_timeout():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub:
                sub = await sub_client.subscribe("nx.t")
                with pytest.raises(asyncio.TimeoutError):
                    await sub.next(0.05)
                # a timeout leaves the subscription usable
                pub.publish("nx.t", b"late")
                message = await sub.next(5)
                assert (message.topic, message.seq, message.data) == ("nx.t", 1, b"late")
                pub.publish("nx.t", b"later")
                assert (await sub.next()).data == b"later"

    run(main())


def test_second_concurrent_consumer_of_a_subscription_gets_runtime_error():
    """Only one coroutine may wait on a Subscription at a time; a second one is refused
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


def test_publish_acked_returns_publish_ack():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as client:
                first = await client.publish_acked("pa.t", b"a")
                second = await client.publish_acked("pa.t", b"b")
                assert isinstance(first, PublishAck)
                assert first == PublishAck(server.router.epoch, 1)
                assert (second.epoch, second.seq) == (server.router.epoch, 2)

    run(main())


def test_large_publishes_in_one_tick_respect_the_frame_limit():
    """Each publish is within max_payload_bytes (512 KiB), so together they must not exceed the
    broker's max_frame_bytes (1 MiB) in a single batch frame: the client has to split its batch."""
    size, n = 400 << 10, 3

    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub:
                got = []
                await sub_client.subscribe("lp.t", got.append)
                for i in range(n):
                    pub.publish("lp.t", bytes([i]) * size)
                ack = await pub.publish_acked("lp.t", b"last")
                assert ack.seq == n + 1
                await eventually(lambda: len(got) == n + 1, 5, "every message")
                assert [m.data[:1] for m in got[:n]] == [bytes([i]) for i in range(n)]
                assert server.router.stats.closes == {}

    run(main())


def test_server_refusal_raises_request_error_with_code():
    async def main():
        async with serving(max_payload_bytes=1000, max_subscriptions=2) as server:
            async with Client(url(server)) as client:
                with pytest.raises(RequestError) as info:
                    await client.publish_acked("big.t", bytes(1001))
                assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE
                assert info.value.request_id > 0
                assert "1000" in info.value.text
                # the connection stays usable; the refused message took no sequence number
                assert (await client.publish_acked("big.t", bytes(1000))).seq == 1

                one = await client.subscribe("s.one")
                await client.subscribe("s.two")
                with pytest.raises(RequestError) as info:
                    await client.subscribe("s.three")
                assert info.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS
                # the refused subscription was not kept locally: it can be made once there is room
                await one.unsubscribe()
                three = await client.subscribe("s.three")
                await client.publish_acked("s.three", b"x")
                assert (await three.next(5)).data == b"x"
                assert server.router.stats.errors == {ErrorCode.PAYLOAD_TOO_LARGE: 1, ErrorCode.TOO_MANY_SUBSCRIPTIONS: 1}

    run(main())


def test_fire_and_forget_refusals_reach_on_error():
    async def main():
        async with serving(max_payload_bytes=1000) as server:
            errors = []
            async with Client(url(server), on_error=errors.append) as client:
                client.publish("ff.*", b"x")  # not validated locally: the broker refuses it
                client.publish("ff.t", bytes(2000))
                await client.publish_acked("ff.t", b"ok")  # replies come in order
                assert [e.code for e in errors] == [ErrorCode.PATTERN_NOT_ALLOWED, ErrorCode.PAYLOAD_TOO_LARGE]
                assert all(isinstance(e, RequestError) and e.request_id == 0 for e in errors)

    run(main())


def test_callback_exception_is_logged_and_does_not_close_the_connection(caplog):
    """An exception in one subscription's callback is logged on `broker.client`; the
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


def test_client_side_validation():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as client:
                with pytest.raises(RequestError) as info:
                    await client.publish_acked("bad..topic", b"x")
                assert info.value.code == ErrorCode.INVALID_TOPIC
                with pytest.raises(RequestError) as info:
                    await client.subscribe("md.>.x")
                assert info.value.code == ErrorCode.INVALID_TOPIC
                with pytest.raises(RequestError) as info:
                    await client.unsubscribe("never.subscribed")
                assert info.value.code == ErrorCode.NOT_SUBSCRIBED
                assert server.router.stats.errors == {}  # none of them reached the broker

    run(main())


def test_subscribing_twice_to_the_same_pattern_raises():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as client:
                sub = await client.subscribe("dup.>")
                with pytest.raises(RequestError) as info:
                    await client.subscribe("dup.>")
                assert info.value.code == ErrorCode.ALREADY_SUBSCRIBED
                # the first subscription is unaffected
                await client.publish_acked("dup.x", b"1")
                assert (await sub.next(5)).data == b"1"
                # the same pattern is fine again after unsubscribing
                await sub.unsubscribe()
                again = await client.subscribe("dup.>")
                await client.publish_acked("dup.x", b"2")
                assert (await again.next(5)).seq == 2

    run(main())


@pytest.mark.parametrize("ticks", [1, 2, 5])
def test_cancelled_subscribe_leaves_no_subscription_at_the_broker(ticks):
    """Cancelling Client.subscribe() after its Sub was queued, before the ack: the broker
    ends up without the subscription, the client without a trace of it, and subscribing to the
    same pattern again works. (When the ack was already read, asyncio may complete the request
    despite the cancel; client and broker must then agree that the subscription exists.)"""

    async def main():
        async with serving() as server:
            client, conn = await connect_tracked(server, heartbeat_s=None)  # counts the messages the broker receives
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
                        lambda: conn.session.received == 2 and not conn.session.subscriptions,
                        3,
                        "the broker to drop the cancelled subscription",
                    )
                    assert server.router.index.receivers("cs.t") == []
                else:
                    assert set(conn.session.subscriptions) == {"cs.t"}
                    await held.unsubscribe()
                    assert not conn.session.subscriptions
                assert server.router.stats.errors == {}

                sub = await client.subscribe("cs.t")
                assert set(conn.session.subscriptions) == {"cs.t"}
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


def test_publishes_of_one_tick_leave_in_one_frame():
    n = 100

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(encode(Sub(1, "cb.batch")))
                assert await recv_message(ws) == Ack(1)
                pub, conn = await connect_tracked(server, heartbeat_s=None)  # counts the messages the broker receives
                counting = conn.session = FrameCountingSession(conn.session)
                try:
                    payloads = [b"p%d" % i for i in range(n)]
                    for data in payloads:
                        pub.publish("cb.batch", data)
                    frame = await recv_message(ws)
                    assert frame == Delivery("cb.batch", server.router.epoch, 1, payloads)
                    assert counting.frames == 1
                    assert counting.received == n
                    # a later tick is a new frame
                    pub.publish("cb.batch", b"again")
                    assert (await recv_message(ws)).data == [b"again"]
                    assert counting.frames == 2
                finally:
                    await pub.close()
            finally:
                await ws.close()

    run(main())


def test_requests_after_the_server_closed_raise_connection_closed():
    async def main():
        async with serving() as server:
            client = await Client.connect(url(server), reconnect=False)
            sub = await client.subscribe("cc.t")
            pending = asyncio.ensure_future(client.publish_acked("cc.t", b"x"))
            await server.stop()
            assert await client.wait_closed() == (1001, "server shutting down")
            assert client.closed
            with pytest.raises(ConnectionClosed) as info:
                await pending  # made before the close, never answered
            assert info.value.code == 1001
            with pytest.raises(ConnectionClosed) as info:
                client.publish("cc.t", b"x")
            assert (info.value.code, info.value.reason) == (1001, "server shutting down")
            with pytest.raises(ConnectionClosed):
                await client.publish_acked("cc.t", b"x")
            with pytest.raises(ConnectionClosed):
                await client.subscribe("cc.other")
            with pytest.raises(ConnectionClosed):
                await sub.next(1)
            await client.close()  # a no-op now

    run(main())


def test_requests_wait_while_the_client_reconnects_and_those_in_flight_fail():
    """A request in flight when the connection drops fails with ConnectionClosed; one made
    while the client reconnects waits for the new connection, at most request_timeout."""
    from conftest import RawSocketClient

    async def main():
        async with serving() as server:
            responder = await RawSocketClient.connect(server.port)  # takes requests, never answers
            await responder.send(Sub(1, "rq.svc", None, False, True))
            assert await responder.recv() == Ack(1)
            before = set(server.connections)
            client = await Client.connect(url(server), reconnect_delay=(0.3, 0.3), jitter=lambda: 1.0, request_timeout=5)
            (conn,) = [c for i, c in server.connections.items() if i not in before]
            in_flight = asyncio.ensure_future(client.request("rq.svc", b"?", timeout=10))
            await eventually(lambda: server.router.stats.requests == 1, 5, "the request to reach the responder")
            conn.transport.abort()  # the connection drops: no close frame (1006)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(in_flight, 5)
            assert info.value.code == 1006
            assert client.state != "connected" and not client.closed
            started = time.monotonic()
            sub = await client.subscribe("rq.later")  # made while reconnecting: waits, then acked
            assert time.monotonic() - started >= 0.2 and client.state == "connected"
            await client.publish_acked("rq.later", b"after")
            assert (await sub.next(5)).data == b"after"
            await client.close()
            responder.close()
            # a reconnection slower than request_timeout: a request made meanwhile gives up
            before = set(server.connections)
            lonely = await Client.connect(url(server), reconnect_delay=(10, 10), jitter=lambda: 1.0, request_timeout=0.3)
            (conn,) = [c for i, c in server.connections.items() if i not in before]
            conn.transport.abort()
            await eventually(lambda: lonely.state != "connected", 5, "the drop")
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                await lonely.subscribe("rq.never")
            assert info.value.reason == "not reconnected within 0.3s" and 0.25 <= time.monotonic() - started < 2
            await lonely.close()

    run(main())


def test_clean_close():
    async def main():
        async with serving() as server:
            client = await Client.connect(url(server))
            sub = await client.subscribe("close.t")
            assert len(server.connections) == 1 and not client.closed
            await client.close()
            assert client.closed
            assert (await client.wait_closed())[0] == 1000
            await eventually(lambda: not server.connections, 5, "the server to drop the connection")
            assert server.router.index.receivers("close.t") == []
            assert server.router.stats.closes == {}  # the client closed, not the broker
            with pytest.raises(StopAsyncIteration):
                await sub.next(1)
            with pytest.raises(ConnectionClosed) as info:
                client.publish("close.t", b"x")
            assert info.value.code == 1000
            await client.close()  # idempotent

    run(main())


def test_connect_failures_raise_connection_closed():
    async def main():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ConnectionClosed) as info:
            await Client.connect(f"ws://127.0.0.1:{port}/", connect_timeout=2)
        assert info.value.code == 1006

        # a listener that never answers the handshake: bounded by connect_timeout
        with socket.socket() as mute:
            mute.bind(("127.0.0.1", 0))
            mute.listen()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConnectionClosed) as info:
                await Client.connect(f"ws://127.0.0.1:{mute.getsockname()[1]}/", connect_timeout=0.3)
            assert info.value.code == 1006
            assert loop.time() - started < 2

        # a broker that refuses the handshake (wrong path)
        async with serving() as server:
            with pytest.raises(ConnectionClosed) as info:
                await Client.connect(f"ws://127.0.0.1:{server.port}/nowhere", connect_timeout=2)
            assert info.value.code == 1006
            assert server.handshakes_refused == 1

    run(main())


@pytest.mark.parametrize("failure", ["refused", "http-error", "handshake-timeout"])
def test_failed_open_leaves_the_client_closed(failure):
    """When Client.open() (or Client.connect()) fails, the client is closed: publish raises
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


def test_subscription_queue_overflow():
    async def main():
        async with serving() as server:
            sub_client, conn = await connect_tracked(server)
            try:
                async with Client(url(server)) as pub:
                    sub = await sub_client.subscribe("ovf.t", max_queue=5)
                    done = asyncio.Event()
                    await sub_client.subscribe("ovf.marker", lambda m: done.set())
                    for i in range(10):
                        pub.publish("ovf.t", b"%d" % i)
                    pub.publish("ovf.marker", b"")
                    await asyncio.wait_for(done.wait(), 5)
                    # what was queued is still handed out, then the overflow is raised
                    got = []
                    with pytest.raises(SubscriptionOverflow):
                        async for message in sub:
                            got.append(message.seq)
                    assert got == [1, 2, 3, 4, 5]
                    # the client dropped the subscription at the broker too
                    await eventually(lambda: set(conn.session.subscriptions) == {"ovf.marker"}, 5, "the broker-side unsub")
                    # and the pattern can be subscribed again
                    again = await sub_client.subscribe("ovf.t")
                    assert again.seq == 10
            finally:
                await sub_client.close()

    run(main())


def test_client_default_max_queue_applies_to_subscriptions():
    async def main():
        async with serving() as server:
            async with Client(url(server), max_queue=2) as client:
                sub = await client.subscribe("dq.t")
                assert sub.max_queue == 2
                assert (await client.subscribe("dq.u", max_queue=10)).max_queue == 10
                done = asyncio.Event()
                await client.subscribe("dq.marker", lambda m: done.set())
                for i in range(3):
                    client.publish("dq.t", b"%d" % i)
                client.publish("dq.marker", b"")
                await asyncio.wait_for(done.wait(), 5)
                assert [(await sub.next(1)).seq for _ in range(2)] == [1, 2]
                with pytest.raises(SubscriptionOverflow):
                    await sub.next(1)

    run(main())


def test_publish_respects_back_pressure_and_holds_a_bounded_amount():
    """A peer that completes the handshake and then reads nothing: the client stops writing
    when its transport pauses, holds at most max_buffered_bytes of publishes, then refuses more
    until drain() succeeds."""
    import base64
    import hashlib
    import re

    async def main():
        async def mute(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head).group(1)
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: broker.v1\r\n\r\n"
            )
            writer.transport.pause_reading()  # and never reads again
            await asyncio.sleep(30)

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(mute, sock=sock)
        port = sock.getsockname()[1]
        client = await Client.connect(f"ws://127.0.0.1:{port}/", reconnect=False, max_buffered_bytes=1 << 20)
        payload = bytes(16 * 1024)
        sent = 0
        with pytest.raises(BrokerError, match="max_buffered_bytes"):
            for _ in range(100_000):
                client.publish("bp.t", payload)
                sent += 1
                if sent % 16 == 0:
                    await asyncio.sleep(0)  # let the loop write (and the transport pause)
        assert client.protocol.paused and client.protocol.held_bytes <= (1 << 20) + 300 * 1024
        with pytest.raises(asyncio.TimeoutError):
            await client.drain(0.2)
        client.abort()
        await client.wait_closed()
        server.close()

    run(main())


def test_abort_drops_the_connection_as_a_network_cut_does():
    """`abort()` ends the connection without a close frame: with `reconnect` the client comes
    back and its subscription recovers; without, it is closed with 1006."""

    async def main():
        async with serving() as server:
            states: list = []
            client = await Client.connect(url(server), reconnect_delay=(0.01, 0.05), on_state=lambda s, d: states.append((s, d)))
            got: list = []
            await client.subscribe("ab.t", got.append)
            client.abort()
            await eventually(lambda: client.state == "connected" and client.reconnects == 1, 5, "the reconnection")
            assert ("disconnected", "1006: connection lost") in states
            async with Client(url(server)) as pub:
                await pub.publish_acked("ab.t", b"after")
            await eventually(lambda: [m.data for m in got] == [b"after"], 5, "the delivery")
            await client.close()

            once = await Client.connect(url(server), reconnect=False)
            once.abort()
            assert await once.wait_closed() == (1006, "connection lost")
            once.abort()  # closed: nothing to do

    run(main())


def test_a_subscription_says_how_many_items_wait_unread():
    """`Subscription.pending`: the messages and gaps queued for the iterator and not read yet
    (what max_queue bounds)."""
    sub = Subscription(None, "pn.*", None, 10)  # type: ignore[arg-type]  # fed directly, as the client's core does
    assert sub.pending == 0
    sub.receive("pn.a", 1, 1, [b"1", b"2", b"3"])
    sub.gap(Gap("pn.a", 1, 4, 5, "dropped", "dropped"))
    assert sub.pending == 4

    async def read_one():
        return await sub.next(1)

    assert asyncio.run(read_one()) == Message("pn.a", 1, 1, b"1")
    assert sub.pending == 3
    called = Subscription(None, "pn.b", lambda item: None, 10)  # type: ignore[arg-type]
    called.receive("pn.b", 1, 1, [b"1"])
    assert called.pending == 0  # a callback takes each item as it arrives


def test_the_client_tells_its_connection_s_transport_facts():
    """`Client.get_extra_info(name)`: the current connection's socket facts, as asyncio's
    transports give them (peername, sockname, ssl_object, cipher...); `default` while there
    is no connection."""

    async def main():
        async with serving() as server:
            client = Client(url(server), reconnect=False)
            assert client.get_extra_info("peername") is None and client.get_extra_info("peername", "none") == "none"
            await client.open()
            assert client.get_extra_info("peername")[1] == server.port
            local = client.get_extra_info("sockname")[1]
            assert local != server.port and local > 0
            assert client.get_extra_info("ssl_object") is None  # ws://
            await client.close()
            assert client.get_extra_info("sockname", "closed") == "closed"

    run(main())
