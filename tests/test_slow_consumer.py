"""Slow consumers and bursts (protocol.md section 7): a connection that stays behind is closed
with 1013 and nobody else notices; a burst that healthy, reading subscribers absorb is not a
slow consumer, however large."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.client import Client
from broker.messages import Ack, Pub, Sub, encode
from conftest import RawSocketClient, client_frame, conns_with, eventually, run, serving, url


def test_past_four_times_max_pending_bytes_a_consumer_is_closed_at_once_and_others_keep_up():
    size = 64 << 10

    async def main():
        # a long timeout: only the hard bound (4 x 256 KiB) can close it in this test
        async with serving(
            max_pending_bytes=256 << 10, max_payload_bytes=128 << 10, close_timeout_s=0.2, slow_consumer_timeout_s=30
        ) as server:
            async with Client(url(server)) as fast, Client(url(server)) as pub:
                got = []
                arrived = asyncio.Event()

                def on_fast(message):
                    got.append(message)
                    arrived.set()

                await fast.subscribe("big", on_fast)
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "big"))
                    assert await slow.recv() == Ack(1)
                    fast_conn, slow_conn = conns_with(server, {"big"})
                    sent = 0
                    after_close = None
                    while sent < 512:
                        pub.publish("big", sent.to_bytes(4, "big") + bytes(size - 4))
                        sent += 1
                        # keep at most two messages in flight to the fast subscriber
                        while len(got) < sent - 1:
                            arrived.clear()
                            await asyncio.wait_for(arrived.wait(), 5)
                        await asyncio.sleep(0)
                        if slow_conn.close_reason is not None and after_close is None:
                            after_close = sent
                        if after_close is not None and sent >= after_close + 16:
                            break
                    assert after_close is not None, f"slow consumer not closed after {sent} messages"
                    await eventually(lambda: len(got) == sent, 5, "the fast subscriber")
                    assert [m.seq for m in got] == list(range(1, sent + 1))
                    assert [int.from_bytes(m.data[:4], "big") for m in got] == list(range(sent))

                    code, reason = slow_conn.close_reason
                    assert code == 1013 and reason.startswith("slow consumer: ") and reason.endswith(f" bytes pending, limit {256 << 10}")
                    assert server.router.stats.closes == {1013: 1}
                    assert server.router.stats.slow_consumers == 1
                    await eventually(lambda: slow_conn.id not in server.connections, 3, "the slow connection to go")
                    assert fast_conn.id in server.connections and not fast.closed
                finally:
                    slow.close()

    run(main())


async def fall_behind(pub: Client, conn, topic: str, limit: int) -> int:
    """Publish 64 KiB messages until `conn` (which does not read) is more than `limit` bytes
    behind in the broker; returns how many were published."""
    sent = 0
    while conn.box.pending <= limit:
        await pub.publish_acked(topic, sent.to_bytes(4, "big") + bytes((64 << 10) - 4))
        sent += 1
        assert sent < 1000, "the broker never held a backlog"
    return sent


def test_a_consumer_that_stays_behind_is_closed_after_slow_consumer_timeout_s():
    """Above max_pending_bytes but below the hard bound: closed once it has stayed there for
    slow_consumer_timeout_s, not before."""
    timeout = 0.6
    limit = 512 << 10

    async def main():
        async with serving(
            max_pending_bytes=limit, max_payload_bytes=128 << 10, close_timeout_s=0.2, slow_consumer_timeout_s=timeout
        ) as server:
            async with Client(url(server)) as pub:
                slow = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await slow.send(Sub(1, "lag"))
                    assert await slow.recv() == Ack(1)
                    (conn,) = conns_with(server, {"lag"})
                    await fall_behind(pub, conn, "lag", limit)
                    behind_since = time.monotonic()
                    assert conn.box.pending < 4 * limit and conn.close_reason is None
                    await asyncio.sleep(timeout / 2)
                    assert conn.close_reason is None, "closed before slow_consumer_timeout_s"
                    await eventually(lambda: conn.close_reason is not None, 3, "the slow consumer to be closed")
                    assert time.monotonic() - behind_since >= timeout * 0.8
                    assert conn.close_reason[0] == 1013
                    assert server.router.stats.slow_consumers == 1
                finally:
                    slow.close()

    run(main())


@pytest.mark.slow
def test_a_consumer_that_catches_up_in_time_is_kept():
    """Above max_pending_bytes for less than slow_consumer_timeout_s, then it reads: kept."""
    limit = 512 << 10

    async def main():
        async with serving(max_pending_bytes=limit, max_payload_bytes=128 << 10, slow_consumer_timeout_s=2.0) as server:
            async with Client(url(server)) as pub:
                lagging = await RawSocketClient.connect(server.port, rcvbuf=4096)
                try:
                    await lagging.send(Sub(1, "lag"))
                    assert await lagging.recv() == Ack(1)
                    (conn,) = conns_with(server, {"lag"})
                    sent = await fall_behind(pub, conn, "lag", limit)
                    await asyncio.sleep(0.3)
                    seqs = []
                    while len(seqs) < sent:  # now it reads everything
                        message = await lagging.recv()
                        seqs.extend(range(message.seq, message.seq + len(message.data)))
                    assert seqs == list(range(1, sent + 1))
                    await asyncio.sleep(2.2)
                    assert conn.close_reason is None and server.router.stats.slow_consumers == 0
                finally:
                    lagging.close()

    run(main())


@pytest.mark.slow
def test_a_burst_of_large_frames_is_not_a_slow_consumer():
    """20 connections send one legal 1 MiB frame each at the same moment; every healthy,
    reading subscriber of the topic (default settings: max_pending_bytes 8 MiB) gets all of it
    and none is closed, although 20 MiB arrive for each one within one loop iteration."""
    n_publishers, n_subscribers = 20, 10
    payload = bytes(1000)
    per_frame = (1 << 20) // 1020

    async def main():
        async with serving() as server:
            subscribers = [await Client.connect(url(server), max_queue=10**6) for _ in range(n_subscribers)]
            subs = [await c.subscribe("burst") for c in subscribers]
            publishers = [await RawSocketClient.connect(server.port) for _ in range(n_publishers)]
            try:
                frame = encode([Pub(0, "burst", payload)] * per_frame)
                assert len(frame) <= 1 << 20
                wire = client_frame(0x2, frame)
                await asyncio.gather(*(p.loop.sock_sendall(p.sock, wire) for p in publishers))
                total = n_publishers * per_frame
                for sub in subs:
                    seqs = [(await sub.next(20)).seq for _ in range(total)]
                    assert seqs == list(range(1, total + 1))
                assert server.router.stats.closes == {} and server.router.stats.slow_consumers == 0
                assert all(not c.closed for c in subscribers)
            finally:
                for p in publishers:
                    p.close()
                for c in subscribers:
                    await c.close()

    run(main(), timeout=120)


def test_one_flooding_publisher_does_not_hold_up_the_others():
    """A connection that sends many large frames at once is handled a share per loop iteration;
    a request of another connection is answered in the meantime."""
    frames = 40

    async def main():
        async with serving() as server:
            flood = await RawSocketClient.connect(server.port)
            async with Client(url(server)) as other:
                try:
                    frame = client_frame(0x2, encode([Pub(0, "flood", bytes(1000))] * 1000))
                    sending = asyncio.ensure_future(flood.loop.sock_sendall(flood.sock, frame * frames))
                    await eventually(lambda: "flood" in server.router.topics, 5, "the flood to start")
                    latencies = []
                    while server.router.topics["flood"].seq < (frames - 5) * 1000:
                        started = time.monotonic()
                        await other.publish_acked("quiet", b"x")
                        latencies.append(time.monotonic() - started)
                    await sending
                    assert len(latencies) >= 3, "the flood was handled before anyone else got a turn"
                    assert max(latencies) < 0.5, f"a request waited {max(latencies):.3f}s behind the flood"
                    await eventually(lambda: server.router.topics["flood"].seq == frames * 1000, 30, "the whole flood")
                finally:
                    flood.close()

    run(main(), timeout=120)
