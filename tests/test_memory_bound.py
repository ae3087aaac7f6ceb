"""The global bound on queued bytes: a publisher far faster than its subscribers read is held
(the broker stops reading it) once max_total_pending_bytes are queued, RSS stays bounded, and
every message has its documented outcome."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from broker.client import Client
from broker.server.connection import OPEN
from conftest import (
    RawSocketClient,
    client_frame,
    connect_when_ready,
    eventually,
    free_ports,
    run,
    serve,
    serving,
    split_frame,
    stop_process,
)

MIB = 1 << 20
PAYLOAD = 32 * 1024
NON_READERS = 8
WINDOW = 8  # per topic: 8 topics x 8 x 32 KiB = 2 MiB in flight to the reader, under max_pending_bytes


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def ended(raw: RawSocketClient) -> bool:
    """Read everything the broker sent a connection that never read: True when the broker
    ended the connection (a close frame could not be sent to it in time: it was aborted)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(raw.sock, 1 << 20), 5)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        if not chunk:
            return True


@pytest.mark.slow
def test_a_flooding_publisher_is_held_and_memory_stays_bounded():
    (port,) = free_ports()
    bound = 16 * MIB
    proc = serve(
        "--port",
        str(port),
        "--max-pending-bytes",
        str(4 * MIB),
        "--max-total-pending-bytes",
        str(bound),
        "--slow-consumer-timeout-s",
        "1",
        "--log-level",
        "info",
    )
    try:

        async def main():
            pub = await connect_when_ready(proc, port)
            fast = await Client.connect(f"ws://127.0.0.1:{port}/", reconnect=False, max_queue=10**7)
            got: dict[str, list[int]] = {}
            await fast.subscribe("flood.>", lambda m: got.setdefault(m.topic, []).append(m.seq))
            raws = [await RawSocketClient.connect(port, rcvbuf=4096) for _ in range(NON_READERS)]
            for i, raw in enumerate(raws):  # each its own topic: queues that share nothing
                await raw.send(["sub", 1, f"flood.{i}"])
                assert (await raw.recv()).id == 1
            await asyncio.sleep(0.3)
            before = rss(proc.pid)
            peak = before
            payload = bytes(PAYLOAD)
            published = 0
            began = time.monotonic()
            while published * NON_READERS * PAYLOAD < 6 * bound and time.monotonic() - began < 60:
                for i in range(NON_READERS):
                    for _ in range(4):
                        pub.publish(f"flood.{i}", payload)
                published += 4
                await pub.drain(30)  # waits while the broker does not read the publisher
                # the reader keeps up (it shares this process's loop with the publisher): at
                # most WINDOW messages of a topic in flight to it
                while min((len(got.get(f"flood.{i}", ())) for i in range(NON_READERS)), default=0) < published - WINDOW:
                    assert time.monotonic() - began < 60, "the reader stopped receiving"
                    await asyncio.sleep(0.001)
                peak = max(peak, rss(proc.pid))
            for i in range(NON_READERS):
                last = await pub.publish_acked(f"flood.{i}", b"end")
                assert last.seq == published + 1  # every publish was taken, in order
            expected = {f"flood.{i}": list(range(1, published + 2)) for i in range(NON_READERS)}
            await eventually(lambda: sum(map(len, got.values())) == NON_READERS * (published + 1), 30, "the reader to get everything")
            assert got == expected
            # those that never read were closed as slow consumers (1013, or aborted when even
            # the close frame could not reach them within close_timeout_s)
            assert [await ended(raw) for raw in raws] == [True] * NON_READERS
            growth = peak - before
            # Without the bound the non-readers alone could hold 8 x 16 MiB (each connection's
            # hard limit, nothing shared). With it: the bound, the topics' history (8 x 1 MiB),
            # the reader's own backlog and the allocator's slack.
            assert growth < 80 * MIB, f"RSS grew by {growth / MIB:.0f} MiB"
            await pub.close()
            await fast.close()

        run(main(), timeout=90)
    finally:
        stop_process(proc)
    log = proc.stderr.read().decode()
    assert "holding publishers" in log and "releasing publishers" in log, log[-2000:]
    assert log.count("event=slow_consumer") == NON_READERS, log[-2000:]


def test_pings_from_a_client_that_never_reads_are_owed_one_pong_and_counted():
    """Every byte the broker owes a connection counts against its bounds: a client that sends
    pings and never reads gets one pong for the latest ping, not a growing buffer of pongs."""

    async def main():
        async with serving() as server:
            raw = await RawSocketClient.connect(server.port, rcvbuf=4096)
            loop = asyncio.get_running_loop()
            try:
                (conn,) = server.connections.values()
                sent = 0
                chunk = b"".join(client_frame(0x9, i.to_bytes(4, "big") + bytes(121)) for i in range(1000))
                for _ in range(64):  # 64,000 pings, 8 MiB of pongs if each were answered
                    await loop.sock_sendall(raw.sock, chunk)
                    sent += 1000
                last = (sent - 1) % 1000
                await eventually(lambda: server.bytes_in >= 64 * len(chunk), 10, "the broker to read every ping")
                await asyncio.sleep(0.2)
                buffered = conn.transport.get_write_buffer_size()
                assert buffered < 128 << 10, f"{buffered} bytes of pongs wait for a client that does not read"
                # what waits is counted in the broker's total of queued bytes
                assert server.pending_total >= conn.transport.get_write_buffer_size()
                # once the client reads, the pong of the latest ping arrives
                received = b""
                pongs = []
                deadline = loop.time() + 10
                while not pongs or pongs[-1][:4] != last.to_bytes(4, "big"):
                    assert loop.time() < deadline, "the latest ping was not answered"
                    received += await asyncio.wait_for(loop.sock_recv(raw.sock, 1 << 16), 5)
                    while (split := split_frame(received)) is not None:
                        opcode, payload, received = split
                        assert opcode == 0xA
                        pongs.append(payload)
                assert len(pongs) < 2000, f"{len(pongs)} pongs for pings that were not read"
            finally:
                raw.close()

    run(main())


def test_past_the_global_bound_the_largest_backlog_is_closed_first_and_no_more():
    """Two connections that stop reading, neither past max_pending_bytes, hold together more
    than max_total_pending_bytes: publishers are held, and once that lasted
    slow_consumer_timeout_s the larger backlog is closed (1013) and only it: the total is then
    below three quarters of the bound, so the smaller one stays open."""

    async def main():
        settings = dict(max_pending_bytes=4 * MIB, max_total_pending_bytes=4 * MIB, slow_consumer_timeout_s=0.3)
        async with serving(**settings) as server:
            small = await RawSocketClient.connect(server.port, rcvbuf=4096)
            big = await RawSocketClient.connect(server.port, rcvbuf=4096)
            for raw, topic in ((small, "total.small"), (big, "total.big")):
                await raw.send(["sub", 1, topic])
                assert (await raw.recv()).id == 1
            conns = {c.id: c for c in server.connections.values()}
            small_conn, big_conn = conns[min(conns)], conns[max(conns)]
            for conn in conns.values():
                # a small kernel send buffer: what the client does not read waits in the
                # broker, where it is counted, rather than in the kernel (autotuned to MiBs)
                conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            async with Client(f"ws://127.0.0.1:{server.port}/", reconnect=False) as pub:
                payload = bytes(PAYLOAD)
                for _ in range(56):  # 1.75 MiB for the one
                    pub.publish("total.small", payload)
                await pub.publish_acked("total.other", b"")
                for _ in range(112):  # then 3.5 MiB for the other, of which the bound lets in at least 2.25
                    pub.publish("total.big", payload)
                await eventually(lambda: server.holds >= 1, 10, "the publisher to be held")
                await eventually(lambda: big_conn.state != OPEN, 10, "the larger backlog to be closed")
                assert big_conn.close_reason[0] == 1013
                await asyncio.sleep(1.0)  # held no more: nothing else is closed
                assert small_conn.state == OPEN and not server.holding
                assert server.router.stats.slow_consumers == 1
            small.close()
            big.close()

    run(main())
