"""One client connection: the WebSocket protocol (RFC 6455, server side) on a uvloop transport,
around a sans-I/O Session.

The broker speaks WebSocket itself rather than through a library so that an idle connection
costs little more than its transport (no per-connection read buffer, task or logger: reads go
through uvloop's shared buffer and only an incomplete frame is kept), and so that it can stop
between any two frames when a loop iteration has done its share of work.

`Connection` reads frames and hands them to its session, writes what the tick gives it, and
answers pings; its other parts are its base classes: the opening (TLS, the upgrade request;
broker.server.opening), plain HTTP requests of the fallback transport
(broker.server.plainhttp) and the closing handshake (broker.server.closing). Its states are
broker.server.states.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from ..errors import CloseCode
from ..fastpath import BINARY, CLOSE, PING, PONG, TEXT, encode_frame, frame_needs, read_frame
from ..router import TICK_BUDGET_S, TICK_INPUT_BYTES
from ..session import Session
from . import logs
from .closing import Closing
from .opening import Opening
from .plainhttp import PlainRequests
from .states import BODY, CLOSED, CLOSING, HANDSHAKE, OPEN, REFUSED, STREAMING, TLS_WRITE_HIGH_WATER  # noqa: F401 (the states, for the server and the tests)

if TYPE_CHECKING:
    pass

_EMPTY = b""

# What a control frame costs of an iteration's input budget beyond its payload (its header and
# handling): a flood of empty pings is paid for like data.
CONTROL_FRAME_COST = 64


class Connection(Opening, PlainRequests, Closing, asyncio.Protocol):
    """The listener of one TCP connection. Its public surface, for the server: `id`, `peer`,
    `session`, `box`, `state`, `close_reason`, `write(data)` and `buffer_size()` (the transport's
    own, bound once), `bound_writes()`, `close()`,
    `closing()`, `abort()`, `resume()`, `hold()`, `release()`, `ping()`, `frame_expired()`, the
    liveness fields `last_seen` and `ping_sent`, `partial_since`, and `in_tls_handshake`; for
    the admin API, `client`, `opened_at`, `bytes_in` and `bytes_out`; for the fallback
    transport, `owe()`. Its fields are declared, and set, by broker.server.states.ConnectionState."""

    __slots__ = ()  # the slots are ConnectionState's: a connection has no __dict__

    # asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """At TCP accept: counted (in all, from its address, in the handshake phase) or refused
        at once; with TLS, its TLS handshake starts here, within those counts."""
        transport = cast(asyncio.Transport, transport)  # a stream server's transport
        self.use_transport(transport)
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self.last_seen = server.loop.time()
        error = server.accept(self)
        if error is not None:
            self.refuse_at_accept(error)
            return
        if server.tls is not None:
            self.start_tls(transport, server.tls)
        else:
            self.timer = server.loop.call_later(server.config.handshake_timeout_s, self.handshake_expired)

    def use_transport(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # the transport's own methods, called once per connection per tick
        self.write = transport.write
        self.buffer_size = transport.get_write_buffer_size

    def data_received(self, data: bytes) -> None:
        server = self.server
        self.last_seen = server.loop.time()
        state = self.state
        if state == OPEN or state == CLOSING:
            server.bytes_in += len(data)
            self.bytes_in += len(data)
            buffer = self.unhandled
            if buffer is not None:
                buffer += data
                if len(buffer) < self.needed or self.queued:
                    return
                self.unhandled = None
                self.consume(buffer, 0, False)
            elif self.queued:
                self.unhandled = bytearray(data)
            else:
                self.consume(data, 0, False)
        elif state == HANDSHAKE:
            self.handshake_data(data)
        elif state == BODY:
            self.body_data(data)
        elif state == REFUSED:
            self.transport.close()  # its request was read: the answer is not lost to a reset

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone()

    def gone(self) -> None:
        """The TCP connection is gone (or its TLS handshake failed): release what it held.
        Called again for a connection gone in its handshake phase, it changes nothing."""
        previous = self.state
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.wake is not None and self.post is None:  # a POST's frame is still applied after its sit-out
            self.wake.cancel()
            self.wake = None
        self.unhandled = None
        self.body = None
        self.partial_since = 0.0
        server = self.server
        if self.stream is not None:
            self.stream.detach(self)
        if previous == REFUSED:
            server.refusing -= 1
            return
        server.connection_gone(self)  # counted from its accept
        if previous == HANDSHAKE or self.session is None:
            return
        self.session.close()
        server.connections.pop(self.id, None)
        code, reason = self.close_reason or (1006, "connection lost")
        logs.event(
            logging.INFO,
            "disconnect",
            conn=self.id,
            peer=self.peer,
            code=code,
            reason=reason,
            received=self.session.received,
            errors=self.session.errors,
        )
        server.on_disconnected(self)

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause_writing()
        elif self.box is not None:
            self.box.paused = True

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume_writing()
            return
        session = self.session
        if session is None:
            return
        box = session.box
        box.paused = False
        box.transport_bytes = self.transport.get_write_buffer_size()
        shedding = session.shedding
        router = self.server.router
        if (box.size or self.pong is not None or (shedding is not None and shedding.held) or box in router.replaying) and not box.closed:
            router.schedule_write(box)

    # frames

    def consume(self, data: bytes | bytearray, pos: int, progress: bool) -> None:
        """Handle the complete frames in data[pos:] and keep what is left. Once the server's
        loop iteration has done its share, stop and wait in the server's queue; with
        `progress` (the head of that queue) handle at least one frame first."""
        session = self.session
        assert session is not None  # frames are read once the upgrade made the session
        server = self.server
        router = server.router
        max_frame = server.config.max_frame_bytes
        n = len(data)
        while pos < n:
            if (router.busy or self.debt) and not progress:
                self._keep(data, pos)
                server.queue(self)
                return
            result = read_frame(data, pos, max_frame)
            if result is None:
                # an incomplete frame: the client has frame_timeout_s to send the rest (the
                # same frame, still incomplete at the start of the buffer, keeps its time)
                started = self.partial_since if pos == 0 else 0.0
                self._keep(data, pos)
                self.partial_since = started or server.loop.time()
                return
            if type(result) is int:
                self.protocol_error(result)
                return
            progress = False
            opcode, fin, payload, pos = result
            if opcode == BINARY and fin:
                if self.state != OPEN:
                    continue  # closing: apply nothing more
                before = router.spent()
                router.input_bytes += len(payload)
                try:
                    done = session.receive(payload)
                except Exception:
                    logs.log.exception("internal error handling a frame", extra={"fields": {"conn": self.id}})
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
                    return
                self.owe(router.spent() - before)  # its bytes, its decoding and the index work it caused
                if not done:
                    self._keep(data, pos)
                    self._wait(session)
                    return
            elif opcode == PING:
                router.input_bytes += len(payload) + CONTROL_FRAME_COST  # pings use the iteration's budget too
                if self.state == OPEN:
                    self.pong = payload
                    router.schedule_write(session.box)
            elif opcode == PONG:
                self.ping_sent = 0.0
            elif opcode == CLOSE:
                self.close_received(payload)
                return
            elif self.state == OPEN:
                if opcode == TEXT and fin:
                    self.close(CloseCode.UNSUPPORTED_DATA, "text frames are not accepted; send binary MessagePack frames")
                else:
                    self.close(CloseCode.UNSUPPORTED_DATA, "fragmented messages are not accepted; send each message in one frame")
        self._keep(data, n)

    def _keep(self, data, pos: int) -> None:
        """Hold data[pos:] until more arrives or the server resumes this connection (the
        caller says when it is an incomplete frame the client has to finish)."""
        self.partial_since = 0.0
        if pos >= len(data):
            self.unhandled = None
            self.needed = 0
            return
        self.unhandled = bytearray(memoryview(data)[pos:])
        self.needed = frame_needs(self.unhandled, 0)

    def resume(self) -> None:
        """Called by the server in a later loop iteration: carry on with what was left (at
        least one message or frame, whatever the budget)."""
        self.queued = False
        if self.state == CLOSED and self.post is None:
            return  # (a fallback POST's frame is applied to its stream even when the POST's client left)
        if self.debt:
            # a frame that cost more than an iteration's share: sit out, unread, the time that
            # much work is worth, then take a turn in the queue again
            delay = self.debt / TICK_INPUT_BYTES * TICK_BUDGET_S
            self.debt = 0
            self.queued = True
            self.wake = self.server.loop.call_later(delay, self._sat_out)
            return
        if self.post is not None:
            self.server.fallback.apply(self, progress=True)
            if self.post is None:
                self._read_again()
            return
        session = self.session
        assert session is not None  # only a connection that read frames waits in the queue
        progress = True
        if session.suspended:
            router = self.server.router
            before = router.spent()
            done = session.resume()
            self.owe(router.spent() - before)
            if not done:
                self._wait(session)
                return
            progress = False
        buffer = self.unhandled
        if buffer is not None:
            self.unhandled = None
            self.consume(buffer, 0, progress)
        self._read_again()

    def bound_writes(self, shedding: bool) -> None:
        """While some subscription of this connection drops or conflates, its transport pauses
        writing as soon as it holds a byte the socket did not take (and resumes once it holds
        none): the rest of its queue waits in the broker, where the policy can shed it, and the
        server hands it at most half of max_pending_bytes at a time. Otherwise the usual marks."""
        if self.state != OPEN and self.state != STREAMING:
            return
        if shedding:
            self.transport.set_write_buffer_limits(high=0, low=0)
        elif self.server.tls is not None:
            self.transport.set_write_buffer_limits(TLS_WRITE_HIGH_WATER)
        else:
            self.transport.set_write_buffer_limits()

    def owe(self, used: int) -> None:
        """Work of this connection's (`used`, in budget bytes) in one go: what passed one
        iteration's budget is owed, and sat out before its next turn."""
        if used > TICK_INPUT_BYTES:
            self.debt += used - TICK_INPUT_BYTES

    def _sat_out(self) -> None:
        self.wake = None
        if self.state != CLOSED or self.post is not None:
            self.server.queue(self)

    def take_pong(self) -> bytes:
        """The pong owed to the client as a frame (b"" when none is owed), to write before
        this tick's data."""
        payload = self.pong
        if payload is None:
            return _EMPTY
        self.pong = None
        return encode_frame(payload, PONG)

    def hold(self) -> None:
        """Stop reading (the broker holds too many queued bytes) until `release()`."""
        self.held = True
        self._stop_reading()

    def _wait(self, session: Session) -> None:
        """The session stopped inside a frame: go on in a following iteration, or, when a
        subscription waits for the backplane, once the router says (`unpark`). Not read
        meanwhile."""
        if session.parked:
            self.suspend_reading()
        else:
            self.server.queue(self)

    def unpark(self) -> None:
        """What a waiting subscription needed came (or will not): go on in order."""
        if self.state != CLOSED:
            self.server.queue(self)

    def release(self) -> None:
        self.held = False
        if self.partial_since:  # its client could not send the rest while it was not read
            self.partial_since = self.server.loop.time()
        self._read_again()

    def suspend_reading(self) -> None:
        """Stop reading from the socket until `resume()` (the server's queue calls this)."""
        self.queued = True
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def _read_again(self) -> None:
        """Read from the socket again unless the server's queue or the memory bound holds it."""
        if not self.queued and not self.reading and not self.held and self.state in (OPEN, HANDSHAKE):
            self.reading = True
            self.transport.resume_reading()

    def audit(self, event: str, **fields: object) -> None:
        """An audit log line about this client's request (a permission denial): the
        connection, user and address, then `fields` (never a token, payload or topic);
        bounded per connection and per kind by the server's audit log (broker.audit.AuditLog)."""
        self.server.guard.audit.record(
            self.id,
            event,
            {"conn": self.id, "peer": self.peer, "user": self.user},
            conn=self.id,
            peer=self.peer,
            user=self.user,
            **fields,
        )

    def ping(self, now: float) -> None:
        """Send a ping (empty payload) and remember when."""
        self.ping_sent = now
        self.transport.write(encode_frame(_EMPTY, PING))
