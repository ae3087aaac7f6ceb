"""Closing connections: once a client has started to close, the broker sends it nothing more,
and a close that cannot complete because the client stopped reading ends in an abort after
close_timeout_s (protocol.md 1.4)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.client import Client
from broker.errors import CloseCode
from broker.messages import Ack, Sub
from conftest import MAX_FRAME, RawSocketClient, client_frame, eventually, run, server_conn_with, serving, url

CLOSE_TIMEOUT = 0.3
PENDING_LIMIT = 2 << 20


@pytest.mark.parametrize("traffic", ["busy", "idle"])
@pytest.mark.parametrize("ending", ["close-frame", "oversized-frame"])
def test_closing_connection_that_stopped_reading_gets_nothing_more_and_is_aborted(ending, traffic):
    """A subscriber whose socket is full sends a close frame (or a frame over max_frame_bytes,
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
                    assert not conn.session.subscriptions
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
