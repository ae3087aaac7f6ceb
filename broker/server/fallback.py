"""The fallback transport: protocol v1 over plain HTTP, for clients that cannot open a
WebSocket (a proxy that refuses the upgrade, an old browser). docs/protocol.md section 12.

A client opens an event stream (`GET PATH`, `Accept: text/event-stream`) naming a random
stream id of its own (`Broker-Stream`); every server frame the broker has for it arrives as one
Server-Sent Event holding the frame's MessagePack bytes in base64. Each frame the client sends
is the body of a `POST PATH` naming the same stream. A stream is one session, with the same
authentication, grants, limits, sequence numbers, gaps and recovery as a WebSocket connection:
the server's tick, sweep and slow-consumer rules see it as a connection (`Stream` has the
surface of `Connection` they use).

When the stream's TCP connection ends, the session waits `ping_timeout_s` for the client to
open the stream again with `Last-Event-ID` naming the last event it handled; if that is the
last event written, the session goes on where it stopped (what was queued meanwhile follows),
otherwise it is replaced by a new one and the client recovers with `since`.
"""

from __future__ import annotations

import binascii
import logging
import os
import re
from typing import TYPE_CHECKING, Union

from ..auth import AuthError
from ..errors import BrokerError, CloseCode
from ..messages import SUBPROTOCOL
from ..session import Session
from . import handshake, logs

if TYPE_CHECKING:
    from .app import Server
    from .connection import Connection

# The header that marks a fallback request and names its protocol version (the WebSocket's
# Sec-WebSocket-Protocol), and the one naming the stream.
PROTOCOL_HEADER = "broker-protocol"
STREAM_HEADER = "broker-stream"
# A stream id: 16 to 64 characters of base64url (the client makes 128 random bits). It is the
# stream's capability for its POSTs, like a connection's socket: never logged or echoed.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
CONTENT_TYPE = "application/msgpack"
ALLOWED_HEADERS = "Authorization, Content-Type, Broker-Protocol, Broker-Stream, Broker-Client, Last-Event-ID"
PREFLIGHT_MAX_AGE_S = 600

ATTACHED, DETACHED, ENDED = range(3)


def is_fallback(request: handshake.Request) -> bool:
    """True for a request of the fallback transport: it names the protocol in Broker-Protocol
    (or is a CORS preflight) and is no WebSocket upgrade, which keeps the order of
    docs/protocol.md 1.1 for every request that tries to be one."""
    headers = request.headers
    if "upgrade" in headers or any(name.startswith("sec-websocket-") for name in headers):
        return False
    if request.method == "OPTIONS":
        return "access-control-request-method" in headers
    return PROTOCOL_HEADER in headers


def frame_payloads(data: bytes) -> list[memoryview]:
    """The payloads of the server WebSocket frames in `data` (binary frames as the outbox
    assembles them: unmasked, FIN set), as views into it."""
    out = []
    pos = 0
    view = memoryview(data)
    n = len(data)
    while pos < n:
        length = data[pos + 1] & 0x7F
        if length == 126:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            pos += 4
        elif length == 127:
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            pos += 10
        else:
            pos += 2
        out.append(view[pos : pos + length])
        pos += length
    return out


def chunk(body: bytes) -> bytes:
    """`body` as one chunk of a chunked HTTP response."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class Refused(BrokerError):
    """A fallback request the broker refuses: the HTTP status and a one-line explanation."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.error = handshake.HandshakeError(status, text, headers)


class Stream:
    """One session of the fallback transport. To the server it is a connection (its id, peer,
    session, box, state and the methods the tick and the sweep call); its bytes go to the TCP
    connection that carries its event stream, when one does."""

    def __init__(self, fallback: Fallback, key: str, conn_id: int, identity, peer: str, limiter, client: str | None = None) -> None:
        from .connection import OPEN  # the states are Connection's

        server = fallback.server
        self.fallback = fallback
        self.server = server
        self.key = key
        self.id = conn_id
        self.peer = peer
        self.user = identity.user
        # what the admin API shows of a connection: the client it says it is, since when, bytes
        self.client = client
        self.opened_at = server.loop.time()
        self.bytes_in = 0  # POST bodies
        self.bytes_out = 0  # what the tick wrote to its event stream
        self.tag = os.urandom(4).hex().encode()  # names this session in its event ids
        self.sent = 0  # events written (their ids count them)
        self.tcp: Connection | None = None
        self.phase = DETACHED
        self.detached_at = server.loop.time()
        self.state = OPEN
        self.close_reason: tuple[int, str] | None = None
        self.held = False
        self.partial_since = 0.0
        self.pong = None
        self.ping_sent = 0.0
        self.last_seen = server.loop.time()
        self.last_sent = server.loop.time()
        self.posting: Connection | None = None  # the POST whose frame is being applied
        self.held_posts: list[Connection] = []  # POSTs waiting while the broker holds publishers
        self.session = Session(server.router, server.limits, owner=self, identity=identity, authenticator=server.auth, limiter=limiter)
        self.box = self.session.box
        self.box.paused = True
        if limiter is not None:
            limiter.owner = self  # a rate-limit abuser's stream is closed, not the TCP connection it came on

    @property
    def event_id(self) -> bytes:
        return b"%b-%d" % (self.tag, self.sent)

    # the TCP connection carrying the event stream

    def attach(self, conn: Connection, resumed: bool, origin: str | None) -> None:
        """Carry the event stream on `conn` from now on: the response head, the `open` event,
        then whatever waits."""
        self.tcp = conn
        self.phase = ATTACHED
        self.last_seen = self.server.loop.time()
        self.ping_sent = 0.0
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream",
            "Cache-Control: no-store",
            "X-Accel-Buffering: no",
            "Transfer-Encoding: chunked",
            *cors_lines(origin),
        ]
        opening = b"id: %b\nevent: open\ndata: %b\n\n" % (self.event_id, b"resumed" if resumed else b"new")
        conn.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + chunk(opening))
        box = self.box
        box.paused = False
        box.transport_bytes = conn.buffer_size()
        self.bound_writes(self.session.shedding is not None)
        if box.size or (self.session.shedding is not None and self.session.shedding.held):
            self.server.router.schedule_write(box)

    def detach(self, conn: Connection) -> None:
        """`conn`, which carried the event stream, is gone: hold the session for a resume."""
        if self.tcp is not conn or self.phase != ATTACHED:
            return
        self.tcp = None
        self.phase = DETACHED
        self.detached_at = self.server.loop.time()
        self.box.paused = True
        self.box.transport_bytes = 0

    def pause_writing(self) -> None:
        self.box.paused = True

    def resume_writing(self) -> None:
        tcp = self.tcp
        if self.phase != ATTACHED or tcp is None:  # (attached: tcp is its event stream's)
            return
        box = self.box
        box.paused = False
        box.transport_bytes = tcp.buffer_size()
        shedding = self.session.shedding
        router = self.server.router
        if (box.size or (shedding is not None and shedding.held) or box in router.replaying) and not box.closed:
            router.schedule_write(box)

    # what the server calls on a connection

    def write(self, data: bytes) -> None:
        """Server frames (as the outbox assembled them) as events, in one write."""
        if self.tcp is None:
            return
        payloads = self.fallback.encoded(data)
        parts = []
        for b64 in payloads:
            self.sent += 1
            parts.append(b"id: %b\ndata: %b\n\n" % (self.event_id, b64))
        self.tcp.transport.write(chunk(b"".join(parts)))

    def buffer_size(self) -> int:
        return self.tcp.buffer_size() if self.tcp is not None else 0

    def take_pong(self) -> bytes:
        return b""

    def bound_writes(self, shedding: bool) -> None:
        if self.tcp is not None:
            self.tcp.bound_writes(shedding)

    def ping(self, now: float) -> None:
        """Ask for an answer: a client answers a `ping` event with a POST (an empty one)."""
        self.ping_sent = now
        if self.tcp is not None:
            self.tcp.transport.write(chunk(b"event: ping\ndata: ping\n\n"))

    def frame_expired(self, timeout: float) -> None:  # a stream holds no partial frame
        return

    def hold(self) -> None:
        """Apply no POST of this stream until `release()` (the broker holds too many bytes)."""
        self.held = True

    def release(self) -> None:
        self.held = False
        waiting, self.held_posts = self.held_posts, []
        for conn in waiting:
            self.server.queue(conn)

    def audit(self, event: str, **fields: object) -> None:
        self.server.guard.audit.record(
            self.id,
            event,
            {"conn": self.id, "peer": self.peer, "user": self.user},
            conn=self.id,
            peer=self.peer,
            user=self.user,
            **fields,
        )

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """End the session with a `close` event carrying `code` and `reason` (a WebSocket
        close code, docs/protocol.md section 9), then end the response."""
        from .connection import OPEN

        if self.state != OPEN:
            return
        self.close_reason = (int(code), reason)
        self.server.router.stats.count_close(int(code))
        tcp = self.tcp
        if tcp is not None:
            box = self.box
            shedding = self.session.shedding
            if flush and shedding is not None and shedding.held:
                shedding.release(box)
            if flush and box.size:
                self.write(box.take(self.server.config.max_outbound_frame_bytes))
            text = reason.encode()[:123].decode("utf-8", "ignore").replace("\n", " ")
            tcp.transport.write(chunk(b"event: close\ndata: %d %b\n\n" % (int(code), text.encode())) + b"0\r\n\r\n")
            tcp.end_stream()
        self.end()

    def abort(self) -> None:
        tcp = self.tcp
        if tcp is not None:
            tcp.abort()
        self.end()

    def end(self) -> None:
        """The session is over: its subscriptions end, the server forgets it."""
        from .connection import CLOSED

        if self.phase == ENDED:
            return
        self.phase = ENDED
        self.state = CLOSED
        self.tcp = None
        self.session.close()
        self.fallback.forget(self)
        server = self.server
        server.connections.pop(self.id, None)
        code, reason = self.close_reason or (1006, "stream lost")
        logs.event(
            logging.INFO,
            "disconnect",
            conn=self.id,
            peer=self.peer,
            code=code,
            reason=reason,
            received=self.session.received,
            errors=self.session.errors,
            transport="sse",
        )
        for conn in self.held_posts:
            conn.abort()
        self.held_posts = []
        server.on_disconnected(self)


# What Server.connections holds: the open WebSocket connections and fallback event streams
# (the sweep, the tick, shutdown and the admin API treat both alike).
OpenConnection = Union["Connection", Stream]


def cors_lines(origin: str | None) -> list[str]:
    """The CORS headers of an answer to an allowed `origin` (none without an Origin)."""
    return [] if origin is None else [f"Access-Control-Allow-Origin: {origin}", "Vary: Origin"]


class Fallback:
    """The fallback requests of one server: streams by id, and the handling of each request."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.streams: dict[str, Stream] = {}
        # the frames of the latest write and their base64, shared by the streams that get the
        # very same bytes in one tick (every subscriber of `md.>`): encoded once
        self._last_data: bytes | None = None
        self._last_encoded: list[bytes] = []

    def encoded(self, data: bytes) -> list[bytes]:
        if data is self._last_data:
            return self._last_encoded
        encoded = [binascii.b2a_base64(payload, newline=False) for payload in frame_payloads(data)]
        self._last_data, self._last_encoded = data, encoded
        return encoded

    def forget(self, stream: Stream) -> None:
        if self.streams.get(stream.key) is stream:
            del self.streams[stream.key]
        if self._last_data is not None:
            self._last_data, self._last_encoded = None, []

    def sweep(self, now: float) -> None:
        """End the sessions whose stream has not come back within ping_timeout_s."""
        wait = self.server.config.ping_timeout_s
        for stream in [s for s in self.streams.values() if s.phase == DETACHED and now - s.detached_at >= wait]:
            stream.close_reason = stream.close_reason or (1001, f"the event stream did not come back within {wait:g} s")
            stream.end()

    # requests

    def handle(self, conn: Connection, request: handshake.Request, rest: bytes) -> None:
        """A fallback request whose head was read (`rest`: the bytes after it)."""
        server = self.server
        origin = None
        try:
            server.rules.check_path(request, server.closing)
            if not server.config.http_fallback:
                raise Refused(404, "the HTTP fallback is off on this broker (http_fallback); connect with a WebSocket")
            origin = server.rules.check_origin(request)
            if request.method == "OPTIONS":
                self._preflight(conn, origin)
                conn.next_request(rest)
                return
            version = request.header(PROTOCOL_HEADER)
            if version is None or version.strip() != SUBPROTOCOL:
                raise Refused(
                    400,
                    f"unsupported protocol version (Broker-Protocol: {handshake.shown(version or '', 20)}); this server speaks {SUBPROTOCOL}",
                )
            key = request.header(STREAM_HEADER)
            if key is None or not _STREAM_ID.fullmatch(key.strip()):
                raise Refused(400, "a Broker-Stream header is required: 16 to 64 characters of base64url (A-Z a-z 0-9 - _)")
            key = key.strip()
            if request.method == "GET":
                self._open(conn, request, key, origin)
            elif request.method == "POST":
                self._post_head(conn, request, key, origin, rest)
            elif request.method == "DELETE":
                self._delete(conn, key, origin, rest)
            else:
                raise Refused(
                    405,
                    f"method {handshake.shown(request.method, 16)} is not allowed; the fallback takes GET (the event stream), POST (a frame) and DELETE (the end)",
                    {"Allow": "GET, POST, DELETE"},
                )
        except Refused as refused:
            conn.refuse_request(refused.error, cors_lines(origin))
        except handshake.HandshakeError as error:  # check_path's, check_origin's, and the limit per user
            conn.refuse_request(error, cors_lines(origin))

    def _preflight(self, conn: Connection, origin: str | None) -> None:
        lines = [
            "HTTP/1.1 204 No Content",
            *cors_lines(origin),
            "Access-Control-Allow-Methods: GET, POST, DELETE",
            f"Access-Control-Allow-Headers: {ALLOWED_HEADERS}",
            f"Access-Control-Max-Age: {PREFLIGHT_MAX_AGE_S}",
        ]
        conn.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _open(self, conn: Connection, request: handshake.Request, key: str, origin: str | None) -> None:
        """An event stream: a new session, or the resume of one (Last-Event-ID)."""
        server = self.server
        if "text/event-stream" not in (request.header("accept") or ""):
            raise Refused(406, "the event stream is a GET with Accept: text/event-stream")
        try:
            identity = server.auth.identify(request.path, request.header("authorization"), [])
        except AuthError as error:
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if error.status == 401 else {}
            raise Refused(error.status, error.text, headers) from None
        server.guard.admit_user(conn, identity.user)  # 429 past max_connections_per_user
        existing = self.streams.get(key)
        last = (request.header("last-event-id") or "").strip().encode("latin-1", "replace")
        if existing is not None:
            if existing.user != identity.user:
                raise Refused(409, "this Broker-Stream id is in use; make a new random one")
            if existing.tcp is not None:  # the client lost it before the broker noticed
                existing.tcp.abort()
                existing.detach(existing.tcp)
            if last and last == existing.event_id and not existing.box.closed:
                server.streaming(conn)
                conn.carry(existing)
                existing.attach(conn, True, origin)
                logs.event(logging.INFO, "resume", conn=existing.id, peer=conn.peer, user=identity.user, transport="sse")
                return
            existing.close_reason = (1001, "replaced by a new event stream of the same id")
            existing.end()
        server.streaming(conn)
        stream = Stream(
            self, key, server.new_connection_id(), identity, conn.peer, server.guard.limiter(conn), handshake.client_of(request)
        )
        self.streams[key] = stream
        server.connections[stream.id] = stream
        server.opened += 1
        conn.carry(stream)
        stream.attach(conn, False, origin)
        logs.event(logging.INFO, "connect", conn=stream.id, peer=conn.peer, user=identity.user, transport="sse")

    def _delete(self, conn: Connection, key: str, origin: str | None, rest: bytes) -> None:
        """The client closes its stream (as a WebSocket client sends a close frame): the
        session ends at once, with 1000."""
        stream = self.streams.get(key)
        if stream is None or stream.phase == ENDED:
            raise Refused(404, "no stream with this Broker-Stream id on this broker")
        stream.close(CloseCode.NORMAL, "client closed")
        conn.answer_post(cors_lines(origin))

    def _post_head(self, conn: Connection, request: handshake.Request, key: str, origin: str | None, rest: bytes) -> None:
        cfg = self.server.config
        content_type = (request.header("content-type") or "").partition(";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            raise Refused(415, f"a POST holds one frame as Content-Type: {CONTENT_TYPE}")
        if request.header("transfer-encoding") is not None:
            raise Refused(411, "a POST states its Content-Length (chunked bodies are not accepted)")
        length_text = request.header("content-length")
        if length_text is None or not length_text.strip().isdigit():
            raise Refused(411, "a POST states its Content-Length")
        length = int(length_text.strip())
        if length > cfg.max_frame_bytes:
            raise Refused(413, f"a frame of {length} bytes is larger than {cfg.max_frame_bytes} (max_frame_bytes)")
        stream = self.streams.get(key)
        if stream is None or stream.phase == ENDED:
            raise Refused(
                404,
                "no stream with this Broker-Stream id on this broker: it ended, or this POST reached another node or worker process than its event stream (protocol.md 12.5: affinity)",
            )
        conn.read_body(length, rest, lambda body: self._post(conn, stream, body, origin))

    def _post(self, conn: Connection, stream: Stream, body: bytes, origin: str | None) -> None:
        """A POST's body was read: apply its frame (an empty body only answers a ping)."""
        if stream.phase == ENDED:
            conn.refuse_request(Refused(404, "the stream ended").error, cors_lines(origin))
            return
        if stream.posting is not None:
            conn.refuse_request(
                Refused(409, "another POST of this stream is being applied; send one frame at a time").error, cors_lines(origin)
            )
            return
        stream.last_seen = self.server.loop.time()
        stream.bytes_in += len(body)
        stream.ping_sent = 0.0  # any POST answers a ping (the loop's clock may not have moved since it)
        if not body:
            conn.answer_post(cors_lines(origin))
            return
        stream.posting = conn
        conn.post = (stream, body, cors_lines(origin))
        self.apply(conn)

    def apply(self, conn: Connection, progress: bool = False) -> None:
        """Apply (or go on applying) the frame of the POST on `conn` within the iteration's
        budget (`progress`: the head of the server's queue, which applies at least one
        message whatever the budget); answer 204 once it is applied."""
        post = conn.post
        if post is None:  # (set until the POST is answered)
            return
        stream, body, cors = post
        server = self.server
        router = server.router
        if stream.phase == ENDED:
            conn.post = None
            conn.refuse_request(Refused(404, "the stream ended").error, cors)
            return
        if stream.held:
            stream.held_posts.append(conn)
            conn.suspend_reading()
            return
        session = stream.session
        if (router.busy or conn.debt) and not progress:
            server.queue(conn)
            return
        before = router.spent()
        try:
            if body is not None:
                conn.post = (stream, None, cors)
                router.input_bytes += len(body)
                done = session.receive(body)
            else:
                done = session.resume()
        except Exception:
            logs.log.exception("internal error handling a frame", extra={"fields": {"conn": stream.id}})
            stream.posting = None
            conn.post = None
            stream.close(CloseCode.INTERNAL_ERROR, "internal error")
            conn.refuse_request(handshake.HandshakeError(500, "internal error"), cors)
            return
        conn.owe(router.spent() - before)
        if not done:
            server.queue(conn)
            return
        stream.posting = None
        conn.post = None
        conn.answer_post(cors)
