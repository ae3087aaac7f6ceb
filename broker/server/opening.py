"""The opening of a client connection (a part of `Connection`, broker.server.connection): its
TLS handshake, run step by step; the upgrade request, read within MAX_HEAD_BYTES and
handshake_timeout_s and checked by the server's rules (or handed to the fallback transport);
the answers of a refusal, at accept or after the request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..messages import SUBPROTOCOL
from ..session import Session
from . import fallback, handshake, logs
from .states import CLOSED, HANDSHAKE, OPEN, REFUSED, TLS_WRITE_HIGH_WATER

if TYPE_CHECKING:
    import asyncio

    from .connection import Connection

# How long a connection refused at accept waits for its client's request before it is closed,
# and how many may wait at once (more are closed at once: the answer may then be lost to a reset).
REFUSAL_LINGER_S = 1.0
MAX_LINGERING = 64


class Opening:
    """From TCP accept to an open WebSocket connection (or a refusal)."""

    __slots__ = ()  # the slots are Connection's: a connection has no __dict__

    def _start_tls(self: Connection, raw: asyncio.Transport) -> None:
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

    def _tls_step(self: Connection, steps) -> None:
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


    # handshake

    def _handshake_data(self: Connection, data: bytes) -> None:
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

    def _refuse(self: Connection, error: handshake.HandshakeError) -> None:
        self.state = CLOSED
        self._buffer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.refused(error, self.peer)
        self.transport.write(handshake.error_response(error.status, error.text, error.headers))
        self.transport.close()

    def _refuse_at_accept(self: Connection, error: handshake.HandshakeError) -> None:
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

    def _handshake_expired(self: Connection) -> None:
        self._timer = None
        if self.state == HANDSHAKE:
            self.state = CLOSED
            self.transport.abort()

