"""The tick: what the server does once per loop iteration in which something was published,
replied or resumed (a part of `Server`, broker.server.app).

`Router.flush` encodes each dirty topic's batch once and queues it on its receivers' outboxes;
the tick then writes every touched connection with a single transport write (shedding first
for connections whose policies drop or conflate), measures each backlog for the memory bound
and the slow-consumer rule (broker.pressure, also applied by the sweep, broker.server.sweep),
continues replays waiting for room and resumes, in order, the connections that waited for a
later iteration. One timer at the earliest request deadline expires waiting requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import CloseCode
from ..pressure import HOLD, RELEASE, Pressure
from ..router import Router
from . import logs
from .connection import OPEN, Connection

if TYPE_CHECKING:
    from .fallback import OpenConnection


class Ticker:
    """The per-iteration flush of `Server` (its base class): `queue()` is public, for the
    connections; `tick()`, `request_tick()`, `recount()`, `shed()` and `slow_consumer()` for
    the other parts of `Server` (the sweep, shutdown); the rest runs from `call_soon`."""

    # what it uses of Server (annotations only: Server.__init__ sets them)
    loop: asyncio.AbstractEventLoop
    config: Config
    router: Router
    pressure: Pressure
    connections: dict[int, OpenConnection]
    ticks: int
    writes: int
    bytes_out: int
    _tick_scheduled: bool
    _waiting: deque[Connection]
    _request_timer: asyncio.TimerHandle | None
    _request_timer_at: float

    # per-tick flush

    def request_tick(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self.loop.call_soon(self.tick)

    def queue(self, conn: Connection) -> None:
        """`conn` has more to handle than this tick's budget allows: stop reading it and resume
        it, in order, in a following tick."""
        conn.suspend_reading()
        self._waiting.append(conn)
        self.request_tick()

    def tick(self) -> None:
        self._tick_scheduled = False
        self.ticks += 1
        router = self.router
        touched, slow = router.flush()
        for box in slow:
            self.slow_consumer(box)
        if touched:
            now = self.loop.time()
            pressure = self.pressure
            lagging = pressure.lagging
            account = pressure.account
            shared: dict = {}
            sizes: dict = {}
            max_frame = self.config.max_outbound_frame_bytes
            for box in touched:
                box.scheduled = False
                if box.closed:
                    continue
                conn = box.owner
                shedding = conn.session.shedding
                if box.paused:
                    if box.keep():  # this tick's share of its node waits with the rest
                        self.slow_consumer(box)
                        continue
                else:
                    try:
                        if shedding is not None:
                            self._write_within(box, conn, shedding, max_frame, shared, sizes, now)
                        else:
                            data = box.take(max_frame, shared)
                            if conn.pong is not None:  # a pong owed leaves with the tick's one write
                                data = conn.take_pong() + data
                            if data:
                                conn.write(data)
                                conn.last_sent = now
                                conn.bytes_out += len(data)
                                self.writes += 1
                                self.bytes_out += len(data)
                                box.transport_bytes = conn.buffer_size()
                    except Exception:  # never leave the other connections of this tick unwritten
                        logs.log.exception("write failed", extra={"fields": {"conn": conn.id}})
                        conn.abort()
                        continue
                backlog = box.pending
                if shedding is not None:
                    if backlog > box.limit and box.size:
                        backlog = self.shed(box, shedding)
                    if backlog or shedding.held or box in lagging:
                        account(box, backlog + shedding.held_bytes)
                elif backlog or box in lagging:
                    account(box, backlog)
                if (backlog > box.limit or box.over_since) and pressure.judge(box, backlog, now):
                    self.slow_consumer(box)
            if pressure.over():
                self._publishers(pressure.memory(now))
        if router.replaying:  # replays waiting for room go on as their connections drain
            router.continue_replays()
        router.end_tick()
        router.new_tick()
        self._arm_request_timer()
        waiting = self._waiting
        for _ in range(len(waiting)):
            waiting.popleft().resume()
            if router.busy:
                break
        if waiting:
            self.request_tick()

    def _publishers(self, action: int) -> None:
        """Do what the memory bound decided: stop reading from every connection that
        publishes (HOLD) or read from them again (RELEASE)."""
        if action == HOLD:
            logs.event(logging.WARNING, "holding publishers", pending_bytes=self.pressure.total, limit=self.pressure.max_total)
            for conn in self.connections.values():
                if conn.session is not None and conn.session.published:
                    conn.hold()
        elif action == RELEASE:
            logs.event(logging.INFO, "releasing publishers", pending_bytes=self.pressure.total)
            for conn in self.connections.values():
                if conn.held:
                    conn.release()

    def recount(self) -> None:
        """Read every lagging connection's backlog again (transports drain between writes),
        then apply the memory bound."""
        pressure = self.pressure
        for box in list(pressure.lagging):
            conn = box.owner
            if box.closed or conn.state != OPEN:
                pressure.account(box, 0)
                continue
            box.transport_bytes = conn.buffer_size()
            shedding = conn.session.shedding
            pressure.account(box, box.pending + (shedding.held_bytes if shedding is not None else 0))
        now = self.loop.time()
        if pressure.over():
            self._publishers(pressure.memory(now))
        overdue = pressure.overdue(now)
        if overdue:
            for box in overdue:
                self.slow_consumer(box)
            self._publishers(pressure.memory(now))
        if pressure.holding:  # publishers that started since are held too
            for conn in self.connections.values():
                if not conn.held and conn.session is not None and conn.session.published:
                    conn.hold()

    def _arm_request_timer(self) -> None:
        """Have a timer at the earliest deadline of a waiting request (one timer in all)."""
        deadline = self.router.requests.next_deadline
        timer = self._request_timer
        if deadline is None or (timer is not None and self._request_timer_at <= deadline):
            return
        if timer is not None:
            timer.cancel()
        self._request_timer_at = deadline
        self._request_timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._expire_requests)

    def _expire_requests(self) -> None:
        self._request_timer = None
        self.router.requests.expire_requests()
        self._arm_request_timer()

    def _write_within(self, box, conn, shedding, max_frame: int, shared: dict, sizes: dict, now: float) -> None:
        """Write a connection whose policies shed at most half of max_pending_bytes at a time,
        again while its socket takes everything at once (its transport pauses as soon as it
        holds anything, see Connection.bound_writes): what the socket does not take waits in
        the broker, where shedding reaches it. Only such a connection with more than that
        waiting in one iteration is written more than once in it."""
        budget = box.limit // 2
        data = shedding.take(box, budget, max_frame, shared, sizes)
        if conn.pong is not None:
            data = conn.take_pong() + data
        while data:
            conn.write(data)
            conn.last_sent = now
            conn.bytes_out += len(data)
            self.writes += 1
            self.bytes_out += len(data)
            if box.paused or not (box.size or shedding.held):
                break
            data = shedding.take(box, budget, max_frame, shared, sizes)
        box.transport_bytes = conn.buffer_size()

    def shed(self, box, shedding) -> int:
        """Drop or conflate what the connection's policies allow of its queue in the broker,
        down to half of max_pending_bytes (less when its transport holds more than the other
        half); returns its backlog after that (what conflation holds, one message per topic,
        is not part of it)."""
        box.keep()
        shedding.shed(box, max(0, min(box.limit // 2, box.limit - box.transport_bytes)))
        return box.pending

    def slow_consumer(self, box) -> None:
        """Close the connection of `box`, judged a slow consumer (broker.pressure)."""
        self.pressure.forget(box)
        conn = box.owner
        if conn.state != OPEN:
            return
        self.router.stats.slow_consumers += 1
        pending = box.pending
        logs.event(logging.WARNING, "slow_consumer", conn=conn.id, pending=pending, limit=box.limit)
        conn.close(CloseCode.SLOW_CONSUMER, f"slow consumer: {pending} bytes pending, limit {box.limit}")
