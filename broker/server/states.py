"""The state of a client connection (broker.server.connection): its states, the fields its parts
(opening, plain HTTP requests, closing, and Connection itself) share, and the write-buffer marks
of a TLS transport."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ..fastpath import Outbox
    from ..session import Session
    from .app import Server
    from .fallback import Stream

# REFUSED: refused at accept, its answer written; closed once the client's first bytes are
# read (closing with unread bytes would reset the connection, and the answer with it) or after
# REFUSAL_LINGER_S.
# BODY: reading the body of a fallback POST; STREAMING: carrying a fallback event stream
# (broker.server.fallback), whose session is not the connection's.
HANDSHAKE, OPEN, CLOSING, CLOSED, REFUSED, BODY, STREAMING = range(7)

# Where a TLS transport pauses the writer: where a plain uvloop transport does (64 KiB, and
# resumes at a quarter of it). uvloop's TLS transport would first hold up to 512 KiB of the
# connection's own ciphertext, and what it has passed on to the TCP transport below it is not
# in get_write_buffer_size: with the plain bound, the bytes the broker does not count stay
# about as few as on a plain connection, and a lagging connection's queue stays in the broker,
# as pieces shared with the other subscribers, rather than as private ciphertext.
TLS_WRITE_HIGH_WATER = 64 << 10


class ConnectionState:
    """The fields of a connection, declared once for all its parts (the base of each of them,
    and the only class of the family with slots: a connection has no __dict__)."""

    __slots__ = (
        "server",
        "id",
        "peer",
        "session",
        "box",
        "transport",
        "state",
        "close_reason",
        "last_seen",
        "ping_sent",
        "write",
        "buffer_size",
        "held",
        "user",
        "partial_since",
        "debt",
        "pong",
        "last_sent",
        "unhandled",
        "needed",
        "timer",
        "client",
        "opened_at",
        "bytes_in",
        "bytes_out",
        "reading",
        "queued",
        "tls_steps",
        "wake",
        "stream",
        "post",
        "body",
        "body_needed",
        "on_body",
    )

    server: Server
    id: int
    peer: str
    session: Session | None
    box: Outbox | None
    # the transport, and its own methods called once per connection per tick, bound once: set
    # by connection_made, which the loop calls right after it creates the connection
    transport: asyncio.Transport
    write: Callable[[bytes | bytearray | memoryview], None]
    buffer_size: Callable[[], int]
    state: int
    close_reason: tuple[int, str] | None
    last_seen: float
    last_sent: float
    ping_sent: float
    unhandled: bytearray | None
    needed: int
    timer: asyncio.TimerHandle | None
    reading: bool
    queued: bool
    tls_steps: Coroutine[Any, Any, asyncio.Transport | None] | None
    wake: asyncio.TimerHandle | None
    held: bool
    user: str | None
    client: str | None
    opened_at: float
    bytes_in: int
    bytes_out: int
    partial_since: float
    debt: int
    pong: bytes | None
    stream: Stream | None
    post: tuple[Stream, bytes | None, list[str]] | None
    body: bytearray | None
    body_needed: int
    on_body: Callable[[bytes], object] | None

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.peer = ""
        self.session = None
        self.box = None
        self.state = HANDSHAKE
        self.close_reason = None  # set when either side starts the close
        self.last_seen = 0.0  # loop time of the last data from the client
        self.last_sent = 0.0  # loop time of the last write to the client (for its heartbeats)
        self.ping_sent = 0.0  # loop time of an unanswered ping (0: none)
        self.unhandled = None  # bytes received and not yet handled
        self.needed = 0  # bytes the frame at the start of unhandled needs in all
        self.timer = None  # handshake timeout, then close timeout
        self.reading = True
        self.queued = False  # waiting in the server's queue of connections to resume
        self.tls_steps = None  # start_tls, run step by step, while the TLS handshake is in progress
        self.wake = None  # the end of a sit-out (see debt)
        self.held = False  # not read while the broker's queued bytes are past their global bound
        self.user = None  # who the token names (None: authentication is off, or anonymous)
        self.client = None  # the NAME/VERSION the client says it is (None: it says nothing)
        self.opened_at = 0.0  # loop time its upgrade was accepted
        # bytes read from it after the handshake and written to it by the ticks (one addition
        # per read or write, as the server's totals)
        self.bytes_in = 0
        self.bytes_out = 0
        # loop time since when an incomplete frame waits at the start of unhandled for the client
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
        self.pong = None
        self.stream = None  # the fallback stream this connection carries (STREAMING)
        self.post = None  # a fallback POST being applied: (stream, body or None once handed over, CORS lines)
        self.body = None  # a POST body being read (BODY), and how long it is
        self.body_needed = 0
        self.on_body = None
