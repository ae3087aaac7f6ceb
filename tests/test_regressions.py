"""Regression tests for the review findings fixed in the broker and its client.

Each test names the finding it guards (r1, r2, ...). They drive the real server where the wire
matters and the sans-I/O core where the amount of work must be shown to be bounded: work is
counted, not timed, apart from one very generous wall-clock bound per case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import msgspec
import pytest

from broker.client import Client, ConnectionClosed, Message
from broker.errors import CloseCode, ErrorCode
from broker.messages import SUBPROTOCOL, Ack, Delivery, Err, Pub, Sub, Unsub, decode_server_frame, encode

from conftest import RawSocketClient, client_frame, decode_frames, eventually, recv_message, run, server_conn_with, serving, split_frame, url, ws_raw
from test_client import connect_tracked
from test_core import Harness
from test_handshake import parse_head, upgrade_request

pack = msgspec.msgpack.encode


# helpers


async def replies(ws, n: int, timeout: float = 3.0) -> list:
    """The next `n` server messages on a `websockets` connection."""
    return [await recv_message(ws, timeout) for _ in range(n)]


async def probe(ws, request_id: int, topic: str = "probe.ok") -> Ack:
    """Publish with an ack: the next reply must be that ack (nothing else was queued before it)."""
    await ws.send(pack(["pub", request_id, topic, b"ok"]))
    reply = await recv_message(ws)
    assert isinstance(reply, Ack) and reply.id == request_id, f"expected the probe's ack, got {reply}"
    return reply


# r1: a closing connection that stopped reading


CLOSE_TIMEOUT = 0.3
PENDING_LIMIT = 2 << 20
MAX_FRAME = 1 << 20


@pytest.mark.parametrize("traffic", ["busy", "idle"])
@pytest.mark.parametrize("ending", ["close-frame", "oversized-frame"])
def test_closing_connection_that_stopped_reading_gets_nothing_more_and_is_aborted(ending, traffic):
    """r1. A subscriber whose socket is full sends a close frame (or a frame over max_frame_bytes,
    which picows answers with 1009) and never reads again. From then on the broker queues
    nothing more for it, and since a graceful close cannot complete, it aborts the connection
    close_timeout_s after the close (protocol.md 1.4), whether or not its topic stays busy."""
    payload = bytes(64 << 10)

    async def main():
        async with serving(
            max_pending_bytes=PENDING_LIMIT, max_frame_bytes=MAX_FRAME, close_timeout_s=CLOSE_TIMEOUT, shutdown_timeout_s=1
        ) as server:
            async with Client(url(server)) as pub:
                raw = await RawSocketClient.connect(server.port, rcvbuf=4096)
                publishing = True

                async def keep_publishing():
                    while publishing:
                        pub.publish("busy", payload)
                        await asyncio.sleep(0.002)

                task = None
                try:
                    await raw.send(Sub(1, "busy"))
                    assert await raw.recv() == Ack(1)
                    conn = server_conn_with(server, {"busy"})
                    # the client reads no more: fill its socket until the broker's transport pauses
                    for _ in range(500):
                        if conn.box.paused:
                            break
                        pub.publish("busy", payload)
                        await asyncio.sleep(0.001)
                    assert conn.box.paused, "the transport to the non-reading client never paused"
                    assert not conn.box.over and server.router.stats.slow_consumers == 0

                    if ending == "close-frame":
                        frame = client_frame(0x8, int(CloseCode.NORMAL).to_bytes(2, "big"))
                    else:
                        frame = client_frame(0x2, length=MAX_FRAME + 1)  # the header is enough
                    await raw.loop.sock_sendall(raw.sock, frame)
                    start = time.monotonic()
                    if traffic == "busy":
                        task = asyncio.get_running_loop().create_task(keep_publishing())

                    await eventually(lambda: conn.session.closed, 1.0, f"the broker to stop delivering after the {ending}")
                    assert not conn.box.over and server.router.stats.slow_consumers == 0, (
                        f"deliveries went on after the {ending} until the outbox passed max_pending_bytes"
                    )
                    assert conn.session.subscriptions == set()
                    assert conn.box not in server.router.index.receivers("busy")
                    # nothing is queued for it any more, however busy its topic is
                    while conn.id in server.connections and time.monotonic() - start < CLOSE_TIMEOUT + 1.0:
                        assert conn.box.size == 0 and conn.box.closed
                        await asyncio.sleep(0.01)
                    elapsed = time.monotonic() - start
                    assert conn.id not in server.connections, f"still connected {elapsed:.2f}s after the {ending}"
                    assert elapsed < CLOSE_TIMEOUT + 1.0
                    expected_closes = {} if ending == "close-frame" else {CloseCode.MESSAGE_TOO_BIG: 1}
                    assert server.router.stats.closes == expected_closes
                    assert server.router.stats.slow_consumers == 0
                    assert not pub.closed
                finally:
                    publishing = False
                    if task is not None:
                        await task
                    raw.close()

    run(main())


# r2: subscription changes are O(1)


def test_a_pattern_subscription_emits_every_pending_batch_in_one_pass():
    """r2. A `sub` of a pattern emits this tick's pending batches of *all* topics (not only the
    matching ones, which would leave the rest to be scanned again by the next pattern change):
    afterwards nothing is dirty, and later pattern changes in the same frame find nothing to do."""
    n = 3000
    h = Harness(max_topics=10 * n)
    watcher = h.session("watcher")
    watcher.receive(encode(Sub(0, "a.>")))
    s = h.session("s")
    s.receive(encode([Pub(0, f"a.{i}", b"%d" % i) for i in range(n)] + [Sub(0, "b.*")]))
    assert h.router.dirty == []
    assert all(not state.pending and not state.dirty for state in h.router.topics.values())
    written, slow = h.tick()
    assert slow == []
    assert written == {"watcher": [Delivery(f"a.{i}", 42, 1, [b"%d" % i]) for i in range(n)]}

    # thousands of publishes to distinct topics, then thousands of pattern subs and unsubs,
    # all in one frame: each topic's batch is emitted exactly once
    emitted = []
    real_emit = h.router._emit

    def counting_emit(state):
        emitted.append(state.name)
        real_emit(state)

    h.router._emit = counting_emit
    changes = []
    for i in range(n):
        changes += [Sub(0, f"c.{i}.*"), Unsub(0, f"c.{i}.*")]
    frame = encode([Pub(0, f"a.{i}", b"x") for i in range(n)] + changes)
    started = time.monotonic()
    s.receive(frame)
    elapsed = time.monotonic() - started
    assert h.router.dirty == []
    assert sorted(emitted) == sorted(f"a.{i}" for i in range(n))
    assert s.subscriptions == {"b.*"} and s.errors == 0
    assert elapsed < 5.0, f"one frame of {len(frame)} bytes took {elapsed:.1f}s"
    written, _ = h.tick()
    assert written == {"watcher": [Delivery(f"a.{i}", 42, 2, [b"x"]) for i in range(n)]}


def test_pattern_changes_touch_only_the_topics_they_match():
    """With many topics, a pattern sub/unsub that matches none of them costs the same as with
    none; one that matches some changes exactly those topics' lists; answers stay right."""
    n_topics, n_pairs = 20_000, 400
    h = Harness(max_topics=2 * n_topics)
    everything = h.session("everything")
    everything.receive(encode(Sub(0, ">")))
    s = h.session("s")
    for start in range(0, n_topics, 10_000):
        s.receive(encode([Pub(0, f"a.{i}", b"") for i in range(start, start + 10_000)]))
    h.tick()
    index = h.router.index

    changes = []
    for _ in range(n_pairs):
        changes += [Sub(0, "x.*"), Unsub(0, "x.*")]
    work = index.work
    s.receive(encode(changes))
    assert index.work - work < 20 * len(changes), "a pattern change visited topics it does not match"
    assert s.errors == 0 and s.subscriptions == set()

    work = index.work
    s.receive(encode([Sub(0, "a.17"), Sub(0, "a.*.x")]))  # an exact topic; a pattern matching none
    assert index.work - work < 50
    work = index.work
    s.receive(encode(Sub(0, "a.*")))  # matches every topic
    assert n_topics <= index.work - work < 3 * n_topics
    s.receive(encode([Unsub(0, "a.17"), Unsub(0, "a.*.x"), Unsub(0, "a.*")]))

    # the answers are right
    late = h.session("late")
    late.receive(encode(Sub(0, "a.*")))
    s.receive(encode([Pub(0, "a.7", b"y"), Pub(0, "b.7", b"z")]))
    written, _ = h.tick()
    assert written == {
        "everything": [Delivery("a.7", 42, 2, [b"y"]), Delivery("b.7", 42, 1, [b"z"])],
        "late": [Delivery("a.7", 42, 2, [b"y"])],
    }


# r16: error amplification and the batch limit


def empty_array_batch(size: int) -> bytes:
    """A batch frame of exactly `size` bytes: an array32 header and size - 5 empty arrays."""
    count = size - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def test_huge_batch_of_empty_arrays_gets_a_single_err():
    """r16. A 1 MiB frame holding about a million empty arrays is a batch far over
    max_batch_messages: it gets one err (code 1, id 0), not one per element."""
    frame = empty_array_batch(MAX_FRAME)
    assert len(frame) == MAX_FRAME

    # in the core: exactly one frame is queued, however many elements the batch holds
    h = Harness()
    s = h.session("s")
    s.receive(frame)
    assert len(s.box.pieces) == 1 and not s.box.over
    ((err,),) = decode_frames(s.box.take(MAX_FRAME))
    assert isinstance(err, Err) and (err.id, err.code) == (0, ErrorCode.BAD_MESSAGE)
    assert str(MAX_FRAME - 5) in err.text and "10000" in err.text
    assert s.errors == 1

    async def main():
        async with serving(max_frame_bytes=MAX_FRAME) as server:
            ws = await ws_raw(server)
            try:
                await ws.send(frame)
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE)
                await probe(ws, 5)
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
                assert server.router.stats.closes == {}
            finally:
                await ws.close()

    run(main())


def test_errors_per_frame_stop_after_one_hundred():
    """r16. A batch within max_batch_messages whose 200 elements are all bad gets 100 errs (each
    with its element's id) and one more err (code 1, id 0) saying the rest was ignored. Good
    elements before the cut-off apply; those after it do not."""
    bad = [["pub", i, 5] for i in range(2, 202)]  # data is not bin: code 1 with the element's id
    batch = [["pub", 1, "cap.before", b"a"], *bad, ["pub", 999, "cap.after", b"b"]]

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(pack(batch))
                got = await replies(ws, 102)
                errs, last = got[:101], got[101]
                assert all(isinstance(e, Err) and e.code == ErrorCode.BAD_MESSAGE for e in errs), errs
                assert [e.id for e in errs[:100]] == list(range(2, 102))
                assert errs[100].id == 0 and "ignored" in errs[100].text
                assert last == Ack(1, server.router.epoch, 1)
                await probe(ws, 7)  # nothing else was queued
                assert "cap.after" not in server.router.topics
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 101}
                assert server.router.stats.closes == {}
            finally:
                await ws.close()

    run(main())


def test_valid_batch_over_max_batch_messages_is_refused_whole():
    """r16. With max_batch_messages=10, a well-formed batch of 11 acked publishes gets one err
    (code 1, id 0) and nothing in it is applied; a batch of exactly 10 is accepted."""

    async def main():
        async with serving(max_batch_messages=10) as server:
            ws = await ws_raw(server)
            try:
                await ws.send(encode([Pub(i, "mb.t", b"%d" % i) for i in range(1, 12)]))
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                assert "11" in reply.text and "10" in reply.text
                await probe(ws, 50)  # no acks followed the err
                assert "mb.t" not in server.router.topics
                assert server.router.stats.published == 1  # the probe only

                await ws.send(encode([Pub(i, "mb.t", b"%d" % i) for i in range(1, 11)]))
                epoch = server.router.epoch
                assert await replies(ws, 10) == [Ack(i, epoch, i) for i in range(1, 11)]
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
            finally:
                await ws.close()

    run(main())


# r19: deeply nested MessagePack


NESTED = {
    "batch": b"\x91" * 100_000,
    "single": b"\x92\xa3pub" + b"\x91" * 100_000,
    "in-batch-element": b"\x92" + pack(["pub", 1, "t", b""]) + b"\x91" * 100_000,
    "payload": b"\x94\xa3pub\x01\xa1t" + b"\x91" * 100_000,
    "maps": b"\x91" + b"\x81\xa1a" * 50_000 + b"\xc0",
}


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_deeply_nested_msgpack_gets_an_err_and_the_connection_stays_open(kind):
    """r19. Nesting deeper than the decoder's recursion limit is an invalid message (err code 1,
    id 0), not an internal error that closes the connection with 1011."""

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(NESTED[kind])
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                await probe(ws, 3)
                assert server.router.stats.closes == {}
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
                assert len(server.connections) == 1
            finally:
                await ws.close()

    run(main())


# r10: handshake details


async def handshake(port: int, request: bytes):
    """Send a hand-made upgrade request: (status, headers, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    status, headers = parse_head(head)
    return status, headers, reader, writer


@pytest.mark.parametrize("path", ["//evil/", "//evil/?x=1", "//127.0.0.1/"])
def test_path_with_a_double_slash_is_refused_with_404(path):
    """r10. The request path must equal the configured path exactly: `//evil/` is not `/`."""

    async def main():
        async with serving() as server:
            status, _, _, writer = await handshake(server.port, upgrade_request(path, [SUBPROTOCOL]))
            writer.close()
            assert status == 404
            assert server.handshakes_refused == 1
            assert server.connections == {}

    run(main())


def test_browser_connection_header_with_several_tokens_is_accepted():
    """r10. Firefox sends `Connection: keep-alive, Upgrade`; that is an upgrade request."""
    request = upgrade_request("/", [SUBPROTOCOL]).replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade")
    assert b"Connection: keep-alive, Upgrade\r\n" in request

    async def main():
        async with serving() as server:
            status, headers, reader, writer = await handshake(server.port, request)
            try:
                assert status == 101
                assert headers["sec-websocket-protocol"] == [SUBPROTOCOL]
                # and the connection speaks the protocol
                writer.write(client_frame(0x2, pack(["sub", 1, "ff.t"])))
                data = b""
                while (split := split_frame(data)) is None:
                    data += await asyncio.wait_for(reader.read(4096), 3)
                opcode, payload, _ = split
                assert opcode == 0x2
                assert decode_server_frame(payload) == [Ack(1, 0, 0)]
                assert server.handshakes_refused == 0
            finally:
                writer.close()

    run(main())


def test_unsupported_websocket_version_gets_426_naming_13():
    """r10. RFC 6455 4.4: an unsupported version gets 426 with `Sec-WebSocket-Version: 13`."""
    request = upgrade_request("/", [SUBPROTOCOL]).replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")

    async def main():
        async with serving() as server:
            status, headers, _, writer = await handshake(server.port, request)
            writer.close()
            assert status == 426
            assert headers["sec-websocket-version"] == ["13"]
            assert server.connections == {}

    run(main())


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
