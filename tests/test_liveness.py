"""Idle detection: a client that does not answer pings is disconnected; one that does stays."""

import asyncio
import time

from conftest import raw_upgrade, run, serving, ws_raw


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
