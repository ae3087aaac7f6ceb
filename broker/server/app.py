"""The broker server: WebSocket connections on uvloop around the sans-I/O router.

`Server` is the shell's one object: what it holds (the router, the backplane, the tables of
connections, the limits, counters for metrics), starting (listening, the admin port, the
cluster view), accepting connections and their upgrades, reloading, and an operator's actions.
Its other parts are its base classes, one concern each: the per-iteration tick
(broker.server.tick), the sweep (broker.server.sweep), shutdown and lame-duck mode
(broker.server.shutdown) and the dead-letter file (broker.server.deadletters).

Per loop tick: publishes accumulate in the router; the first one schedules `tick` with
`call_soon`; `tick` encodes each topic's batch once, queues it on every subscriber's outbox
and writes every touched connection with a single transport write, everything of the tick
coalesced into as few frames as possible (connections receiving the same pieces share the
bytes). A connection that arrives when the tick's budget is spent waits in a queue and is
resumed, in order, by the following ticks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__, limits, policy
from ..auth import Authenticator
from ..backplane import Backplane, MemoryBackplane
from ..config import Config, read_secret
from ..errors import CloseCode, ConfigError, ListenError, describe_os_error
from ..fastpath import IMPLEMENTATION
from ..messages import SUBPROTOCOL
from ..pressure import Pressure
from ..router import Router
from ..session import SessionLimits
from . import handshake, logs, tls
from .connection import OPEN, Connection
from .deadletters import DeadLetters
from .fallback import Fallback, OpenConnection
from .metrics import LoopLag
from .shutdown import Shutdown
from .sweep import Sweeper
from .tick import Ticker

if TYPE_CHECKING:
    from ..cluster.presence import Presence
    from ..cluster.streams import RedisBackplane
    from .admin import Admin

# Listening backlog: connections the kernel holds before they are accepted.
BACKLOG = 4096


def node_name(port: int, worker: int | None = None, given: str = "") -> str:
    """A broker's name: `node_name` if given, else the machine's host name and its WebSocket
    port; for a worker of `broker serve --workers`, with `/wI` after it."""
    name = given or f"{socket.gethostname()}:{port}"
    return name if worker is None else f"{name}/w{worker}"


# so a connection id names one connection in the whole group (and the worker holding it).
CONNECTION_ID_BITS = 40


def worker_of_connection(conn_id: int) -> int:
    """The worker index of the process group whose connection this id is."""
    return conn_id >> CONNECTION_ID_BITS


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process of `broker serve --workers` is told by its supervisor."""

    index: int
    admin_socket: str  # the Unix socket of its own admin server, which the supervisor asks


class Server(Ticker, Sweeper, Shutdown, DeadLetters):
    """The broker of one process (or one worker of `broker serve --workers`)."""

    loop: asyncio.AbstractEventLoop  # the running loop, from start() on

    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker
        self.auth = Authenticator(config)  # raises ConfigError for unusable keys or files
        self.admin_api_key = read_secret(config, "admin_api_key")  # read before anything listens
        self.rules = handshake.Rules(config.path, SUBPROTOCOL, self.auth, config.origins)
        self.cluster: RedisBackplane | None = None  # with redis_url: the Redis Streams backplane joining the nodes
        self.backplane: Backplane
        if config.redis_url:
            from ..cluster.streams import RedisBackplane

            self.backplane = self.cluster = RedisBackplane(config)
        else:
            self.backplane = MemoryBackplane(
                max_messages=config.history_max_messages,
                max_bytes=config.history_max_bytes,
                max_age_s=config.history_max_age_s,
                max_total_bytes=config.history_max_total_bytes,
            )
        self.router = Router(
            self.request_tick,
            config,
            backplane=self.backplane,
            clock=time.monotonic,
            request_resume=lambda box: box.owner.unpark(),
        )
        self._dead_letters_seen = 0  # router.stats.dead_letters when they were last written
        self._dead_letter_refusal: str | None = None  # why the dead-letter file was last not written
        self._request_timer: asyncio.TimerHandle | None = None
        self._request_timer_at = 0.0
        # the bound on queued bytes and the slow-consumer rule (broker.pressure)
        self.pressure = Pressure(config.max_total_pending_bytes, config.slow_consumer_timeout_s)
        self.limits = SessionLimits(
            max_payload_bytes=config.max_payload_bytes,
            max_subscriptions=config.max_subscriptions,
            max_patterns=config.max_patterns,
            max_pending_bytes=config.max_pending_bytes,
            max_batch_messages=config.max_batch_messages,
            policy=policy.BY_NAME[config.slow_consumer_policy],
        )
        self.connections: dict[int, OpenConnection] = {}  # open (upgraded) connections and fallback streams
        self.handshaking: dict[int, Connection] = {}  # accepted, upgrade not yet done (TLS included)
        self.refusing = 0  # connections refused at accept whose TCP connection is not gone yet
        self.guard = limits.Guard(config, log=logs.event)  # connections admitted, rate limits, audit log
        self.port: int | None = None
        self.refused_by_status: dict[int, int] = {}  # upgrade requests refused, by HTTP status
        # counters for metrics: one addition per connection, read, write or tick, never per message
        self.opened = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.writes = 0
        self.ticks = 0
        self.fastpath = IMPLEMENTATION
        # who this process is, for the dashboard and the cluster view: its name (node_name, or
        # HOST:PORT once it listens), when it started (Unix time), and an id of this start (a
        # dashboard that sees another one knows the counters started again)
        self.node = config.node_name  # made whole once it listens (node_name())
        self.version = __version__
        self.started = time.time()
        self.instance = os.urandom(6).hex()
        self.presence: Presence | None = None  # once started: its announcements in Redis and the cluster's view
        self.loop_lag = LoopLag()  # how late the sweep ran, each time (the event loop's lag)
        self._sweep_due = 0.0
        self.admin: Admin | None = None  # with admin_port: the admin HTTP server (metrics, health)
        self._server: asyncio.Server | None = None
        self.tls: ssl.SSLContext | None = None  # with tls_cert_file: the context every handshake uses
        self.certificate: tls.Certificate | None = None  # what it was last loaded with
        self._next_id = 0 if worker is None else worker.index << CONNECTION_ID_BITS
        self._closing = False
        self._all_gone: asyncio.Event | None = None
        self._forced: asyncio.Event | None = None  # made when the drain starts; set by a second signal
        # lame-duck mode (SIGUSR2): when it began (loop time; None: not in it), the connections
        # to tell to move, in a random order, how many of them were told, and what to call
        # once every one was
        self.lame_duck_since: float | None = None
        self._moving: list[OpenConnection] = []
        self._moved = 0
        self._lame_done: Callable[[], object] | None = None
        self._lame_timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_period = 1.0
        self._tick_scheduled = False
        self._waiting: deque[Connection] = deque()  # connections to resume, in order
        self.fallback = Fallback(self)  # the SSE + POST transport's streams (broker.server.fallback)

    # lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.tls_cert_file:  # TLS only: every connection starts with a TLS handshake (Connection starts it, once counted)
            self.tls, self.certificate = tls.server_context(cfg)
        if self.cluster is not None:
            await self.cluster.start(self.router)  # the history the streams retain, before any client
        try:
            try:
                self._server = await self.loop.create_server(
                    self._new_connection, cfg.host, cfg.port, backlog=BACKLOG, reuse_port=cfg.reuse_port or None
                )
            except OSError as exc:
                raise ListenError(f"cannot listen on {cfg.host}:{cfg.port}: {describe_os_error(exc)}") from exc
            self.port = self._server.sockets[0].getsockname()[1]
            self.node = node_name(self.port, self.worker.index if self.worker is not None else None, self.config.node_name)
            if self.worker is not None:  # its supervisor serves admin_port and asks this socket
                from .admin import Admin

                self.admin = admin = Admin(self)
                await admin.start_unix(self.worker.admin_socket)
            elif cfg.admin_port:
                from .admin import Admin

                self.admin = admin = Admin(self)
                await admin.start(cfg.admin_host, cfg.admin_port)
        except BaseException:
            await self.undo_start()
            raise
        from ..cluster.presence import Presence

        self.presence = presence = Presence(self)
        await presence.start(self.cluster is not None and self.cluster.cluster)
        self._sweep_period = min(
            1.0, cfg.ping_interval_s / 2, cfg.ping_timeout_s / 2, cfg.slow_consumer_timeout_s / 2, cfg.frame_timeout_s / 2
        )
        self._sweep_due = self.loop.time() + self._sweep_period
        self._sweeper = self.loop.call_later(self._sweep_period, self.sweep)
        logs.event(logging.INFO, "start", **self._start_fields())

    def _start_fields(self) -> dict[str, object]:
        """What the start line says: where clients connect, and whether authentication, TLS,
        the backplane and the admin server are on, and where."""
        cfg = self.config
        fields: dict[str, object] = {
            "node": self.node,
            "host": cfg.host,
            "port": self.port,
            "path": cfg.path,
            "version": __version__,
            "fastpath": IMPLEMENTATION,
            "subprotocol": SUBPROTOCOL,
            "tls": self.tls is not None,
        }
        if self.certificate:
            fields["cert_sha256"] = self.certificate.sha256
        keys = self.auth.key_settings()
        fields["auth"] = "on" if keys else "off"
        if keys:
            fields["auth_keys"] = ",".join(keys)
            fields["auth_anonymous"] = cfg.auth_anonymous
        if self.cluster is None:
            fields["backplane"] = "memory"
        else:
            from ..cluster.streams import without_password

            fields["backplane"] = "redis-cluster" if self.cluster.cluster else "redis"
            fields["redis"] = without_password(cfg.redis_url)
            fields["redis_prefix"] = cfg.redis_prefix
        fields["admin"] = "off" if self.admin is None else self.admin.where
        if self.admin is not None:
            fields["admin_api"] = "on" if self.admin_api_key else "off"
        return fields

    @property
    def pending_total(self) -> int:
        """Bytes queued for the connections that are behind, in all (as last seen)."""
        return self.pressure.total

    @property
    def holding(self) -> bool:
        """True while publishers are not read (max_total_pending_bytes passed)."""
        return self.pressure.holding

    @property
    def holds(self) -> int:
        """Times the publishers were held."""
        return self.pressure.holds

    @property
    def state(self) -> str:
        """What the node is doing, for the cluster view: running, lame duck or stopping."""
        if self._closing:
            return "stopping"
        return "running" if self.lame_duck_since is None else "lame duck"

    @property
    def accepting_clients(self) -> bool:
        """It listens for new WebSocket clients: started, not in lame-duck mode, not stopping."""
        return self.port is not None and not self._closing and self.lame_duck_since is None

    @property
    def handshakes_refused(self) -> int:
        return sum(self.refused_by_status.values())

    def reload(self) -> None:
        """Read again what may change while the broker runs (SIGHUP): the TLS certificate and
        key (open connections keep theirs), the JWKS and the token denylist (open connections
        holding a revoked token are closed). Never raises: what cannot be loaded is logged
        and the broker goes on with what it had."""
        logs.event(logging.INFO, "reload")
        self._reload_tls()
        if getattr(self, "loop", None) is not None:  # started: connections may hold revoked tokens
            self.check_tokens(force=True)

    def _reload_tls(self) -> None:
        """Load tls_cert_file and tls_key_file again into the context the listener uses: new
        handshakes get the new certificate, open connections keep the one they negotiated."""
        if self.tls is None:
            return
        old = self.certificate
        assert old is not None  # loaded with the context
        try:
            self.certificate = tls.reload(self.tls, self.config)
        except ConfigError as exc:  # names the setting and the file; the old certificate stays
            logs.event(logging.ERROR, "tls_reload_failed", error=str(exc), kept=old.sha256)
            return
        except Exception:  # a reload never takes the broker down
            logs.log.exception("tls_reload_failed", extra={"fields": {"kept": old.sha256}})
            return
        logs.event(logging.INFO, "tls_reloaded", cert=self.certificate.cert_file, sha256=self.certificate.sha256, previous=old.sha256)

    def on_disconnected(self, conn: OpenConnection) -> None:
        self.pressure.behind.discard(conn.box)
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    # handshake

    def _new_connection(self) -> Connection:
        return Connection(self, self.new_connection_id())

    def new_connection_id(self) -> int:
        """A connection id no other connection (or fallback stream) of this server has."""
        self._next_id += 1
        return self._next_id

    @property
    def closing(self) -> bool:
        """True once shutdown began."""
        return self._closing

    def streaming(self, conn: Connection) -> None:
        """`conn`'s fallback event stream was accepted: it is out of its handshake phase."""
        self.handshaking.pop(conn.id, None)
        self.guard.opened(conn)

    def accept(self, conn: Connection) -> handshake.HandshakeError | None:
        """A TCP connection was accepted: count it (broker.limits.Guard.accept) and hold it as
        in its handshake phase; or the refusal (counted and audited) to answer it with."""
        try:
            self.guard.accept(conn)
        except limits.LimitRefused as error:
            self.refused(error, conn.peer)
            return error
        self.handshaking[conn.id] = conn
        return None

    def opened_connection(self, conn: Connection) -> None:
        """`conn`'s upgrade was accepted: it is open and out of its handshake phase."""
        self.handshaking.pop(conn.id, None)
        self.guard.opened(conn)
        self.connections[conn.id] = conn

    def connection_gone(self, conn: Connection) -> None:
        """`conn`'s TCP connection is gone (or its TLS handshake failed): release its counts.
        Idempotent."""
        self.handshaking.pop(conn.id, None)
        self.guard.connection_lost(conn)

    def check_request(self, request: handshake.Request) -> handshake.Accepted:
        """The server's rules for an upgrade request (handshake.Rules, in the order of
        docs/protocol.md 1.1); returns what it accepts or raises HandshakeError."""
        return self.rules.check(request, self._closing)

    def refused(self, error: handshake.HandshakeError, peer: str = "") -> None:
        """Count a refused handshake and write it to the audit log, bounded per address like
        the refusals of the limits (a client cannot flood the log with bad requests or tokens)."""
        self.refused_by_status[error.status] = self.refused_by_status.get(error.status, 0) + 1
        if not isinstance(error, limits.LimitRefused):  # the guard wrote those already
            self.guard.refused(error, peer)

    # an operator's actions (the admin API), each logged as `operator_action`

    def close_connection(self, conn_id: int, operator: str) -> bool:
        """Close one connection as an operator asked (1008 "closed by an operator"); False
        when it is not open."""
        conn = self.connections.get(conn_id)
        if conn is None:
            return False
        conn.close(CloseCode.POLICY_VIOLATION, "closed by an operator")
        logs.event(
            logging.WARNING, "operator_action", action="close_connection", operator=operator, conn=conn_id, user=conn.user, peer=conn.peer
        )
        return True

    def disconnect_user(self, user: str, operator: str) -> int:
        """Close every open connection of `user` (1008 "closed by an operator"); returns how
        many. Its tokens stay valid: it may connect again (revoke them to keep it out)."""
        closed = 0
        for conn in list(self.connections.values()):
            if conn.user == user and conn.state == OPEN:
                conn.close(CloseCode.POLICY_VIOLATION, "closed by an operator")
                closed += 1
        logs.event(logging.WARNING, "operator_action", action="disconnect_user", operator=operator, user=user, closed=closed)
        return closed

    def unsubscribe_user(self, user: str, pattern: str, operator: str) -> int:
        """End the subscription `pattern` (as the client named it) on every open connection of
        `user`, each told with `unsubscribed`; returns how many held it."""
        ended = 0
        for conn in list(self.connections.values()):
            if (
                conn.user == user
                and conn.state == OPEN
                and conn.session is not None
                and conn.session.end_subscription(pattern, "unsubscribed by an operator")
            ):
                ended += 1
        logs.event(
            logging.WARNING,
            "operator_action",
            action="unsubscribe_user",
            operator=operator,
            user=user,
            subscription=pattern,
            connections=ended,
        )
        return ended


async def run(config: Config, worker: WorkerRole | None = None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully (a second one cuts the
    wait for the clients short); SIGHUP reloads; SIGUSR2 enters lame-duck mode, at whose end
    it shuts down the same way."""
    server = Server(config, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    loop.add_signal_handler(signal.SIGUSR2, server.enter_lame_duck, stop.set)
    try:
        await server.start()
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        loop.remove_signal_handler(signal.SIGUSR2)
        for sig in (signal.SIGTERM, signal.SIGINT):  # again during the drain: stop waiting, say what is lost
            loop.add_signal_handler(sig, server.force_stop, sig)
        try:
            await server.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
