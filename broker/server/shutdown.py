"""Shutdown and lame-duck mode (a part of `Server`, broker.server.app): a graceful stop (stop
accepting, flush what is queued, close every client and wait for them, then abort the rest),
a second signal that cuts the wait short, undoing a start that failed half way, and lame-duck
mode (SIGUSR2), which tells the connections to move elsewhere a share at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import CloseCode
from ..router import Router
from . import logs
from .connection import OPEN, Connection

if TYPE_CHECKING:
    from ..cluster.presence import Presence
    from ..cluster.streams import RedisBackplane
    from .admin import Admin
    from .fallback import OpenConnection

# Lame-duck mode tells its share of the connections to move this often.
LAME_DUCK_STEP_S = 0.05


class Shutdown:
    """The end of `Server`'s life (its base class): `stop()`, `force_stop()`,
    `enter_lame_duck()`, and `queued_bytes()`, what a forced stop loses; `undo_start()` for
    the server's start."""

    # what it uses of Server (annotations only: Server.__init__ sets them, its other parts
    # define the methods)
    loop: asyncio.AbstractEventLoop
    config: Config
    router: Router
    cluster: RedisBackplane | None
    admin: Admin | None
    presence: Presence | None
    connections: dict[int, OpenConnection]
    handshaking: dict[int, Connection]
    lame_duck_since: float | None
    _server: asyncio.Server | None
    _closing: bool
    _forced: asyncio.Event | None
    _all_gone: asyncio.Event | None
    _sweeper: asyncio.TimerHandle | None
    _request_timer: asyncio.TimerHandle | None
    _moving: list[OpenConnection]
    _moved: int
    _lame_done: Callable[[], object] | None
    _lame_timer: asyncio.TimerHandle | None
    tick: Callable[[], None]
    write_dead_letters: Callable[[], None]

    async def undo_start(self) -> None:
        """Close what a start that failed half way opened, the listener first (no client is let
        in to a broker that will not run); stop() then has nothing to do."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for conn in list(self.connections.values()):
                conn.abort()
            await server.wait_closed()
        if self.admin is not None:
            await self.admin.stop()
        if self.cluster is not None:
            await self.cluster.stop()

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, flush what is queued, close every client with 1001
        and wait for them (at most shutdown_timeout_s), then abort the rest. Does nothing
        unless start() completed (a failed start closed what it opened)."""
        if self._closing or self._server is None or self._sweeper is None:
            return
        self._closing = True
        self._forced = asyncio.Event()
        if self._lame_timer is not None:  # stopped during lame-duck mode: the rest close with the others
            self._lame_timer.cancel()
            self._lame_timer = None
        self._sweeper.cancel()
        self.write_dead_letters()
        if self._request_timer is not None:
            self._request_timer.cancel()
        logs.event(logging.INFO, "stopping", connections=len(self.connections))
        self._server.close()
        if self.presence is not None:  # out of the cluster's view at once
            await self.presence.stop()
        for opening in list(self.handshaking.values()):
            if opening.in_tls_handshake:  # it could not be told 503 (shutting down) before its TLS is up
                opening.abort()
        self.tick()
        if self.cluster is not None:
            await self.cluster.stop()  # what was published goes to Redis (its acks with it) first
            self.tick()
        self._all_gone = asyncio.Event()
        if self.config.shutdown_close_code == CloseCode.SERVICE_RESTART:
            code, reason = CloseCode.SERVICE_RESTART, "server restarting"
        else:
            code, reason = CloseCode.GOING_AWAY, "server shutting down"
        for conn in list(self.connections.values()):
            conn.close(code, reason, flush=True)
        if self.connections and not self._forced.is_set():
            gone = asyncio.ensure_future(self._all_gone.wait())
            forced = asyncio.ensure_future(self._forced.wait())
            await asyncio.wait((gone, forced), timeout=self.config.shutdown_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            forced.cancel()
            if self.connections and not self._forced.is_set():
                logs.event(logging.WARNING, "shutdown_timeout", aborted=len(self.connections), queued_bytes=self.queued_bytes())
        if self.connections:  # the shutdown timeout passed, or a second signal came
            for conn in list(self.connections.values()):
                conn.abort()
            await asyncio.sleep(0)  # let the aborted connections report their disconnect
        await self._server.wait_closed()
        if self.admin is not None:
            await self.admin.stop()
        stats = self.router.stats
        logs.event(
            logging.INFO,
            "stopped",
            published=stats.published,
            delivered=stats.delivered,
            slow_consumers=stats.slow_consumers,
            errors=sum(stats.errors.values()),
            **(
                {}
                if self.cluster is None
                else {
                    "redis_" + name: getattr(self.cluster.stats, name)
                    for name in (
                        "writes",
                        "entries_written",
                        "messages_written",
                        "entries_read",
                        "messages_read",
                        "commands",
                        "reconnects",
                        "in_doubt",
                        "failed",
                        "unknown",
                        "refused",
                        "epoch_changes",
                        "rollbacks",
                    )
                }
            ),
        )

    def force_stop(self, signum: int = 0) -> None:
        """A second SIGTERM or SIGINT during the drain: stop waiting for the clients. Logs
        `shutdown_forced` with what is lost: the connections not closed yet, which are aborted,
        and the bytes still queued for them (in the broker and in their sockets' buffers).
        The flush to Redis, if it is under way, ends first (it is bounded by redis_timeout_s).
        Before the drain started, and after it was forced, it does nothing."""
        if self._forced is None or self._forced.is_set():
            return
        fields: dict[str, object] = {"connections": len(self.connections), "queued_bytes": self.queued_bytes()}
        if signum:
            fields["signal"] = signal.Signals(signum).name
        if self._all_gone is None:
            fields["waiting_for"] = "the flush to Redis (at most redis_timeout_s), then the clients are aborted"
        logs.event(logging.WARNING, "shutdown_forced", **fields)
        self._forced.set()

    def queued_bytes(self) -> int:
        """Bytes queued for the open connections and not yet sent: in the broker and in their
        transports' buffers."""
        total = 0
        for conn in self.connections.values():
            box = conn.box
            if box is not None:
                total += box.size
            total += conn.buffer_size()  # a fallback stream's: its event stream's TCP buffer (0 while detached)
        return total

    # lame-duck mode

    def enter_lame_duck(self, done: Callable[[], object]) -> None:
        """SIGUSR2: stop accepting (the listener closes, /readyz answers 503), then after
        lame_duck_grace_s tell the connections to move to another node, a share of them at a
        time, spread evenly over lame_duck_duration_s (close code 4010, after what is queued
        for them); once every one was told, call `done` (which stops the broker). A rolling
        restart of a cluster so never sends every client of a node to the others at once."""
        if self._closing or self.lame_duck_since is not None or self._server is None:
            return
        cfg = self.config
        self.lame_duck_since = self.loop.time()
        self._lame_done = done
        self._server.close()
        self._moving = list(self.connections.values())
        random.shuffle(self._moving)
        logs.event(
            logging.WARNING,
            "lame_duck",
            connections=len(self._moving),
            grace_s=cfg.lame_duck_grace_s,
            duration_s=cfg.lame_duck_duration_s,
            close_code=int(CloseCode.RECONNECT_ELSEWHERE),
        )
        self._lame_timer = self.loop.call_later(cfg.lame_duck_grace_s, self._move_some)

    def _move_some(self) -> None:
        """Tell the share of the connections due by now to move; again LAME_DUCK_STEP_S later."""
        self._lame_timer = None
        if self._closing:
            return
        cfg = self.config
        since = self.lame_duck_since
        assert since is not None  # its timer runs only in lame-duck mode
        elapsed = self.loop.time() - since - cfg.lame_duck_grace_s
        due = len(self._moving) if elapsed >= cfg.lame_duck_duration_s else int(len(self._moving) * elapsed / cfg.lame_duck_duration_s)
        while self._moved < due:
            conn = self._moving[self._moved]
            self._moved += 1
            if conn.state == OPEN:
                conn.close(CloseCode.RECONNECT_ELSEWHERE, "lame duck: reconnect to another node", flush=True)
        if self._moved < len(self._moving):
            self._lame_timer = self.loop.call_later(LAME_DUCK_STEP_S, self._move_some)
            return
        logs.event(logging.INFO, "lame_duck_done", moved=self._moved)
        self._moving = []
        done, self._lame_done = self._lame_done, None
        if done is not None:
            done()
