"""The closing handshake of a client connection (a part of `Connection`, broker.server.connection):
a close frame from the client answered, a close from the broker (after what is queued, or
instead of it), protocol errors and frames left incomplete, and the abort of a connection whose
socket does not drain within close_timeout_s."""

from __future__ import annotations

from ..errors import CloseCode
from ..fastpath import CLOSE, ERR_PROTOCOL, encode_frame
from .states import CLOSED, CLOSING, OPEN, ConnectionState

# Close codes a client may send (RFC 6455 7.4): 1000-1003, 1007-1014, and 3000-4999.
_VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


class Closing(ConnectionState):
    """Every way a connection ends but the loss of its TCP connection (Connection.gone)."""

    __slots__ = ()  # the slots are ConnectionState's: a connection has no __dict__

    def protocol_error(self, code: int) -> None:
        if code == ERR_PROTOCOL:
            self.close(CloseCode.PROTOCOL_ERROR, "broken WebSocket framing")
        else:
            self.close(CloseCode.MESSAGE_TOO_BIG, f"frame larger than {self.server.config.max_frame_bytes} bytes")

    def close_received(self, payload: bytes) -> None:
        """A close frame from the client (the server answers it and closes the connection)."""
        self.unhandled = None
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
        session = self.session
        assert session is not None  # an open connection has its session
        box = session.box
        shedding = session.shedding
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
        if self.timer is None and self.state != CLOSED:
            self.timer = self.server.loop.call_later(self.server.config.close_timeout_s, self.abort)

    def abort(self) -> None:
        self.timer = None
        if self.state != CLOSED and self.transport is not None:
            self.transport.abort()

    def frame_expired(self, timeout: float) -> None:
        """The incomplete frame waited frame_timeout_s: drop its bytes and close (1008)."""
        self.unhandled = None
        self.needed = 0
        self.partial_since = 0.0
        self.close(CloseCode.POLICY_VIOLATION, f"frame not completed within {timeout:g} s")
