"""The broker server: WebSocket connections on uvloop around the sans-I/O router.

Per loop tick: publishes accumulate in the router; the first one schedules `_tick` with
`call_soon`; `_tick` encodes each topic's batch once, queues it on every subscriber's outbox
and writes every touched connection with a single transport write, everything of the tick
coalesced into as few frames as possible (connections receiving the same pieces share the
bytes). A connection that arrives when the tick's budget is spent waits in a queue and is
resumed, in order, by the following ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import ssl
import stat
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .. import __version__, policy
from ..auth import Authenticator
from ..backplane import MemoryBackplane
from ..config import Config, read_secret
from ..errors import CloseCode, ConfigError, ListenError, describe_os_error
from ..fastpath import IMPLEMENTATION
from ..messages import SUBPROTOCOL, Heartbeat, encode
from ..router import Router
from ..pressure import HOLD, RELEASE, Pressure
from ..session import Limits
from .. import limits
from . import handshake, logs, tls
from .connection import OPEN, Connection
from .fallback import Fallback
from .metrics import LoopLag

# Listening backlog: connections the kernel holds before they are accepted.
BACKLOG = 4096
# Lame-duck mode tells its share of the connections to move this often.
LAME_DUCK_STEP_S = 0.05
# Dead letters logged one by one per sweep; the rest are counted in one line.
DEAD_LETTERS_LOGGED = 10


def dead_letter_path(port: int, worker: str | None = None) -> str:
    """The default dead-letter file of the broker listening on `port` (of its worker process
    `worker`, with `broker serve --workers`)."""
    suffix = f"-w{worker}" if worker is not None else ""
    return os.path.join(tempfile.gettempdir(), f"broker-dead-letters-{port}{suffix}.jsonl")


def node_name(port: int, worker: int | None = None, given: str = "") -> str:
    """A broker's name: `node_name` if given, else the machine's host name and its WebSocket
    port; for a worker of `broker serve --workers`, with `/wI` after it."""
    name = given or f"{socket.gethostname()}:{port}"
    return name if worker is None else f"{name}/w{worker}"


def foreign_file(path: str) -> str | None:
    """Why the broker must not use the file at `path` as its own, or None when it may: it
    does not exist, or it is a regular file (not a symbolic link) of the broker's user. The
    default path is in the shared temporary directory, where anyone could have put a file or
    a link there first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this process's user (uid {os.geteuid()})"
    return None


def _write_file(path: str, text: str) -> None:
    """Replace the file at `path` with `text` at once (readers see the old or the new one).
    The new file is made with O_EXCL and mode 0600 under a random name beside it, then renamed
    over `path`: a rename replaces a link rather than following it, and in a sticky directory
    such as /tmp it fails on another user's file (the caller checks `foreign_file` first)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".dead-letters-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        logs.log.exception("cannot write the dead-letter file", extra={"fields": {"path": path}})
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# With `broker serve --workers`, worker i numbers its connections from i << CONNECTION_ID_BITS,
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


class Server:
    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop | None = None
        self.auth = Authenticator(config)  # raises ConfigError for unusable keys or files
        self.admin_api_key = read_secret(config, "admin_api_key")  # read before anything listens
        origins = tuple(o.strip() for o in config.allowed_origins.split(",") if o.strip())
        self.rules = handshake.Rules(config.path, SUBPROTOCOL, self.auth, origins)
        self.cluster = None  # with redis_url: the Redis Streams backplane joining the nodes
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
            self._request_tick,
            max_topics=config.max_topics,
            max_topic_length=config.max_topic_length,
            max_outbound_frame_bytes=config.max_outbound_frame_bytes,
            backplane=self.backplane,
            dedupe_window_s=config.dedupe_window_s,
            dedupe_max_ids=config.dedupe_max_ids,
            max_open_requests=config.max_open_requests,
            clock=time.monotonic,
            dead_letters_max=config.dead_letters_max,
            request_resume=lambda box: box.owner.unpark(),
        )
        self._dead_letters_seen = 0  # router.stats.dead_letters when they were last written
        self._dead_letter_refusal: str | None = None  # why the dead-letter file was last not written
        self._request_timer: asyncio.TimerHandle | None = None
        self._request_timer_at = 0.0
        # the bound on queued bytes and the slow-consumer rule (broker.pressure)
        self.pressure = Pressure(config.max_total_pending_bytes, config.slow_consumer_timeout_s)
        self.limits = Limits(
            max_payload_bytes=config.max_payload_bytes,
            max_subscriptions=config.max_subscriptions,
            max_patterns=config.max_patterns,
            max_pending_bytes=config.max_pending_bytes,
            max_batch_messages=config.max_batch_messages,
            policy=policy.BY_NAME[config.slow_consumer_policy],
        )
        self.connections: dict[int, Connection] = {}  # open (upgraded) connections
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
        self.presence = None  # once started: its announcements in Redis and the cluster's view
        self.loop_lag = LoopLag()  # how late the sweep ran, each time (the event loop's lag)
        self._sweep_due = 0.0
        self.admin = None  # with admin_port: the admin HTTP server (metrics, health)
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
        self._moving: list[Connection] = []
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
        listen = {}
        if cfg.tls_cert_file:  # TLS only: every connection starts with a TLS handshake (Connection starts it, once counted)
            self.tls, self.certificate = tls.server_context(cfg)
        if cfg.reuse_port:
            listen["reuse_port"] = True
        if self.cluster is not None:
            await self.cluster.start(self.router)  # the history the streams retain, before any client
        try:
            try:
                self._server = await self.loop.create_server(self._new_connection, cfg.host, cfg.port, backlog=BACKLOG, **listen)
            except OSError as exc:
                raise ListenError(f"cannot listen on {cfg.host}:{cfg.port}: {describe_os_error(exc)}") from exc
            self.port = self._server.sockets[0].getsockname()[1]
            self.node = node_name(self.port, self.worker.index if self.worker is not None else None, self.config.node_name)
            if self.worker is not None:  # its supervisor serves admin_port and asks this socket
                from .admin import Admin

                self.admin = Admin(self)
                await self.admin.start_unix(self.worker.admin_socket)
            elif cfg.admin_port:
                from .admin import Admin

                self.admin = Admin(self)
                await self.admin.start(cfg.admin_host, cfg.admin_port)
        except BaseException:
            await self._undo_start()
            raise
        from ..cluster.presence import Presence

        self.presence = Presence(self)
        await self.presence.start(self.cluster is not None and self.cluster.cluster)
        self._sweep_period = min(1.0, cfg.ping_interval_s / 2, cfg.ping_timeout_s / 2, cfg.slow_consumer_timeout_s / 2, cfg.frame_timeout_s / 2)
        self._sweep_due = self.loop.time() + self._sweep_period
        self._sweeper = self.loop.call_later(self._sweep_period, self._sweep)
        logs.event(logging.INFO, "start", **self._start_fields())

    def _start_fields(self) -> dict[str, object]:
        """What the start line says: where clients connect, and whether authentication, TLS,
        the backplane and the admin server are on, and where."""
        cfg = self.config
        fields: dict[str, object] = {
            "node": self.node, "host": cfg.host, "port": self.port, "path": cfg.path, "version": __version__,
            "fastpath": IMPLEMENTATION, "subprotocol": SUBPROTOCOL,
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

    async def _undo_start(self) -> None:
        """Close what a start that failed half way opened, the listener first (no client is let
        in to a broker that will not run); stop() then has nothing to do."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for conn in list(self.connections.values()):
                conn.abort()
            await server.wait_closed()
        if self.admin is not None:
            await self.admin.stop()
        if self.cluster is not None:
            await self.cluster.stop()

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, flush what is queued, close every client with 1001
        and wait for them (at most shutdown_timeout_s), then abort the rest. Does nothing
        unless start() completed (a failed start closed what it opened)."""
        if self._closing or self._server is None or self._sweeper is None:
            return
        self._closing = True
        self._forced = asyncio.Event()
        if self._lame_timer is not None:  # stopped during lame-duck mode: the rest close with the others
            self._lame_timer.cancel()
            self._lame_timer = None
        self._sweeper.cancel()
        self._write_dead_letters()
        if self._request_timer is not None:
            self._request_timer.cancel()
        logs.event(logging.INFO, "stopping", connections=len(self.connections))
        self._server.close()
        if self.presence is not None:  # out of the cluster's view at once
            await self.presence.stop()
        for conn in list(self.handshaking.values()):
            if conn.in_tls_handshake:  # it could not be told 503 (shutting down) before its TLS is up
                conn.abort()
        self._tick()
        if self.cluster is not None:
            await self.cluster.stop()  # what was published goes to Redis (its acks with it) first
            self._tick()
        self._all_gone = asyncio.Event()
        if self.config.shutdown_close_code == CloseCode.SERVICE_RESTART:
            code, reason = CloseCode.SERVICE_RESTART, "server restarting"
        else:
            code, reason = CloseCode.GOING_AWAY, "server shutting down"
        for conn in list(self.connections.values()):
            conn.close(code, reason, flush=True)
        if self.connections and not self._forced.is_set():
            gone = asyncio.ensure_future(self._all_gone.wait())
            forced = asyncio.ensure_future(self._forced.wait())
            await asyncio.wait((gone, forced), timeout=self.config.shutdown_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            forced.cancel()
            if self.connections and not self._forced.is_set():
                logs.event(logging.WARNING, "shutdown_timeout", aborted=len(self.connections), queued_bytes=self.queued_bytes())
        if self.connections:  # the shutdown timeout passed, or a second signal came
            for conn in list(self.connections.values()):
                conn.abort()
            await asyncio.sleep(0)  # let the aborted connections report their disconnect
        await self._server.wait_closed()
        if self.admin is not None:
            await self.admin.stop()
        stats = self.router.stats
        logs.event(
            logging.INFO,
            "stopped",
            published=stats.published,
            delivered=stats.delivered,
            slow_consumers=stats.slow_consumers,
            errors=sum(stats.errors.values()),
            **({} if self.cluster is None else {
                "redis_" + name: getattr(self.cluster.stats, name)
                for name in ("writes", "entries_written", "messages_written", "entries_read", "messages_read", "commands", "reconnects", "in_doubt", "failed", "unknown", "refused", "epoch_changes", "rollbacks")
            }),
        )

    def force_stop(self, signum: int = 0) -> None:
        """A second SIGTERM or SIGINT during the drain: stop waiting for the clients. Logs
        `shutdown_forced` with what is lost: the connections not closed yet, which are aborted,
        and the bytes still queued for them (in the broker and in their sockets' buffers).
        The flush to Redis, if it is under way, ends first (it is bounded by redis_timeout_s).
        Before the drain started, and after it was forced, it does nothing."""
        if self._forced is None or self._forced.is_set():
            return
        fields: dict[str, object] = {"connections": len(self.connections), "queued_bytes": self.queued_bytes()}
        if signum:
            fields["signal"] = signal.Signals(signum).name
        if self._all_gone is None:
            fields["waiting_for"] = "the flush to Redis (at most redis_timeout_s), then the clients are aborted"
        logs.event(logging.WARNING, "shutdown_forced", **fields)
        self._forced.set()

    def queued_bytes(self) -> int:
        """Bytes queued for the open connections and not yet sent: in the broker and in their
        transports' buffers."""
        total = 0
        for conn in self.connections.values():
            box = conn.box
            if box is not None:
                total += box.size
            if conn.transport is not None:
                total += conn.buffer_size()
        return total

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

    # lame-duck mode

    def enter_lame_duck(self, done: Callable[[], object]) -> None:
        """SIGUSR2: stop accepting (the listener closes, /readyz answers 503), then after
        lame_duck_grace_s tell the connections to move to another node, a share of them at a
        time, spread evenly over lame_duck_duration_s (close code 4010, after what is queued
        for them); once every one was told, call `done` (which stops the broker). A rolling
        restart of a cluster so never sends every client of a node to the others at once."""
        if self._closing or self.lame_duck_since is not None or self._server is None:
            return
        cfg = self.config
        self.lame_duck_since = self.loop.time()
        self._lame_done = done
        self._server.close()
        self._moving = list(self.connections.values())
        random.shuffle(self._moving)
        logs.event(
            logging.WARNING, "lame_duck", connections=len(self._moving),
            grace_s=cfg.lame_duck_grace_s, duration_s=cfg.lame_duck_duration_s, close_code=int(CloseCode.RECONNECT_ELSEWHERE),
        )
        self._lame_timer = self.loop.call_later(cfg.lame_duck_grace_s, self._move_some)

    def _move_some(self) -> None:
        """Tell the share of the connections due by now to move; again LAME_DUCK_STEP_S later."""
        self._lame_timer = None
        if self._closing:
            return
        cfg = self.config
        elapsed = self.loop.time() - self.lame_duck_since - cfg.lame_duck_grace_s
        due = len(self._moving) if elapsed >= cfg.lame_duck_duration_s else int(len(self._moving) * elapsed / cfg.lame_duck_duration_s)
        while self._moved < due:
            conn = self._moving[self._moved]
            self._moved += 1
            if conn.state == OPEN:
                conn.close(CloseCode.RECONNECT_ELSEWHERE, "lame duck: reconnect to another node", flush=True)
        if self._moved < len(self._moving):
            self._lame_timer = self.loop.call_later(LAME_DUCK_STEP_S, self._move_some)
            return
        logs.event(logging.INFO, "lame_duck_done", moved=self._moved)
        self._moving = []
        done, self._lame_done = self._lame_done, None
        if done is not None:
            done()

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
        if self.loop is not None:
            self._check_tokens(force=True)

    def _reload_tls(self) -> None:
        """Load tls_cert_file and tls_key_file again into the context the listener uses: new
        handshakes get the new certificate, open connections keep the one they negotiated."""
        if self.tls is None:
            return
        old = self.certificate
        try:
            self.certificate = tls.reload(self.tls, self.config)
        except ConfigError as exc:  # names the setting and the file; the old certificate stays
            logs.event(logging.ERROR, "tls_reload_failed", error=str(exc), kept=old.sha256)
            return
        except Exception:  # a reload never takes the broker down
            logs.log.exception("tls_reload_failed", extra={"fields": {"kept": old.sha256}})
            return
        logs.event(logging.INFO, "tls_reloaded", cert=self.certificate.cert_file, sha256=self.certificate.sha256, previous=old.sha256)

    def on_disconnected(self, conn: Connection) -> None:
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
        logs.event(logging.WARNING, "operator_action", action="close_connection", operator=operator, conn=conn_id, user=conn.user, peer=conn.peer)
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
            if conn.user == user and conn.state == OPEN and conn.session.end_subscription(pattern, "unsubscribed by an operator"):
                ended += 1
        logs.event(logging.WARNING, "operator_action", action="unsubscribe_user", operator=operator, user=user, subscription=pattern, connections=ended)
        return ended

    # authentication

    def revoke(self, line: str) -> tuple[int, str | None]:
        """Put a revocation rule in force at once (broker.revocation; the admin API): every
        open connection whose token it revokes is closed with 4003 now. Returns how many were
        closed and the denylist file it was appended to (None: held in memory). Raises
        OSError when the file cannot be written (the rule is in force all the same)."""
        try:
            saved = self.auth.revoke(line)
        finally:
            closed = self._check_tokens()
        logs.event(logging.WARNING, "tokens_revoked", rule=line, closed=closed, saved=saved or "memory")
        return closed, saved

    def _check_tokens(self, force: bool = False) -> int:
        """Read the JWKS and denylist files again if they changed; close the connections whose
        token was revoked or expired (within a sweep period of the moment). Returns how many
        were closed as revoked."""
        auth = self.auth
        if not auth.enabled:
            return 0
        try:
            auth.refresh(force)
        except Exception as exc:  # a broken file keeps what was read before
            logs.event(logging.ERROR, "auth_files_unreadable", reason=str(exc))
        now = time.time()
        revoked = 0
        for conn in list(self.connections.values()):
            session = conn.session
            if conn.state != OPEN or session is None:
                continue
            identity = session.identity
            if auth.revoked(identity):
                logs.event(logging.WARNING, "token_revoked", conn=conn.id, user=identity.user, peer=conn.peer)
                conn.close(CloseCode.TOKEN_REVOKED, "token revoked")
                revoked += 1
            elif identity.expires is not None and now >= identity.expires:
                logs.event(logging.INFO, "token_expired", conn=conn.id, user=identity.user, peer=conn.peer)
                conn.close(CloseCode.TOKEN_EXPIRED, "token expired")
        return revoked

    # per-tick flush

    def _request_tick(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self.loop.call_soon(self._tick)

    def queue(self, conn: Connection) -> None:
        """`conn` has more to handle than this tick's budget allows: stop reading it and resume
        it, in order, in a following tick."""
        conn.suspend_reading()
        self._waiting.append(conn)
        self._request_tick()

    def _tick(self) -> None:
        self._tick_scheduled = False
        self.ticks += 1
        router = self.router
        touched, slow = router.flush()
        for box in slow:
            self._slow_consumer(box)
        if touched:
            now = self.loop.time()
            pressure = self.pressure
            lagging = pressure.lagging
            account = pressure.account
            shared: dict = {}
            sizes: dict = {}
            max_frame = self.config.max_outbound_frame_bytes
            for box in touched:
                box.scheduled = False
                if box.closed:
                    continue
                conn = box.owner
                shedding = conn.session.shedding
                if box.paused:
                    if box.keep():  # this tick's share of its node waits with the rest
                        self._slow_consumer(box)
                        continue
                else:
                    try:
                        if shedding is not None:
                            self._write_within(box, conn, shedding, max_frame, shared, sizes, now)
                        else:
                            data = box.take(max_frame, shared)
                            if conn.pong is not None:  # a pong owed leaves with the tick's one write
                                data = conn.take_pong() + data
                            if data:
                                conn.write(data)
                                conn.last_sent = now
                                conn.bytes_out += len(data)
                                self.writes += 1
                                self.bytes_out += len(data)
                                box.transport_bytes = conn.buffer_size()
                    except Exception:  # never leave the other connections of this tick unwritten
                        logs.log.exception("write failed", extra={"fields": {"conn": conn.id}})
                        conn.abort()
                        continue
                backlog = box.size + box.transport_bytes
                if shedding is not None:
                    if backlog > box.limit and box.size:
                        backlog = self._shed(box, shedding)
                    if backlog or shedding.held or box in lagging:
                        account(box, backlog + shedding.held_bytes)
                elif backlog or box in lagging:
                    account(box, backlog)
                if (backlog > box.limit or box.over_since) and pressure.judge(box, backlog, now):
                    self._slow_consumer(box)
            if pressure.over():
                self._publishers(pressure.memory(now))
        if router.replaying:  # replays waiting for room go on as their connections drain
            router.continue_replays()
        router.end_tick()
        router.new_tick()
        self._arm_request_timer()
        waiting = self._waiting
        for _ in range(len(waiting)):
            waiting.popleft().resume()
            if router.busy:
                break
        if waiting:
            self._request_tick()

    def _publishers(self, action: int) -> None:
        """Do what the memory bound decided: stop reading from every connection that
        publishes (HOLD) or read from them again (RELEASE)."""
        if action == HOLD:
            logs.event(logging.WARNING, "holding publishers", pending_bytes=self.pressure.total, limit=self.pressure.max_total)
            for conn in self.connections.values():
                if conn.session is not None and conn.session.published:
                    conn.hold()
        elif action == RELEASE:
            logs.event(logging.INFO, "releasing publishers", pending_bytes=self.pressure.total)
            for conn in self.connections.values():
                if conn.held:
                    conn.release()

    def _recount(self) -> None:
        """Read every lagging connection's backlog again (transports drain between writes),
        then apply the memory bound."""
        pressure = self.pressure
        for box in list(pressure.lagging):
            conn = box.owner
            if box.closed or conn.state != OPEN:
                pressure.account(box, 0)
                continue
            box.transport_bytes = conn.buffer_size()
            shedding = conn.session.shedding
            pressure.account(box, box.size + box.transport_bytes + (shedding.held_bytes if shedding is not None else 0))
        now = self.loop.time()
        if pressure.over():
            self._publishers(pressure.memory(now))
        overdue = pressure.overdue(now)
        if overdue:
            for box in overdue:
                self._slow_consumer(box)
            self._publishers(pressure.memory(now))
        if pressure.holding:  # publishers that started since are held too
            for conn in self.connections.values():
                if not conn.held and conn.session is not None and conn.session.published:
                    conn.hold()

    # dead letters

    def dead_letter_path(self) -> str:
        """Where the kept dead letters are written (`broker dead-letters` reads them)."""
        worker = os.environ.get("BROKER_WORKER_INDEX")  # set by the worker supervisor
        path = self.config.dead_letter_file
        if not path:
            return dead_letter_path(self.port, worker)
        if worker is None:
            return path
        stem, ext = os.path.splitext(path)  # each worker keeps its own file
        return f"{stem}-w{worker}{ext}"

    def _write_dead_letters(self) -> None:
        """Log the dead letters that came since the last call (the newest ten of them, then
        how many more) and write the kept ones to the dead-letter file, off the loop."""
        count = self.router.stats.dead_letters
        new = count - self._dead_letters_seen
        if not new:
            return
        self._dead_letters_seen = count
        letters = list(self.router.requests.dead_letters)
        for letter in letters[-min(new, DEAD_LETTERS_LOGGED) :]:
            logs.event(
                logging.WARNING, "dead_letter", conn=letter.conn, peer=letter.peer, id=letter.request_id,
                code=letter.code, reason=letter.reason, head=letter.head,
            )
        if new > DEAD_LETTERS_LOGGED:
            logs.event(logging.WARNING, "dead_letters_not_logged", count=new - DEAD_LETTERS_LOGGED)
        path = self.dead_letter_path()
        refusal = foreign_file(path)
        if refusal is not None:
            if refusal != self._dead_letter_refusal:  # once, not at every sweep
                logs.event(logging.ERROR, "dead_letter_file_refused", path=path, reason=refusal, setting="dead_letter_file")
            self._dead_letter_refusal = refusal
            return
        self._dead_letter_refusal = None
        text = "".join(json.dumps(letter._asdict()) + "\n" for letter in letters)
        self.loop.run_in_executor(None, _write_file, path, text)

    def _arm_request_timer(self) -> None:
        """Have a timer at the earliest deadline of a waiting request (one timer in all)."""
        deadline = self.router.requests.next_deadline
        timer = self._request_timer
        if deadline is None or (timer is not None and self._request_timer_at <= deadline):
            return
        if timer is not None:
            timer.cancel()
        self._request_timer_at = deadline
        self._request_timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._expire_requests)

    def _expire_requests(self) -> None:
        self._request_timer = None
        self.router.requests.expire_requests()
        self._arm_request_timer()

    def _write_within(self, box, conn, shedding, max_frame: int, shared: dict, sizes: dict, now: float) -> None:
        """Write a connection whose policies shed at most half of max_pending_bytes at a time,
        again while its socket takes everything at once (its transport pauses as soon as it
        holds anything, see Connection.bound_writes): what the socket does not take waits in
        the broker, where shedding reaches it. Only such a connection with more than that
        waiting in one iteration is written more than once in it."""
        budget = box.limit // 2
        data = shedding.take(box, budget, max_frame, shared, sizes)
        if conn.pong is not None:
            data = conn.take_pong() + data
        while data:
            conn.write(data)
            conn.last_sent = now
            conn.bytes_out += len(data)
            self.writes += 1
            self.bytes_out += len(data)
            if box.paused or not (box.size or shedding.held):
                break
            data = shedding.take(box, budget, max_frame, shared, sizes)
        box.transport_bytes = conn.buffer_size()

    def _shed(self, box, shedding) -> int:
        """Drop or conflate what the connection's policies allow of its queue in the broker,
        down to half of max_pending_bytes (less when its transport holds more than the other
        half); returns its backlog after that (what conflation holds, one message per topic,
        is not part of it)."""
        box.keep()
        shedding.shed(box, max(0, min(box.limit // 2, box.limit - box.transport_bytes)))
        return box.size + box.transport_bytes

    def _slow_consumer(self, box) -> None:
        """Close the connection of `box`, judged a slow consumer (broker.pressure)."""
        self.pressure.forget(box)
        conn = box.owner
        if conn.state != OPEN:
            return
        self.router.stats.slow_consumers += 1
        pending = box.pending
        logs.event(logging.WARNING, "slow_consumer", conn=conn.id, pending=pending, limit=box.limit)
        conn.close(CloseCode.SLOW_CONSUMER, f"slow consumer: {pending} bytes pending, limit {box.limit}")

    # liveness

    def _sweep(self) -> None:
        """Ping idle clients, disconnect those that do not answer, close connections that
        stayed behind or left a frame incomplete for frame_timeout_s, and forget history past
        its age. Runs a few times a second;
        O(connections) plus the history that expired."""
        now = self.loop.time()
        self.loop_lag.observe(now - self._sweep_due, now)
        self.backplane.sweep()
        self._check_tokens()
        self.router.retire_idle(int(self.config.topic_idle_s * 1000))
        if self.router.replaying:
            self.router.continue_replays()
        self.guard.sweep()
        self.fallback.sweep(self.loop.time())
        self._recount()
        self._write_dead_letters()
        now = self.loop.time()
        cfg = self.config
        interval, timeout = cfg.ping_interval_s, cfg.ping_timeout_s
        frame_timeout = cfg.frame_timeout_s
        wall_ms = int(time.time() * 1000)
        for conn in list(self.connections.values()):
            if conn.state != OPEN:
                continue
            heartbeat = conn.session.heartbeat_ms
            if heartbeat and (now - conn.last_sent) * 1000 >= heartbeat and not conn.box.scheduled:
                self.router.send(conn.box, encode(Heartbeat(wall_ms)))
                conn.last_sent = now  # written at the end of this iteration
            if conn.held:
                continue  # a held connection is not read: its pongs wait with the rest
            if conn.partial_since and now - conn.partial_since >= frame_timeout:
                conn.frame_expired(frame_timeout)  # a frame started and not finished (slowloris)
                continue
            if conn.ping_sent:
                if conn.last_seen > conn.ping_sent:
                    conn.ping_sent = 0.0
                elif now - conn.ping_sent >= timeout:
                    conn.close(CloseCode.GOING_AWAY, f"peer has not replied to ping/heartbeat request within {timeout:g} second(s)")
            elif now - conn.last_seen >= interval:
                conn.ping(now)
        pressure = self.pressure
        for box in list(pressure.behind):
            conn = box.owner
            if box.closed or conn.state != OPEN:
                pressure.behind.discard(box)
                continue
            box.transport_bytes = conn.buffer_size()
            backlog = box.size + box.transport_bytes
            shedding = conn.session.shedding
            if backlog > box.limit and box.size and shedding is not None:
                backlog = self._shed(box, shedding)
            if pressure.judge(box, backlog, now):
                self._slow_consumer(box)
        self._sweep_due = self.loop.time() + self._sweep_period
        self._sweeper = self.loop.call_later(self._sweep_period, self._sweep)


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
