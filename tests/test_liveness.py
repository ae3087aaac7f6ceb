"""Liveness: a client that does not answer pings is disconnected, one that does stays; a
client that asked for heartbeats hears from the broker at least every interval, and the Python
client notices a dead path (nothing closes) within its bound and recovers."""

import asyncio
import time

import pytest

from broker.client import Client
from broker.errors import ErrorCode
from broker.messages import Ack, Err, Heartbeat
from conftest import BlackHoleProxy, RawSocketClient, eventually, raw_upgrade, run, serving, ws_raw


def test_silent_client_is_disconnected_and_a_live_one_is_kept():
    async def main():
        async with serving(ping_interval_s=0.3, ping_timeout_s=0.2) as server:
            live = await ws_raw(server)  # websockets answers pings by itself
            reader, writer = await raw_upgrade(server.port, timeout=5)
            started = time.monotonic()
            received = b""
            while True:  # read (and never answer) until the server gives up on us
                chunk = await asyncio.wait_for(reader.read(4096), 5)
                if not chunk:
                    break
                received += chunk
            elapsed = time.monotonic() - started
            writer.close()
            assert received[:1] == b"\x89"  # the server pinged before giving up
            assert 0.3 <= elapsed < 3.0
            await asyncio.sleep(0.1)
            assert len(server.connections) == 1  # the live client is still connected
            await live.ping()
            await live.close()

    run(main())


@pytest.mark.slow
def test_a_connection_that_asked_for_heartbeats_hears_a_beat_after_each_silent_interval():
    async def main():
        async with serving() as server:
            raw = await RawSocketClient.connect(server.port)
            try:
                await raw.send(["hb", 1, 500])
                reply = await raw.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (1, ErrorCode.BAD_MESSAGE)
                await raw.send(["hb", 2, 3_600_001])
                reply = await raw.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (2, ErrorCode.BAD_MESSAGE)
                await raw.send(["hb", 3, 1000])
                assert await raw.recv() == Ack(3)
                started = time.monotonic()
                beats = []
                for _ in range(2):
                    beat = await raw.recv()
                    assert isinstance(beat, Heartbeat)
                    beats.append(time.monotonic() - started)
                    assert abs(beat.time_ms / 1000 - time.time()) < 2
                # one beat per silent interval, each within the interval and one sweep
                assert 0.9 <= beats[0] <= 2.5 and 0.9 <= beats[1] - beats[0] <= 2.5, beats
                # a connection that receives other things gets no beat meanwhile
                await raw.send(["sub", 4, "hb.t"])
                assert (await raw.recv()).id == 4
                publisher = await Client.connect(f"ws://127.0.0.1:{server.port}/", heartbeat_s=None)
                try:
                    for i in range(15):
                        publisher.publish("hb.t", b"%d" % i)
                        await asyncio.sleep(0.2)
                    got = [await raw.recv() for _ in range(15)]
                    assert [m.data for m in got] == [[b"%d" % i] for i in range(15)], got
                finally:
                    await publisher.close()
                await raw.send(["hb", 5, 0])
                assert await raw.recv() == Ack(5)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(raw.recv(), 2.5)
            finally:
                raw.close()

    run(main())


@pytest.mark.slow
def test_the_client_notices_a_dead_path_by_its_heartbeat_and_recovers_every_message():
    async def main():
        async with serving() as server:
            proxy = BlackHoleProxy(server.port)
            proxied = await proxy.start()
            states: list[tuple[float, str, str]] = []
            reader = await Client.connect(
                proxied,
                heartbeat_s=1.0,
                heartbeat_timeout_s=3.0,
                reconnect_delay=(0.05, 0.2),
                on_state=lambda state, detail: states.append((time.monotonic(), state, detail)),
            )
            publisher = await Client.connect(f"ws://127.0.0.1:{server.port}/")
            got: list[int] = []
            try:
                await reader.subscribe("live.t", lambda m: got.append(int(m.data)))
                for i in range(1, 11):
                    await publisher.publish_acked("live.t", b"%d" % i)
                await eventually(lambda: len(got) == 10, 5, "the first messages")
                proxy.black_hole()
                cut = time.monotonic()
                for i in range(11, 31):  # published while the reader's path is dead
                    await publisher.publish_acked("live.t", b"%d" % i)
                    await asyncio.sleep(0.05)
                await eventually(lambda: any(state == "disconnected" for _, state, _ in states), 8, "the client to notice")
                noticed = next(t for t, state, _ in states if state == "disconnected") - cut
                detail = next(d for _, state, d in states if state == "disconnected")
                assert noticed <= 3.0 + 1.0, f"noticed after {noticed:.1f} s"
                assert "heartbeat" in detail, detail
                await eventually(lambda: got[-1:] == [30], 10, "the recovery")
                assert got == list(range(1, 31))  # each once, in order, none lost
                assert reader.reconnects == 1
            finally:
                await reader.close()
                await publisher.close()
                await proxy.close()

    run(main())
