"""Plain HTTP requests on a client connection (a part of `Connection`, broker.server.connection):
what the fallback transport (broker.server.fallback) asks of the connection carrying its
requests: answers and refusals, keep-alive, reading a POST body within frame_timeout_s, and
carrying an event stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import handshake
from .states import BODY, CLOSED, CLOSING, HANDSHAKE, STREAMING, ConnectionState

if TYPE_CHECKING:
    from .fallback import Stream


class PlainRequests(ConnectionState):
    """The fallback transport's requests on this connection."""

    __slots__ = ()  # the slots are ConnectionState's: a connection has no __dict__

    # what it calls of Connection's other parts (annotations only)
    refuse: Callable[[handshake.HandshakeError], None]
    handshake_data: Callable[[bytes], None]
    handshake_expired: Callable[[], None]
    abort: Callable[[], None]

    def refuse_request(self, error: handshake.HandshakeError, extra: list[str]) -> None:
        """Answer a fallback request with an error (and `extra` header lines) and close."""
        if self.state == CLOSED:
            return
        headers = dict(error.headers)
        for line in extra:
            name, _, value = line.partition(": ")
            headers[name] = value
        self.post = None
        self.refuse(handshake.HandshakeError(error.status, error.text, headers))

    def next_request(self, rest: bytes) -> None:
        """The request was answered: the connection waits for the next one (HTTP keep-alive),
        for at most handshake_timeout_s, still counted as a connection in its handshake."""
        if self.state == CLOSED:
            return
        self.state = HANDSHAKE
        self.unhandled = None
        self.timer = self.server.loop.call_later(self.server.config.handshake_timeout_s, self.handshake_expired)
        if rest:
            self.handshake_data(rest)

    def read_body(self, length: int, rest: bytes, then: Callable[[bytes], object]) -> None:
        """Read a request body of `length` bytes (the first of them in `rest`) within
        frame_timeout_s, then call `then(body)`; what follows it is the next request."""
        self.on_body = then
        self.body_needed = length
        self.body = bytearray()
        self.state = BODY
        self.timer = self.server.loop.call_later(self.server.config.frame_timeout_s, self._body_expired)
        self.body_data(rest)

    def body_data(self, data: bytes) -> None:
        body = self.body
        if body is None:  # the body is being applied: what follows waits until it is answered
            self.unhandled = (self.unhandled or bytearray()) + data
            return
        body += data
        self.server.bytes_in += len(data)
        if len(body) < self.body_needed:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        n = self.body_needed
        self.unhandled = bytearray(body[n:]) if len(body) > n else None  # a pipelined next request
        self.body = None
        on_body = self.on_body
        assert on_body is not None  # read_body set it with the body
        on_body(bytes(body[:n]))

    def _body_expired(self) -> None:
        self.timer = None
        if self.state == BODY:
            self.refuse_request(
                handshake.HandshakeError(408, f"the request body did not arrive within {self.server.config.frame_timeout_s:g} s"), []
            )

    def answer_post(self, extra: list[str]) -> None:
        """A fallback POST was applied: 204, then the next request."""
        if self.state == CLOSED:
            return
        self.transport.write(("\r\n".join(["HTTP/1.1 204 No Content", *extra]) + "\r\n\r\n").encode("latin-1"))
        rest = bytes(self.unhandled) if self.unhandled else b""
        self.next_request(rest)

    def carry(self, stream: Stream) -> None:
        """Carry `stream`'s events from now on (a fallback GET was accepted)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = STREAMING
        self.stream = stream
        self.unhandled = None

    def end_stream(self) -> None:
        """The stream's last event was written: close once it is sent (aborted after
        close_timeout_s when the client does not read it)."""
        self.stream = None
        if self.state == CLOSED:
            return
        self.state = CLOSING
        self.transport.close()
        if self.timer is None:
            self.timer = self.server.loop.call_later(self.server.config.close_timeout_s, self.abort)
