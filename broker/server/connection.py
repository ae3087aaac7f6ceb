"""The picows listener of one client connection: the I/O shell around a Session."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from ..errors import CloseCode
from ..session import Session
from . import logs

if TYPE_CHECKING:
    from .app import Server

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_PING = WSMsgType.PING


class Connection(WSListener):
    def __init__(self, server: Server, conn_id: int) -> None:
        super().__init__()
        self.server = server
        self.id = conn_id
        self.peer = ""
        self.session = Session(server.router, server.limits, owner=self)
        self.box = self.session.box
        self.transport: WSTransport | None = None
        self.write = None
        self.buffer_size = None
        self.close_reason: tuple[int, str] | None = None  # set when the broker closes
        self._abort_scheduled = False

    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        raw = transport.underlying_transport
        peer = raw.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self.write = raw.write
        self.buffer_size = raw.get_write_buffer_size
        self.server.connections[self.id] = self
        logs.event(logging.INFO, "connect", conn=self.id, peer=self.peer)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if transport.is_close_frame_sent and kind is not _CLOSE:
            # Closing (picows may have refused this very frame as oversized): apply nothing more.
            self._closing()
            return
        if kind is _BINARY and frame.fin:
            try:
                self.session.receive(frame.get_payload_as_memoryview())
            except Exception:
                logs.log.exception("internal error handling a frame", extra={"fields": {"conn": self.id}})
                self.close(CloseCode.INTERNAL_ERROR, "internal error")
        elif kind is _CLOSE:
            if not transport.is_close_frame_sent:
                # The client started the close: answer it. Otherwise this is the echo of ours.
                code = frame.get_close_code()
                self.close_reason = (int(code), "client closed")
                transport.send_close(code if int(code) in (1000, 1001) else WSCloseCode.OK)
            self._closing()
            transport.disconnect()
        elif kind is _PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif kind is _TEXT:
            self.close(CloseCode.UNSUPPORTED_DATA, "text frames are not accepted; send binary MessagePack frames")
        elif kind is not WSMsgType.PONG:
            self.close(CloseCode.UNSUPPORTED_DATA, "fragmented messages are not accepted; send each message in one frame")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.session.close()
        self.server.connections.pop(self.id, None)
        code, reason = self._disconnect_reason(transport)
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
        self.server.on_disconnected(self)

    def pause_writing(self) -> None:
        self.box.paused = True

    def resume_writing(self) -> None:
        self.box.paused = False
        self.box.transport_bytes = self.buffer_size()
        if self.box.size:
            self.server.router.schedule_write(self.box)

    # broker-initiated close

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Send a close frame with `code`. With `flush`, what is still queued for this connection
        goes first (even while the transport is paused); without, it is dropped.

        The transport gets close_timeout_s to flush its buffer, then the connection is aborted."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if self.close_reason is not None or transport.is_close_frame_sent:
            self._closing()  # a close is already under way: make sure it ends
            return
        self.close_reason = (int(code), reason)
        self.server.router.stats.count_close(int(code))
        if flush and self.box.size:
            self.write(self.box.take())
        transport.send_close(WSCloseCode(int(code)), reason.encode()[:123])
        self._closing()
        transport.disconnect(graceful=True)

    def _closing(self) -> None:
        """Stop deliveries to this connection and abort it unless it is gone within
        close_timeout_s (a peer that stops reading never completes a graceful close)."""
        self.session.close()
        if not self._abort_scheduled:
            self._abort_scheduled = True
            self.server.loop.call_later(self.server.config.close_timeout_s, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(graceful=False)

    def _disconnect_reason(self, transport: WSTransport) -> tuple[int, str]:
        if self.close_reason is not None:
            return self.close_reason
        handshake = transport.close_handshake
        if handshake is not None and handshake.sent is not None:
            # picows closed it itself: an oversized frame (1009) or broken framing (1002).
            self.server.router.stats.count_close(int(handshake.sent.code))
            return int(handshake.sent.code), handshake.sent.reason or ""
        if handshake is not None and handshake.recv is not None:
            return int(handshake.recv.code), handshake.recv.reason or "client closed"
        return 1006, "connection lost"
