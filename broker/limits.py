"""Limits on what one client, one address or one user may take, and the audit log of violations.

Rates are enforced with token buckets (broker.buckets: `TokenBucket`, and the buckets an
address's or a user's connections share).

- `Guard`: the server's registry of admitted connections (how many in all, per IP address, in
  the handshake phase, and per user), the rate buckets shared by all of a user's connections
  and the new-topic bucket shared by all connections from one address, and the bounded audit
  log. A connection is counted from its TCP accept, before a
  byte of it is read: `max_connections` and `max_handshakes` 503, `max_connections_per_ip` and
  `max_handshakes_per_ip` 429; it leaves the handshake phase when its upgrade is accepted. Once
  the request passed the handshake's rules (broker.server.handshake.Rules) and its token is
  checked: `max_connections_per_user` 429 (a `LimitRefused`, which is a `HandshakeError`).
- `ConnectionLimits`: one connection's admission and its share of the publish and new-topic
  rates, and its rate of `auth` messages. A session asks it before every `pub` and `req`
  (`check`) and every `auth` (`check_auth`), and calls the compiled
  fire-and-forget path through it (`fast_publish`); a refusal is `err` 15 (RATE_LIMITED), and
  `rate_limit_close_after` refusals in a row within 10 s close the connection with 1008.

Violations go to the audit log (broker.audit.AuditLog), bounded per connection (or address)
and per kind of event. The module is part of the sans-I/O core: the server hands it its log
function and its connections (anything with `id`, `peer`, `transport` and `close`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from .audit import AuditLog
from .buckets import AddressBuckets, TokenBucket, UserBuckets, amount, plural
from .config import Config
from .errors import CloseCode, ErrorCode, HandshakeError, RequestError
from .fastpath import fast_publish as _fast_publish

# Refusals in a row that close a connection (rate_limit_close_after) must fall within this
# many seconds of the first one; a longer streak starts counting again.
ABUSE_WINDOW_S = 10.0


class LimitRefused(HandshakeError):
    """A connection refused by a limit: 503 (max_connections, max_handshakes) or 429 (per IP,
    per user). `limit` names the setting."""

    def __init__(self, status: int, text: str, limit: str) -> None:
        super().__init__(status, text, setting=limit)
        self.limit = limit


class LimitStats:
    """Counters of the limits, by setting name; read by tests and logs."""

    __slots__ = ("refused", "rate_limited", "abuse_closes", "audit_suppressed")

    def __init__(self) -> None:
        # connections refused, by the setting that refused them: max_connections, max_connections_per_ip,
        # max_handshakes, max_handshakes_per_ip, allowed_origins, max_connections_per_user
        self.refused: dict[str, int] = {}
        # messages refused with err 15: publish_rate, user_publish_rate, new_topic_rate, ip_new_topic_rate, user_new_topic_rate
        self.rate_limited: dict[str, int] = {}
        self.abuse_closes = 0  # connections closed with 1008 for refusals in a row
        self.audit_suppressed = 0  # audit lines left out (counted in their summary lines)


class ConnectionLimits:
    """One admitted connection: where from, whose, and the token buckets its publishes are
    charged to: its own (made at its first publish, full), its user's, shared with the user's
    other connections, and for new topics its address's, shared with the other connections
    from that address."""

    __slots__ = (
        "guard",
        "owner",
        "ip",
        "user",
        "handshaking",
        "own_publish",
        "user_publish",
        "own_new",
        "ip_new",
        "user_new",
        "own_auth",
        "streak",
        "streak_start",
    )

    def __init__(self, guard: Guard, ip: str, owner: Any = None) -> None:
        self.guard = guard
        self.owner = owner  # the connection (its id and peer are logged; closed with 1008 for abuse)
        self.ip: str | None = ip  # None once released
        self.user: str | None = None
        self.handshaking = False  # counted in the handshake phase (max_handshakes, max_handshakes_per_ip)
        self.own_publish: TokenBucket | None = None
        self.user_publish: TokenBucket | None = None
        self.own_new: TokenBucket | None = None
        self.ip_new: TokenBucket | None = None
        self.user_new: TokenBucket | None = None
        self.own_auth: TokenBucket | None = None
        self.streak = 0  # messages refused in a row
        self.streak_start = 0.0

    @property
    def released(self) -> bool:
        return self.ip is None

    @property
    def conn_id(self) -> object:
        return None if self.owner is None else self.owner.id

    @property
    def peer(self) -> str:
        return (self.ip or "") if self.owner is None else self.owner.peer

    def fast_publish(self, data: Any, topics_by_key: dict, max_payload: int, most: int, dirty: list) -> int:
        """`fastpath.fast_publish` (same arguments and result) held to the connection's publish
        rates: it is given as its largest frame the messages the connection may publish now, so
        a frame with more falls back to the general path (-1), where `check` takes its
        messages one by one; what it publishes is charged. On the path of every frame:
        written for speed."""
        bucket = self.own_publish
        if bucket is not None:
            now = bucket.clock()
            tokens = bucket.tokens
            if now > bucket.stamp:
                tokens += (now - bucket.stamp) * bucket.rate
                if tokens > bucket.burst:
                    tokens = bucket.burst
                bucket.tokens = tokens
                bucket.stamp = now
            if tokens < most:
                most = int(tokens)
        elif self.guard.publish_burst < most and self.guard.publish_rate:
            most = int(self.guard.publish_burst)  # its bucket is full until it is made, at its first publish
        user = self.user_publish
        if user is not None:
            tokens = user.level()
            if tokens < most:
                most = int(tokens)
        count = _fast_publish(data, topics_by_key, max_payload, most, dirty)
        if count > 0:
            if bucket is not None:
                bucket.tokens -= count
            elif self.guard.publish_rate:
                bucket = self.own_publish = self.guard.bucket("publish_rate")
                bucket.tokens -= count
            if user is not None:
                user.tokens -= count
            self.streak = 0
        return count

    def check(self, request_id: int, topic: str | None = None, topics: Any = ()) -> None:
        """Charge one `pub` or `req` (a `pub` to a topic not in `topics` also creates one) or
        raise RequestError(RATE_LIMITED) and charge nothing."""
        guard = self.guard
        now = guard.clock()
        own = self.own_publish
        if own is None and guard.publish_rate:
            own = self.own_publish = guard.bucket("publish_rate")
        user = self.user_publish
        if own is not None and own.level(now) < 1.0:
            self._refused(own, request_id, now)
        if user is not None and user.level(now) < 1.0:
            self._refused(user, request_id, now)
        if topic is not None and (guard.new_topic_rate or self.ip_new is not None or self.user_new is not None) and topic not in topics:
            own_new = self.own_new
            if own_new is None and guard.new_topic_rate:
                own_new = self.own_new = guard.bucket("new_topic_rate")
            ip_new, user_new = self.ip_new, self.user_new
            for bucket in (own_new, ip_new, user_new):
                if bucket is not None and bucket.level(now) < 1.0:
                    self._refused(bucket, request_id, now)
            for bucket in (own_new, ip_new, user_new):
                if bucket is not None:
                    bucket.tokens -= 1.0
        if own is not None:
            own.tokens -= 1.0
        if user is not None:
            user.tokens -= 1.0
        self.streak = 0

    def check_auth(self, request_id: int) -> None:
        """Charge one `auth` message (a token to check) or raise RequestError(RATE_LIMITED),
        before the token is looked at. Anonymous connections are charged alike."""
        guard = self.guard
        if not guard.auth_message_rate:
            return
        now = guard.clock()
        bucket = self.own_auth
        if bucket is None:
            bucket = self.own_auth = guard.bucket("auth_message_rate")
        if bucket.level(now) < 1.0:
            self._refused(bucket, request_id, now)
        bucket.tokens -= 1.0
        self.streak = 0

    def _refused(self, bucket: TokenBucket, request_id: int, now: float) -> None:
        guard = self.guard
        stats = guard.stats.rate_limited
        stats[bucket.name] = stats.get(bucket.name, 0) + 1
        user = self.user
        conn_id, peer = self.conn_id, self.peer
        guard.audit.record(
            conn_id,
            "rate_limited",
            {"conn": conn_id, "peer": peer, "user": user},
            conn=conn_id,
            peer=peer,
            user=user,
            limit=bucket.name,
            id=request_id,
            reason=bucket.text,
        )
        if not self.streak or now - self.streak_start > ABUSE_WINDOW_S:
            self.streak = 0
            self.streak_start = now
        self.streak += 1
        if self.streak == guard.close_after and self.owner is not None:
            reason = f"rate limit abuse: {self.streak} messages refused in a row ({bucket.name})"
            guard.stats.abuse_closes += 1
            guard.audit.record(
                ("close", conn_id),
                "rate_limit_close",
                {"conn": conn_id, "peer": peer, "user": user},
                conn=conn_id,
                peer=peer,
                user=user,
                code=int(CloseCode.POLICY_VIOLATION),
                reason=reason,
            )
            self.owner.close(CloseCode.POLICY_VIOLATION, reason)
        raise RequestError(ErrorCode.RATE_LIMITED, bucket.text, request_id)


def _ip_of(conn: Any) -> str:
    transport = getattr(conn, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer) if peer else conn.peer.rpartition(":")[0]


class Guard:
    """The server's limits on connections and rates (see the module's docstring).

    The registry, for any caller: `admit(ip, user)` -> ConnectionLimits, `add_user(limits,
    user)`, `release(limits)`. The server's hooks, with its Connection objects: `accept(conn)`
    (in all, per IP, in the handshake phase: at TCP accept), `admit_user(conn, user)` (per
    user, once the user is known), `opened(conn)` (the handshake phase is over),
    `refused(error, peer)` (a refusal by another rule, counted and audited like the limits'),
    `limiter(conn)` (what the connection's session checks), `connection_lost(conn)` and
    `sweep()`."""

    def __init__(self, config: Config, *, log: Callable[..., None], clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.close_after = config.rate_limit_close_after
        self.rated = bool(
            config.publish_rate
            or config.user_publish_rate
            or config.new_topic_rate
            or config.ip_new_topic_rate
            or config.user_new_topic_rate
            or config.auth_message_rate
        )
        self.publish_rate = config.publish_rate
        self.publish_burst = config.publish_burst
        self.new_topic_rate = config.new_topic_rate
        self.auth_message_rate = config.auth_message_rate
        # a connection's own buckets: (rate, burst, what a refused client is told), by setting
        self._buckets = {
            "publish_rate": (
                config.publish_rate,
                config.publish_burst,
                f"rate limited: a connection may publish {plural(config.publish_rate, 'message')} a second "
                f"(publish_rate, burst {amount(config.publish_burst)})",
            ),
            "new_topic_rate": (
                config.new_topic_rate,
                config.new_topic_burst,
                f"rate limited: a connection may create {plural(config.new_topic_rate, 'new topic')} a second "
                f"(new_topic_rate, burst {amount(config.new_topic_burst)})",
            ),
            "auth_message_rate": (
                config.auth_message_rate,
                config.auth_message_burst,
                f"rate limited: a connection may send {plural(config.auth_message_rate, 'auth message')} a second "
                f"(auth_message_rate, burst {amount(config.auth_message_burst)}); the token was not checked",
            ),
        }
        self.total = 0  # connections admitted and not yet gone
        self.per_ip: dict[str, int] = {}
        self.handshakes = 0  # of them, connections in the handshake phase (TLS and the upgrade request)
        self.handshakes_per_ip: dict[str, int] = {}
        self.users: dict[str, UserBuckets] = {}
        self._idle_users: set[str] = set()  # users without connections whose buckets are not full yet
        # addresses with connections, or whose new-topic bucket is not full yet (only while
        # ip_new_topic_rate is set: the count of connections is per_ip)
        self.addresses: dict[str, AddressBuckets] = {}
        self._idle_addresses: set[str] = set()
        self.connections: dict[object, ConnectionLimits] = {}  # by connection id
        self.stats = LimitStats()
        self.audit = AuditLog(log, clock, stats=self.stats)

    def bucket(self, name: str) -> TokenBucket:
        """A new, full bucket of one connection for the setting `name` (publish_rate, new_topic_rate)."""
        rate, burst, text = self._buckets[name]
        return TokenBucket(rate, burst, self.clock, name, text)

    # the registry

    def admit(self, ip: str, user: str | None = None, *, owner: Any = None) -> ConnectionLimits:
        """Count a new connection from `ip` (and of `user`, if known) or raise LimitRefused:
        503 at max_connections, 429 at max_connections_per_ip or max_connections_per_user.
        `owner` is the connection (with `id`, `peer` and `close(code, reason)`), if any."""
        cfg = self.config
        if self.total >= cfg.max_connections:
            self._refuse(
                503,
                "max_connections",
                f"the broker holds {plural(self.total, 'connection')}, its limit (max_connections); try again later",
                ip,
                owner,
                user,
            )
        count = self.per_ip.get(ip, 0)
        if count >= cfg.max_connections_per_ip:
            self._refuse(
                429,
                "max_connections_per_ip",
                f"{plural(count, 'connection')} from {ip}, the limit (max_connections_per_ip)",
                ip,
                owner,
                user,
            )
        ip = sys.intern(ip)  # one string per address, however many connections it has
        limits = ConnectionLimits(self, ip, owner)
        self.total += 1
        self.per_ip[ip] = count + 1
        if cfg.ip_new_topic_rate:
            address = self.addresses.get(ip)
            if address is None:
                address = self.addresses[ip] = AddressBuckets(ip, cfg, self.clock)
            address.connections += 1
            self._idle_addresses.discard(ip)
            limits.ip_new = address.new_topic
        if user is not None:
            try:
                self.add_user(limits, user)
            except LimitRefused:
                self.release(limits)
                raise
        return limits

    def add_user(self, limits: ConnectionLimits, user: str) -> None:
        """Count an admitted connection as `user`'s (429 past max_connections_per_user) and
        charge its publishes to the user's buckets too. Idempotent for the same user."""
        ip = limits.ip
        if limits.user == user or ip is None:  # the same user, or released
            return
        if limits.user is not None:
            self._drop_user(limits)
        entry = self.users.get(user)
        count = entry.connections if entry is not None else 0
        if count >= self.config.max_connections_per_user:
            self._refuse(
                429,
                "max_connections_per_user",
                f"user {user!r} has {plural(count, 'connection')}, the limit (max_connections_per_user)",
                ip,
                limits.owner,
                user,
            )
        if entry is None:
            entry = self.users[user] = UserBuckets(user, self.config, self.clock)
        entry.connections += 1
        self._idle_users.discard(user)
        limits.user = user
        limits.user_publish = entry.publish
        limits.user_new = entry.new_topic

    def release(self, limits: ConnectionLimits) -> None:
        """The connection is gone (or was refused after admission); idempotent."""
        ip = limits.ip
        if ip is None:
            return
        self._end_handshake(limits)
        limits.ip = None
        self.total -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]
        address = self.addresses.get(ip)
        if address is not None:
            limits.ip_new = None
            address.connections -= 1
            if not address.connections:
                # kept until its bucket is full again: reconnecting must not refill it
                if address.full(self.clock()):
                    del self.addresses[ip]
                else:
                    self._idle_addresses.add(ip)
        if limits.user is not None:
            self._drop_user(limits)

    def _drop_user(self, limits: ConnectionLimits) -> None:
        user = limits.user
        if user is None:  # counted under no user
            return
        entry = self.users[user]
        entry.connections -= 1
        limits.user = None
        limits.user_publish = limits.user_new = None
        if not entry.connections:
            # kept until its buckets are full again: reconnecting must not refill them
            if entry.full(self.clock()):
                del self.users[user]
            else:
                self._idle_users.add(user)

    def _refuse(self, status: int, limit: str, text: str, ip: str, owner: Any, user: str | None) -> None:
        conn_id, peer = (None, ip) if owner is None else (owner.id, owner.peer)
        refused = self.stats.refused
        refused[limit] = refused.get(limit, 0) + 1
        self.audit.record(
            ("ip", ip),
            "handshake_refused",
            {"peer": ip},
            conn=conn_id,
            peer=peer,
            user=user,
            status=status,
            limit=limit,
            reason=text,
        )
        raise LimitRefused(status, text, limit)

    def _end_handshake(self, limits: ConnectionLimits) -> None:
        ip = limits.ip
        if not limits.handshaking or ip is None:  # (released ends the handshake phase first)
            return
        limits.handshaking = False
        self.handshakes -= 1
        left = self.handshakes_per_ip[ip] - 1
        if left:
            self.handshakes_per_ip[ip] = left
        else:
            del self.handshakes_per_ip[ip]

    # the server's hooks

    def accept(self, conn: Any) -> None:
        """At TCP accept, before a byte of the connection is read (with TLS, before its TLS
        handshake): count it in all, from its address and in the handshake phase, or raise
        LimitRefused, in this order: max_connections (503), max_connections_per_ip (429),
        max_handshakes (503), max_handshakes_per_ip (429). A client that connects and stays
        silent holds a counted connection until handshake_timeout_s closes it."""
        ip = sys.intern(_ip_of(conn))  # the string admit keeps (it interns it too)
        limits = self.admit(ip, owner=conn)
        cfg = self.config
        if self.handshakes >= cfg.max_handshakes:
            self.release(limits)
            self._refuse(
                503,
                "max_handshakes",
                f"{plural(self.handshakes, 'connection')} are in their handshake, the limit (max_handshakes); try again later",
                ip,
                conn,
                None,
            )
        count = self.handshakes_per_ip.get(ip, 0)
        if count >= cfg.max_handshakes_per_ip:
            self.release(limits)
            self._refuse(
                429,
                "max_handshakes_per_ip",
                f"{plural(count, 'connection')} from {ip} are in their handshake, the limit (max_handshakes_per_ip)",
                ip,
                conn,
                None,
            )
        limits.handshaking = True
        self.handshakes += 1
        self.handshakes_per_ip[ip] = count + 1
        self.connections[conn.id] = limits

    def refused(self, error: HandshakeError, peer: str) -> None:
        """A request refused by a rule of the handshake (not a limit: those count and audit
        their own refusals): counted under its setting, if one refused it (allowed_origins), and
        written to the audit log, bounded per address."""
        ip = peer.rpartition(":")[0] or peer
        fields: dict[str, Any] = {"peer": peer, "status": error.status}
        if error.setting:
            refused = self.stats.refused
            refused[error.setting] = refused.get(error.setting, 0) + 1
            fields["limit"] = error.setting
        self.audit.record(("ip", ip), "handshake_refused", {"peer": ip}, **fields, reason=error.text)

    def opened(self, conn: Any) -> None:
        """The connection's upgrade was accepted: it leaves the handshake phase."""
        limits = self.connections.get(conn.id)
        if limits is not None:
            self._end_handshake(limits)

    def admit_user(self, conn: Any, user: str | None) -> None:
        """The connection belongs to `user` (None: anonymous): sets `conn.user`, counts it
        under max_connections_per_user (LimitRefused 429 past it, `conn.user` unchanged) and
        charges its publishes to the user's buckets too. Call it at the handshake once the
        request is authenticated; calling it again with the same user does nothing."""
        limits = self.connections.get(conn.id)
        if limits is not None:
            if user is None:
                if limits.user is not None:
                    self._drop_user(limits)
            else:
                self.add_user(limits, user)
        conn.user = user

    def limiter(self, conn: Any) -> ConnectionLimits | None:
        """What the connection's session checks publishes against (None: no rate is limited)."""
        return self.connections.get(conn.id) if self.rated else None

    def connection_lost(self, conn: Any) -> None:
        limits = self.connections.pop(conn.id, None)
        if limits is not None:
            self.release(limits)

    def sweep(self) -> None:
        """A few times a second: end the audit log's window, forget users and addresses without
        connections whose buckets refilled."""
        now = self.clock()
        if now - self.audit.start >= self.audit.window:
            self.audit.flush(now)
        if self._idle_users:
            for user in [u for u in self._idle_users if self.users[u].full(now)]:
                self._idle_users.discard(user)
                del self.users[user]
        if self._idle_addresses:
            for ip in [a for a in self._idle_addresses if self.addresses[a].full(now)]:
                self._idle_addresses.discard(ip)
                del self.addresses[ip]
