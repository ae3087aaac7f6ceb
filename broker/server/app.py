"""The broker server: picows on uvloop around the sans-I/O router.

Per loop tick: publishes accumulate in the router; the first one schedules `_tick` with
`call_soon`; `_tick` encodes each topic's batch once, queues it on every subscriber's outbox
and writes every touched connection with a single transport write.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from picows import WSAutoPingStrategy, WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from .. import __version__
from ..config import Config
from ..errors import CloseCode
from ..fastpath import IMPLEMENTATION
from ..messages import SUBPROTOCOL
from ..router import Router
from ..session import Limits
from . import logs
from .connection import Connection


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.router = Router(
            self._request_flush,
            max_topics=config.max_topics,
            max_topic_length=config.max_topic_length,
        )
        self.limits = Limits(
            max_payload_bytes=config.max_payload_bytes,
            max_subscriptions=config.max_subscriptions,
            max_pending_bytes=config.max_pending_bytes,
            max_batch_messages=config.max_batch_messages,
        )
        self.connections: dict[int, Connection] = {}
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._next_id = 0
        self._closing = False
        self._all_gone: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_period = 1.0
        self.handshakes_refused = 0

    # lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        self._server = await ws_create_server(
            self._accept,
            cfg.host,
            cfg.port,
            websocket_handshake_timeout=cfg.handshake_timeout_s,
            enable_auto_ping=True,
            auto_ping_idle_timeout=cfg.ping_interval_s,
            auto_ping_reply_timeout=cfg.ping_timeout_s,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            max_frame_size=cfg.max_frame_bytes,
            disconnect_on_exception=True,
            use_aiofastnet=False,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep_period = min(1.0, cfg.close_timeout_s / 2)
        self._sweeper = self.loop.call_later(self._sweep_period, self._sweep)
        logs.event(
            logging.INFO,
            "start",
            host=cfg.host,
            port=self.port,
            path=cfg.path,
            version=__version__,
            fastpath=IMPLEMENTATION,
            subprotocol=SUBPROTOCOL,
        )

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, flush what is queued, close every client with 1001
        and wait for them (at most shutdown_timeout_s), then abort the rest."""
        if self._closing or self._server is None:
            return
        self._closing = True
        self._sweeper.cancel()
        logs.event(logging.INFO, "stopping", connections=len(self.connections))
        if self._server is not None:
            self._server.close()
        self._tick()
        self._all_gone = asyncio.Event()
        for conn in list(self.connections.values()):
            conn.close(CloseCode.GOING_AWAY, "server shutting down", flush=True)
        if self.connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), self.config.shutdown_timeout_s)
            except asyncio.TimeoutError:
                logs.event(logging.WARNING, "shutdown_timeout", aborted=len(self.connections))
                for conn in list(self.connections.values()):
                    conn._abort()
                await asyncio.sleep(0)  # let the aborted connections report their disconnect
        if self._server is not None:
            await self._server.wait_closed()
        stats = self.router.stats
        logs.event(
            logging.INFO,
            "stopped",
            published=stats.published,
            delivered=stats.delivered,
            slow_consumers=stats.slow_consumers,
            errors=sum(stats.errors.values()),
        )

    def on_disconnected(self, conn: Connection) -> None:
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    # handshake

    def _accept(self, request: WSUpgradeRequest):
        raw_path = request.path.decode("latin-1")
        if raw_path.partition("?")[0] != self.config.path:
            return self._refuse(404, f"no WebSocket endpoint at {raw_path}; connect to {self.config.path}")
        if self._closing:
            return self._refuse(503, "server is shutting down")
        version = request.headers.get("Sec-WebSocket-Version")
        if version is not None and version.strip() != "13":
            return self._refuse(426, f"unsupported WebSocket version {version}; use 13", {"Sec-WebSocket-Version": "13"})
        # Browsers may send "Connection: keep-alive, Upgrade"; picows expects the single token.
        connection = request.headers.get("Connection", "")
        if "upgrade" in (token.strip().lower() for token in connection.split(",")):
            request.headers["Connection"] = "Upgrade"
        offered = [p.strip() for h in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in h.split(",")]
        if SUBPROTOCOL not in offered:
            why = f"offered {', '.join(offered)}" if offered else "no Sec-WebSocket-Protocol header"
            return self._refuse(400, f"unsupported protocol version ({why}); this server speaks {SUBPROTOCOL}")
        self._next_id += 1
        conn = Connection(self, self._next_id)
        response = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL})
        return WSUpgradeResponseWithListener(response, conn)

    def _refuse(self, status: int, text: str, headers: dict[str, str] | None = None):
        self.handshakes_refused += 1
        logs.event(logging.INFO, "handshake_refused", status=status, reason=text)
        response = WSUpgradeResponse.create_error_response(
            status, (text + "\n").encode(), extra_headers={"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        )
        return WSUpgradeResponseWithListener(response, None)

    def _sweep(self) -> None:
        """Find connections picows closed by itself (an oversized frame gets 1009 without telling
        the listener) and give them the same treatment as ours: no more deliveries, abort after
        close_timeout_s. Runs a few times a second; O(connections)."""
        for conn in list(self.connections.values()):
            transport = conn.transport
            if transport is not None and transport.is_close_frame_sent and not conn._abort_scheduled:
                conn._closing()
        self._sweeper = self.loop.call_later(self._sweep_period, self._sweep)

    # per-tick flush

    def _request_flush(self) -> None:
        self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        touched, slow = self.router.flush()
        for box in slow:
            conn = box.owner
            logs.event(logging.WARNING, "slow_consumer", conn=conn.id, pending=box.pending, limit=box.limit)
            conn.close(CloseCode.SLOW_CONSUMER, f"slow consumer: {box.pending} bytes pending, limit {box.limit}")
        for box in touched:
            box.scheduled = False
            if box.paused:
                # A paused connection that picows already closed (1009) will not drain: stop it.
                if box.owner.transport.is_close_frame_sent:
                    box.owner._closing()
                continue
            if box.closed or not box.size:
                continue
            conn = box.owner
            try:
                conn.write(box.take())
                box.transport_bytes = conn.buffer_size()
            except Exception:  # never leave the other connections of this tick unwritten
                logs.log.exception("write failed", extra={"fields": {"conn": conn.id}})
                conn._abort()


async def run(config: Config) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
