"""Idle detection: a client that does not answer pings is disconnected; one that does stays."""

import asyncio
import base64
import os
import time

from broker.messages import SUBPROTOCOL

from conftest import run, serving, ws_raw


async def raw_handshake(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


def test_silent_client_is_disconnected_and_a_live_one_is_kept():
    async def main():
        async with serving(ping_interval_s=0.3, ping_timeout_s=0.2) as server:
            live = await ws_raw(server)  # websockets answers pings by itself
            reader, writer = await raw_handshake(server.port)
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
