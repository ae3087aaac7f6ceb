"""Plain HTTP requests on a client connection (a part of `Connection`, broker.server.connection):
what the fallback transport (broker.server.fallback) asks of the connection carrying its
requests: answers and refusals, keep-alive, reading a POST body within frame_timeout_s, and
carrying an event stream."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import handshake
from .states import BODY, CLOSED, CLOSING, HANDSHAKE, STREAMING

if TYPE_CHECKING:
    from .connection import Connection


class PlainRequests:
    """The fallback transport's requests on this connection."""

    __slots__ = ()  # the slots are Connection's: a connection has no __dict__

    def refuse_request(self: Connection, error: handshake.HandshakeError, extra: list[str]) -> None:
        """Answer a fallback request with an error (and `extra` header lines) and close."""
        if self.state == CLOSED:
            return
        headers = dict(error.headers)
        for line in extra:
            name, _, value = line.partition(": ")
            headers[name] = value
        self.post = None
        self._refuse(handshake.HandshakeError(error.status, error.text, headers))

    def next_request(self: Connection, rest: bytes) -> None:
        """The request was answered: the connection waits for the next one (HTTP keep-alive),
        for at most handshake_timeout_s, still counted as a connection in its handshake."""
        if self.state == CLOSED:
            return
        self.state = HANDSHAKE
        self._buffer = None
        self._timer = self.server.loop.call_later(self.server.config.handshake_timeout_s, self._handshake_expired)
        if rest:
            self._handshake_data(rest)

    def read_body(self: Connection, length: int, rest: bytes, then) -> None:
        """Read a request body of `length` bytes (the first of them in `rest`) within
        frame_timeout_s, then call `then(body)`; what follows it is the next request."""
        self._on_body = then
        self._body_needed = length
        self._body = bytearray()
        self.state = BODY
        self._timer = self.server.loop.call_later(self.server.config.frame_timeout_s, self._body_expired)
        self._body_data(rest)

    def _body_data(self: Connection, data: bytes) -> None:
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

    def _body_expired(self: Connection) -> None:
        self._timer = None
        if self.state == BODY:
            self.refuse_request(handshake.HandshakeError(408, f"the request body did not arrive within {self.server.config.frame_timeout_s:g} s"), [])

    def answer_post(self: Connection, extra: list[str]) -> None:
        """A fallback POST was applied: 204, then the next request."""
        if self.state == CLOSED:
            return
        self.transport.write(("\r\n".join(["HTTP/1.1 204 No Content", *extra]) + "\r\n\r\n").encode("latin-1"))
        rest = bytes(self._buffer) if self._buffer else b""
        self.next_request(rest)

    def carry(self: Connection, stream) -> None:
        """Carry `stream`'s events from now on (a fallback GET was accepted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = STREAMING
        self.stream = stream
        self._buffer = None

    def end_stream(self: Connection) -> None:
        """The stream's last event was written: close once it is sent (aborted after
        close_timeout_s when the client does not read it)."""
        self.stream = None
        if self.state == CLOSED:
            return
        self.state = CLOSING
        self.transport.close()
        if self._timer is None:
            self._timer = self.server.loop.call_later(self.server.config.close_timeout_s, self.abort)

    def owe(self: Connection, used: int) -> None:
        """Work done for this connection's request (`used`, in budget bytes): see `_owe`."""
        self._owe(used)

