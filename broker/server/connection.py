"""One client connection: the WebSocket protocol (RFC 6455, server side) on a uvloop transport,
around a sans-I/O Session.

The broker speaks WebSocket itself rather than through a library so that an idle connection
costs little more than its transport (no per-connection read buffer, task or logger: reads go
through uvloop's shared buffer and only an incomplete frame is kept), and so that it can stop
between any two frames when a loop iteration has done its share of work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import CloseCode
from ..fastpath import BINARY, CLOSE, ERR_PROTOCOL, PING, PONG, TEXT, encode_frame, frame_needs, read_frame
from ..messages import SUBPROTOCOL
from ..router import TICK_BUDGET_S, TICK_INPUT_BYTES
from ..session import Session
from . import fallback, handshake, logs

if TYPE_CHECKING:
    from .app import Server

# REFUSED: refused at accept, its answer written; closed once the client's first bytes are
# read (closing with unread bytes would reset the connection, and the answer with it) or after
# REFUSAL_LINGER_S.
# BODY: reading the body of a fallback POST; STREAMING: carrying a fallback event stream
# (broker.server.fallback), whose session is not the connection's.
HANDSHAKE, OPEN, CLOSING, CLOSED, REFUSED, BODY, STREAMING = range(7)

# How long a connection refused at accept waits for its client's request before it is closed,
# and how many may wait at once (more are closed at once: the answer may then be lost to a reset).
REFUSAL_LINGER_S = 1.0
MAX_LINGERING = 64

# Close codes a client may send (RFC 6455 7.4): 1000-1003, 1007-1014, and 3000-4999.
_VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))

_EMPTY = b""

# What a control frame costs of an iteration's input budget beyond its payload (its header and
# handling): a flood of empty pings is paid for like data.
CONTROL_FRAME_COST = 64

# Where a TLS transport pauses the writer: where a plain uvloop transport does (64 KiB, and
# resumes at a quarter of it). uvloop's TLS transport would first hold up to 512 KiB of the
# connection's own ciphertext, and what it has passed on to the TCP transport below it is not
# in get_write_buffer_size: with the plain bound, the bytes the broker does not count stay
# about as few as on a plain connection, and a lagging connection's queue stays in the broker,
# as pieces shared with the other subscribers, rather than as private ciphertext.
TLS_WRITE_HIGH_WATER = 64 << 10


class Connection(asyncio.Protocol):
    """The listener of one TCP connection. Its public surface, for the server: `id`, `peer`,
    `session`, `box`, `state`, `close_reason`, `write(data)` and `buffer_size()` (the transport's
    own, bound once), `bound_writes()`, `close()`,
    `closing()`, `abort()`, `resume()`, `hold()`, `release()`, `ping()`, `frame_expired()`, the
    liveness fields `last_seen` and `ping_sent`, `partial_since`, and `in_tls_handshake`; for
    the admin API, `client`, `opened_at`, `bytes_in` and `bytes_out`."""

    __slots__ = (
        "server", "id", "peer", "session", "box", "transport", "state", "close_reason", "last_seen",
        "ping_sent", "write", "buffer_size", "held", "user", "partial_since", "debt", "pong", "last_sent", "_buffer", "_needed", "_timer",
        "client", "opened_at", "bytes_in", "bytes_out",
        "_reading", "_queued", "_tls", "_wake", "stream", "post", "_body", "_body_needed", "_on_body",
    )

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.peer = ""
        self.session: Session | None = None
        self.box = None
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.close_reason: tuple[int, str] | None = None  # set when either side starts the close
        self.last_seen = 0.0  # loop time of the last data from the client
        self.last_sent = 0.0  # loop time of the last write to the client (for its heartbeats)
        self.ping_sent = 0.0  # loop time of an unanswered ping (0: none)
        self._buffer: bytearray | None = None  # bytes received and not yet handled
        self._needed = 0  # bytes the frame at the start of _buffer needs in all
        self._timer: asyncio.TimerHandle | None = None  # handshake timeout, then close timeout
        self._reading = True
        self._queued = False  # waiting in the server's queue of connections to resume
        self._tls = None  # start_tls, run step by step, while the TLS handshake is in progress
        self._wake: asyncio.TimerHandle | None = None  # the end of a sit-out (see debt)
        self.held = False  # not read while the broker's queued bytes are past their global bound
        self.user: str | None = None  # who the token names (None: authentication is off, or anonymous)
        self.client: str | None = None  # the NAME/VERSION the client says it is (None: it says nothing)
        self.opened_at = 0.0  # loop time its upgrade was accepted
        # bytes read from it after the handshake and written to it by the ticks (one addition
        # per read or write, as the server's totals)
        self.bytes_in = 0
        self.bytes_out = 0
        # loop time since when an incomplete frame waits at the start of _buffer for the client
        # to send the rest (0: none, or the broker is not reading); the server's sweep closes
        # the connection once it waited frame_timeout_s
        self.partial_since = 0.0
        # iteration budget (bytes, router.TICK_INPUT_BYTES an iteration) this connection's
        # frames used beyond one iteration's share: at its next turn it sits out, unread,
        # router.TICK_BUDGET_S per iteration's budget owed
        self.debt = 0
        # the payload of the latest ping not answered yet (None: none). Its pong leaves with the
        # connection's next write of a tick, never on its own, and while the transport is paused
        # a newer ping replaces it (RFC 6455 5.5.3): a client that sends pings and never reads
        # is owed one pong, not a pong per ping.
        self.pong: bytes | None = None
        self.stream = None  # the fallback stream this connection carries (STREAMING)
        self.post = None  # a fallback POST being applied: (stream, body or None once handed over, CORS lines)
        self._body: bytearray | None = None  # a POST body being read (BODY), and how long it is
        self._body_needed = 0
        self._on_body = None

    # asyncio protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        """At TCP accept: counted (in all, from its address, in the handshake phase) or refused
        at once; with TLS, its TLS handshake starts here, within those counts."""
        self._use(transport)
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self.last_seen = server.loop.time()
        error = server.accept(self)
        if error is not None:
            self._refuse_at_accept(error)
            return
        if server.tls is not None:
            self._start_tls(transport)
        else:
            self._timer = server.loop.call_later(server.config.handshake_timeout_s, self._handshake_expired)

    def _use(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # the transport's own methods, called once per connection per tick
        self.write = transport.write
        self.buffer_size = transport.get_write_buffer_size

    def _start_tls(self, raw: asyncio.Transport) -> None:
        """Hand the connection to TLS (its handshake within handshake_timeout_s), then give
        the upgrade request its handshake_timeout_s. uvloop reads a new connection as soon as
        connection_made returns, so the client's first bytes (its ClientHello) reach whatever
        protocol the transport has then: start_tls's first step, which gives the transport its
        TLS protocol, runs here at once (a Task would take it one loop iteration later, after
        those bytes came to this protocol), and the rest when the handshake's outcome is known."""
        cfg = self.server.config
        self._tls = self.server.loop.start_tls(
            raw, self, self.server.tls, server_side=True,
            ssl_handshake_timeout=cfg.handshake_timeout_s, ssl_shutdown_timeout=cfg.close_timeout_s,
        )
        self._tls_step(self._tls)

    def _tls_step(self, steps) -> None:
        """Run start_tls on to its next wait (a future: this runs again once it is done), or to
        its end: the TLS transport, or a failed or timed-out handshake (its transport closed)."""
        try:
            waiting = steps.send(None)
        except StopIteration as done:
            transport = done.value
        except Exception:
            transport = None
        else:
            waiting.add_done_callback(lambda _: self._tls_step(steps))
            return
        self._tls = None
        if transport is None or transport.is_closing() or self.state != HANDSHAKE:
            self._gone()
            return
        self._use(transport)
        transport.set_write_buffer_limits(TLS_WRITE_HIGH_WATER)
        self._timer = self.server.loop.call_later(self.server.config.handshake_timeout_s, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        server = self.server
        self.last_seen = server.loop.time()
        state = self.state
        if state == OPEN or state == CLOSING:
            server.bytes_in += len(data)
            self.bytes_in += len(data)
            buffer = self._buffer
            if buffer is not None:
                buffer += data
                if len(buffer) < self._needed or self._queued:
                    return
                self._buffer = None
                data = buffer
            elif self._queued:
                self._buffer = bytearray(data)
                return
            self._consume(data, 0, False)
        elif state == HANDSHAKE:
            self._handshake_data(data)
        elif state == BODY:
            self._body_data(data)
        elif state == REFUSED:
            self.transport.close()  # its request was read: the answer is not lost to a reset

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        """The TCP connection is gone (or its TLS handshake failed): release what it held.
        Called again for a connection gone in its handshake phase, it changes nothing."""
        previous = self.state
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._wake is not None and self.post is None:  # a POST's frame is still applied after its sit-out
            self._wake.cancel()
            self._wake = None
        self._buffer = None
        self._body = None
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
        box = self.box
        if box is None:
            return
        box.paused = False
        box.transport_bytes = self.transport.get_write_buffer_size()
        shedding = self.session.shedding
        router = self.server.router
        if (box.size or self.pong is not None or (shedding is not None and shedding.held) or box in router.replaying) and not box.closed:
            router.schedule_write(box)

    # handshake

    def _handshake_data(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = bytearray()
        searched = max(0, len(buffer) - 3)
        buffer += data
        end = buffer.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(buffer) > handshake.MAX_HEAD_BYTES:
                self._refuse(handshake.HandshakeError(431, f"the request head is longer than {handshake.MAX_HEAD_BYTES} bytes"))
            return
        if end > handshake.MAX_HEAD_BYTES:
            self._refuse(handshake.HandshakeError(431, f"the request head is longer than {handshake.MAX_HEAD_BYTES} bytes"))
            return
        rest = bytes(buffer[end + 4 :])
        self._buffer = None
        try:
            # the order of docs/protocol.md 1.1: the limits on connections were applied at
            # accept; now the request's rules (path ... token), then the limit per user
            request = handshake.parse_request(bytes(buffer[:end]))
            if fallback.is_fallback(request):  # plain HTTP: the fallback transport
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self.server.fallback.handle(self, request, rest)
                return
            accepted = self.server.check_request(request)
            self.server.guard.admit_user(self, accepted.identity.user)
        except handshake.HandshakeError as error:
            self._refuse(error)
            return
        except Exception:  # a bug in a rule: refuse this request, keep the server going
            logs.log.exception("internal error checking an upgrade request", extra={"fields": {"peer": self.peer}})
            self._refuse(handshake.HandshakeError(500, "internal error"))
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server = self.server
        identity = accepted.identity
        self.user = identity.user
        self.client = accepted.client
        self.session = Session(
            server.router, server.limits, owner=self, identity=identity, authenticator=server.auth, limiter=server.guard.limiter(self)
        )
        self.box = self.session.box
        self.state = OPEN
        self.transport.write(handshake.accept_response(accepted.accept, SUBPROTOCOL))
        self.last_sent = self.opened_at = server.loop.time()
        server.opened_connection(self)
        server.opened += 1
        logs.event(logging.INFO, "connect", conn=self.id, peer=self.peer, user=identity.user, client=self.client)
        if rest:
            self._consume(rest, 0, False)

    def _refuse(self, error: handshake.HandshakeError) -> None:
        self.state = CLOSED
        self._buffer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.refused(error, self.peer)
        self.transport.write(handshake.error_response(error.status, error.text, error.headers))
        self.transport.close()

    # plain HTTP requests (the fallback transport, broker.server.fallback)

    def refuse_request(self, error: handshake.HandshakeError, extra: list[str]) -> None:
        """Answer a fallback request with an error (and `extra` header lines) and close."""
        if self.state == CLOSED:
            return
        headers = dict(error.headers)
        for line in extra:
            name, _, value = line.partition(": ")
            headers[name] = value
        self.post = None
        self._refuse(handshake.HandshakeError(error.status, error.text, headers))

    def next_request(self, rest: bytes) -> None:
        """The request was answered: the connection waits for the next one (HTTP keep-alive),
        for at most handshake_timeout_s, still counted as a connection in its handshake."""
        if self.state == CLOSED:
            return
        self.state = HANDSHAKE
        self._buffer = None
        self._timer = self.server.loop.call_later(self.server.config.handshake_timeout_s, self._handshake_expired)
        if rest:
            self._handshake_data(rest)

    def read_body(self, length: int, rest: bytes, then) -> None:
        """Read a request body of `length` bytes (the first of them in `rest`) within
        frame_timeout_s, then call `then(body)`; what follows it is the next request."""
        self._on_body = then
        self._body_needed = length
        self._body = bytearray()
        self.state = BODY
        self._timer = self.server.loop.call_later(self.server.config.frame_timeout_s, self._body_expired)
        self._body_data(rest)

    def _body_data(self, data: bytes) -> None:
        body = self._body
        if body is None:  # the body is being applied: what follows waits until it is answered
            self._buffer = (self._buffer or bytearray()) + data
            return
        body += data
        self.server.bytes_in += len(data)
        if len(body) < self._body_needed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        n = self._body_needed
        self._buffer = bytearray(body[n:]) if len(body) > n else None  # a pipelined next request
        self._body = None
        self._on_body(bytes(body[:n]))

    def _body_expired(self) -> None:
        self._timer = None
        if self.state == BODY:
            self.refuse_request(handshake.HandshakeError(408, f"the request body did not arrive within {self.server.config.frame_timeout_s:g} s"), [])

    def answer_post(self, extra: list[str]) -> None:
        """A fallback POST was applied: 204, then the next request."""
        if self.state == CLOSED:
            return
        self.transport.write(("\r\n".join(["HTTP/1.1 204 No Content", *extra]) + "\r\n\r\n").encode("latin-1"))
        rest = bytes(self._buffer) if self._buffer else b""
        self.next_request(rest)

    def carry(self, stream) -> None:
        """Carry `stream`'s events from now on (a fallback GET was accepted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = STREAMING
        self.stream = stream
        self._buffer = None

    def end_stream(self) -> None:
        """The stream's last event was written: close once it is sent (aborted after
        close_timeout_s when the client does not read it)."""
        self.stream = None
        if self.state == CLOSED:
            return
        self.state = CLOSING
        self.transport.close()
        if self._timer is None:
            self._timer = self.server.loop.call_later(self.server.config.close_timeout_s, self.abort)

    def owe(self, used: int) -> None:
        """Work done for this connection's request (`used`, in budget bytes): see `_owe`."""
        self._owe(used)

    def _refuse_at_accept(self, error: handshake.HandshakeError) -> None:
        """Refused by a limit at accept: answer (on a plain port; on a TLS port the client
        expects TLS, so it is closed without an answer) and close once its request is read."""
        server = self.server
        self.state = REFUSED
        server.refusing += 1
        if server.tls is not None:
            self.transport.abort()
            return
        self.transport.write(handshake.error_response(error.status, error.text, error.headers))
        if server.refusing > MAX_LINGERING:
            self.transport.close()
        else:
            self._timer = server.loop.call_later(REFUSAL_LINGER_S, self.abort)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state == HANDSHAKE:
            self.state = CLOSED
            self.transport.abort()

    # frames

    def _consume(self, data, pos: int, progress: bool) -> None:
        """Handle the complete frames in data[pos:] and keep what is left. Once the server's
        loop iteration has done its share, stop and wait in the server's queue; with
        `progress` (the head of that queue) handle at least one frame first."""
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
                self._protocol_error(result)
                return
            progress = False
            opcode, fin, payload, pos = result
            if opcode == BINARY and fin:
                if self.state != OPEN:
                    continue  # closing: apply nothing more
                before = router.spent()
                router.input_bytes += len(payload)
                try:
                    done = self.session.receive(payload)
                except Exception:
                    logs.log.exception("internal error handling a frame", extra={"fields": {"conn": self.id}})
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
                    return
                self._owe(router.spent() - before)  # its bytes, its decoding and the index work it caused
                if not done:
                    self._keep(data, pos)
                    self._wait()
                    return
            elif opcode == PING:
                router.input_bytes += len(payload) + CONTROL_FRAME_COST  # pings use the iteration's budget too
                if self.state == OPEN:
                    self.pong = payload
                    router.schedule_write(self.box)
            elif opcode == PONG:
                self.ping_sent = 0.0
            elif opcode == CLOSE:
                self._close_received(payload)
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
            self._buffer = None
            self._needed = 0
            return
        self._buffer = bytearray(memoryview(data)[pos:])
        self._needed = frame_needs(self._buffer, 0)

    def resume(self) -> None:
        """Called by the server in a later loop iteration: carry on with what was left (at
        least one message or frame, whatever the budget)."""
        self._queued = False
        if self.state == CLOSED and self.post is None:
            return  # (a fallback POST's frame is applied to its stream even when the POST's client left)
        if self.debt:
            # a frame that cost more than an iteration's share: sit out, unread, the time that
            # much work is worth, then take a turn in the queue again
            delay = self.debt / TICK_INPUT_BYTES * TICK_BUDGET_S
            self.debt = 0
            self._queued = True
            self._wake = self.server.loop.call_later(delay, self._sat_out)
            return
        if self.post is not None:
            self.server.fallback.apply(self, progress=True)
            if self.post is None:
                self._read_again()
            return
        session = self.session
        progress = True
        if session.suspended:
            router = self.server.router
            before = router.spent()
            done = session.resume()
            self._owe(router.spent() - before)
            if not done:
                self._wait()
                return
            progress = False
        buffer = self._buffer
        if buffer is not None:
            self._buffer = None
            self._consume(buffer, 0, progress)
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

    def _owe(self, used: int) -> None:
        """Work of this connection's (`used`, in budget bytes) in one go: what passed one
        iteration's budget is owed, and sat out before its next turn."""
        if used > TICK_INPUT_BYTES:
            self.debt += used - TICK_INPUT_BYTES

    def _sat_out(self) -> None:
        self._wake = None
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

    def _wait(self) -> None:
        """The session stopped inside a frame: go on in a following iteration, or, when a
        subscription waits for the backplane, once the router says (`unpark`). Not read
        meanwhile."""
        if self.session.parked:
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
        self._queued = True
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.transport.pause_reading()

    def _read_again(self) -> None:
        """Read from the socket again unless the server's queue or the memory bound holds it."""
        if not self._queued and not self._reading and not self.held and self.state in (OPEN, HANDSHAKE):
            self._reading = True
            self.transport.resume_reading()

    def _protocol_error(self, code: int) -> None:
        if code == ERR_PROTOCOL:
            self.close(CloseCode.PROTOCOL_ERROR, "broken WebSocket framing")
        else:
            self.close(CloseCode.MESSAGE_TOO_BIG, f"frame larger than {self.server.config.max_frame_bytes} bytes")

    def _close_received(self, payload: bytes) -> None:
        """A close frame from the client (the server answers it and closes the connection)."""
        self._buffer = None
        self.partial_since = 0.0
        if self.state == CLOSING:
            return
        code = 1005
        reason = ""
        reply = 1000
        if len(payload) == 1:
            code, reply = 1002, 1002
        elif len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                reply = 1007
            if code not in _VALID_CLOSE_CODES:
                reply = 1002
            elif reply == 1000 and code in (1000, 1001):
                reply = code
        self.close_reason = (code, reason or "client closed")
        self.state = CLOSING
        self.transport.write(encode_frame(reply.to_bytes(2, "big"), CLOSE))
        self.transport.close()  # once what is buffered is sent, or aborted by closing()
        self.closing()

    # broker-initiated close

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Send a close frame with `code` and close the TCP connection once it is sent (the
        client's answering close frame is not waited for). With `flush`, what is still queued
        for this connection goes first (even while the transport is paused); without, it is
        dropped. A connection whose socket does not drain within close_timeout_s is aborted."""
        if self.state == CLOSED:
            return
        if self.state != OPEN:
            self.closing()
            return
        self.state = CLOSING
        self.close_reason = (int(code), reason)
        self.server.router.stats.count_close(int(code))
        box = self.box
        shedding = self.session.shedding
        if flush and shedding is not None and shedding.held:
            shedding.release(box)  # the newest messages its policy conflate holds go too
        if flush and box.size:
            self.transport.write(box.take(self.server.config.max_outbound_frame_bytes))
        self.transport.write(encode_frame(int(code).to_bytes(2, "big") + reason.encode()[:123], CLOSE))
        self.transport.close()  # once what is buffered is sent; nothing more is read
        self.closing()

    def closing(self) -> None:
        """Stop deliveries to this connection and abort it unless it is gone within
        close_timeout_s (a peer that stops reading never lets the close frame out)."""
        if self.session is not None:
            self.session.close()
        if self._timer is None and self.state != CLOSED:
            self._timer = self.server.loop.call_later(self.server.config.close_timeout_s, self.abort)

    @property
    def in_tls_handshake(self) -> bool:
        return self._tls is not None

    def abort(self) -> None:
        self._timer = None
        if self.state != CLOSED and self.transport is not None:
            self.transport.abort()

    def audit(self, event: str, **fields: object) -> None:
        """An audit log line about this client's request (a permission denial): the
        connection, user and address, then `fields` (never a token, payload or topic);
        bounded per connection and per kind by the server's audit log (broker.audit.AuditLog)."""
        self.server.guard.audit.record(
            self.id, event, {"conn": self.id, "peer": self.peer, "user": self.user},
            conn=self.id, peer=self.peer, user=self.user, **fields,
        )

    def frame_expired(self, timeout: float) -> None:
        """The incomplete frame waited frame_timeout_s: drop its bytes and close (1008)."""
        self._buffer = None
        self._needed = 0
        self.partial_since = 0.0
        self.close(CloseCode.POLICY_VIOLATION, f"frame not completed within {timeout:g} s")

    def ping(self, now: float) -> None:
        """Send a ping (empty payload) and remember when."""
        self.ping_sent = now
        self.transport.write(encode_frame(_EMPTY, PING))
