"""The sweep: what the server checks a few times a second, O(connections) (a part of `Server`,
broker.server.app): pings and heartbeats for liveness, frames left incomplete, tokens revoked
or expired, connections that stayed behind (broker.pressure, the same rule the tick applies),
idle topics, history past its age, the fallback streams, and the dead letters to write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..auth import Authenticator
from ..backplane import Backplane
from ..config import Config
from ..errors import CloseCode
from ..fastpath import Outbox
from ..limits import Guard
from ..messages import Heartbeat, encode
from ..policy import Shed
from ..pressure import Pressure
from ..router import Router
from . import logs
from .connection import OPEN
from .fallback import Fallback, OpenConnection
from .metrics import LoopLag


class Sweeper:
    """The periodic checks of `Server` (its base class); `revoke()` is the admin API's,
    `sweep()` and `check_tokens()` the server's."""

    # what it uses of Server (annotations only: Server.__init__ sets them, its other parts
    # define the methods)
    loop: asyncio.AbstractEventLoop
    config: Config
    auth: Authenticator
    backplane: Backplane
    router: Router
    guard: Guard
    fallback: Fallback
    pressure: Pressure
    connections: dict[int, OpenConnection]
    loop_lag: LoopLag
    _sweep_due: float
    _sweep_period: float
    _sweeper: asyncio.TimerHandle | None
    recount: Callable[[], None]
    shed: Callable[[Outbox, Shed], int]
    slow_consumer: Callable[[Outbox], None]
    write_dead_letters: Callable[[], None]

    # authentication

    def revoke(self, line: str) -> tuple[int, str | None]:
        """Put a revocation rule in force at once (broker.revocation; the admin API): every
        open connection whose token it revokes is closed with 4003 now. Returns how many were
        closed and the denylist file it was appended to (None: held in memory). Raises
        OSError when the file cannot be written (the rule is in force all the same)."""
        try:
            saved = self.auth.revoke(line)
        finally:
            closed = self.check_tokens()
        logs.event(logging.WARNING, "tokens_revoked", rule=line, closed=closed, saved=saved or "memory")
        return closed, saved

    def check_tokens(self, force: bool = False) -> int:
        """Read the JWKS and denylist files again if they changed; close the connections whose
        token was revoked or expired (within a sweep period of the moment). Returns how many
        were closed as revoked."""
        auth = self.auth
        if not auth.enabled:
            return 0
        try:
            auth.refresh(force)
        except Exception as exc:  # a broken file keeps what was read before
            logs.event(logging.ERROR, "auth_files_unreadable", reason=str(exc))
        now = time.time()
        revoked = 0
        for conn in list(self.connections.values()):
            session = conn.session
            if conn.state != OPEN or session is None:
                continue
            identity = session.identity
            if auth.revoked(identity):
                logs.event(logging.WARNING, "token_revoked", conn=conn.id, user=identity.user, peer=conn.peer)
                conn.close(CloseCode.TOKEN_REVOKED, "token revoked")
                revoked += 1
            elif identity.expires is not None and now >= identity.expires:
                logs.event(logging.INFO, "token_expired", conn=conn.id, user=identity.user, peer=conn.peer)
                conn.close(CloseCode.TOKEN_EXPIRED, "token expired")
        return revoked

    # liveness

    def sweep(self) -> None:
        """Ping idle clients, disconnect those that do not answer, close connections that
        stayed behind or left a frame incomplete for frame_timeout_s, and forget history past
        its age. Runs a few times a second;
        O(connections) plus the history that expired."""
        now = self.loop.time()
        self.loop_lag.observe(now - self._sweep_due, now)
        self.backplane.sweep()
        self.check_tokens()
        self.router.retire_idle(int(self.config.topic_idle_s * 1000))
        if self.router.replaying:
            self.router.continue_replays()
        self.guard.sweep()
        self.fallback.sweep(self.loop.time())
        self.recount()
        self.write_dead_letters()
        now = self.loop.time()
        cfg = self.config
        interval, timeout = cfg.ping_interval_s, cfg.ping_timeout_s
        frame_timeout = cfg.frame_timeout_s
        wall_ms = int(time.time() * 1000)
        for conn in list(self.connections.values()):
            session = conn.session
            if conn.state != OPEN or session is None:  # (an open connection has its session)
                continue
            heartbeat = session.heartbeat_ms
            if heartbeat and (now - conn.last_sent) * 1000 >= heartbeat and not session.box.scheduled:
                self.router.send(session.box, encode(Heartbeat(wall_ms)))
                conn.last_sent = now  # written at the end of this iteration
            if conn.held:
                continue  # a held connection is not read: its pongs wait with the rest
            if conn.partial_since and now - conn.partial_since >= frame_timeout:
                conn.frame_expired(frame_timeout)  # a frame started and not finished (slowloris)
                continue
            if conn.ping_sent:
                if conn.last_seen > conn.ping_sent:
                    conn.ping_sent = 0.0
                elif now - conn.ping_sent >= timeout:
                    conn.close(CloseCode.GOING_AWAY, f"peer has not replied to ping/heartbeat request within {timeout:g} second(s)")
            elif now - conn.last_seen >= interval:
                conn.ping(now)
        pressure = self.pressure
        for box in list(pressure.behind):
            conn = box.owner
            if box.closed or conn.state != OPEN:
                pressure.behind.discard(box)
                continue
            box.transport_bytes = conn.buffer_size()
            backlog = box.pending
            shedding = conn.session.shedding
            if backlog > box.limit and box.size and shedding is not None:
                backlog = self.shed(box, shedding)
            if pressure.judge(box, backlog, now):
                self.slow_consumer(box)
        self._sweep_due = self.loop.time() + self._sweep_period
        self._sweeper = self.loop.call_later(self._sweep_period, self.sweep)
