"""The opening of a client connection (a part of `Connection`, broker.server.connection): its
TLS handshake, run step by step; the upgrade request, read within MAX_HEAD_BYTES and
handshake_timeout_s and checked by the server's rules (or handed to the fallback transport);
the answers of a refusal, at accept or after the request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from ..messages import SUBPROTOCOL
from ..session import Session
from . import fallback, handshake, logs
from .states import CLOSED, HANDSHAKE, OPEN, REFUSED, TLS_WRITE_HIGH_WATER, ConnectionState

if TYPE_CHECKING:
    import asyncio
    import ssl

    from .connection import Connection


# How long a connection refused at accept waits for its client's request before it is closed,
# and how many may wait at once (more are closed at once: the answer may then be lost to a reset).
REFUSAL_LINGER_S = 1.0
MAX_LINGERING = 64


class Opening(ConnectionState):
    """From TCP accept to an open WebSocket connection (or a refusal)."""

    __slots__ = ()  # the slots are ConnectionState's: a connection has no __dict__

    # what it calls of Connection's other parts (annotations only)
    use_transport: Callable[[asyncio.Transport], None]
    consume: Callable[[bytes | bytearray, int, bool], None]
    gone: Callable[[], None]
    abort: Callable[[], None]

    @property
    def in_tls_handshake(self) -> bool:
        return self.tls_steps is not None

    def start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Hand the connection to TLS (its handshake within handshake_timeout_s), then give
        the upgrade request its handshake_timeout_s. uvloop reads a new connection as soon as
        connection_made returns, so the client's first bytes (its ClientHello) reach whatever
        protocol the transport has then: start_tls's first step, which gives the transport its
        TLS protocol, runs here at once (a Task would take it one loop iteration later, after
        those bytes came to this protocol), and the rest when the handshake's outcome is known."""
        cfg = self.server.config
        self.tls_steps = self.server.loop.start_tls(
            raw,
            cast("Connection", self),
            context,
            server_side=True,
            ssl_handshake_timeout=cfg.handshake_timeout_s,
            ssl_shutdown_timeout=cfg.close_timeout_s,
        )
        self._tls_step(self.tls_steps)

    def _tls_step(self, steps: Coroutine[Any, Any, asyncio.Transport | None]) -> None:
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
        self.tls_steps = None
        if transport is None or transport.is_closing() or self.state != HANDSHAKE:
            self.gone()
            return
        self.use_transport(transport)
        transport.set_write_buffer_limits(TLS_WRITE_HIGH_WATER)
        self.timer = self.server.loop.call_later(self.server.config.handshake_timeout_s, self.handshake_expired)

    # handshake

    def handshake_data(self, data: bytes) -> None:
        buffer = self.unhandled
        if buffer is None:
            buffer = self.unhandled = bytearray()
        searched = max(0, len(buffer) - 3)
        buffer += data
        end = buffer.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(buffer) > handshake.MAX_HEAD_BYTES:
                self.refuse(handshake.HandshakeError(431, f"the request head is longer than {handshake.MAX_HEAD_BYTES} bytes"))
            return
        if end > handshake.MAX_HEAD_BYTES:
            self.refuse(handshake.HandshakeError(431, f"the request head is longer than {handshake.MAX_HEAD_BYTES} bytes"))
            return
        rest = bytes(buffer[end + 4 :])
        self.unhandled = None
        try:
            # the order of docs/protocol.md 1.1: the limits on connections were applied at
            # accept; now the request's rules (path ... token), then the limit per user
            request = handshake.parse_request(bytes(buffer[:end]))
            if fallback.is_fallback(request):  # plain HTTP: the fallback transport
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                self.server.fallback.handle(cast("Connection", self), request, rest)
                return
            accepted = self.server.check_request(request)
            self.server.guard.admit_user(self, accepted.identity.user)
        except handshake.HandshakeError as error:
            self.refuse(error)
            return
        except Exception:  # a bug in a rule: refuse this request, keep the server going
            logs.log.exception("internal error checking an upgrade request", extra={"fields": {"peer": self.peer}})
            self.refuse(handshake.HandshakeError(500, "internal error"))
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
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
        server.opened_connection(cast("Connection", self))
        server.opened += 1
        logs.event(logging.INFO, "connect", conn=self.id, peer=self.peer, user=identity.user, client=self.client)
        if rest:
            self.consume(rest, 0, False)

    def refuse(self, error: handshake.HandshakeError) -> None:
        self.state = CLOSED
        self.unhandled = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.refused(error, self.peer)
        self.transport.write(handshake.error_response(error.status, error.text, error.headers))
        self.transport.close()

    def refuse_at_accept(self, error: handshake.HandshakeError) -> None:
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
            self.timer = server.loop.call_later(REFUSAL_LINGER_S, self.abort)

    def handshake_expired(self) -> None:
        self.timer = None
        if self.state == HANDSHAKE:
            self.state = CLOSED
            self.transport.abort()
