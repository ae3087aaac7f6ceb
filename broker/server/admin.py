"""The admin HTTP server (aiohttp), on its own port and off unless `admin_port` is set:
`/healthz` (the process answers) and `/readyz` (it listens, is not shutting down, and with
Redis the backplane takes publishes) for orchestrators, to anyone; and with `admin_api_key`,
`/metrics` for Prometheus, the dashboard and the JSON API under `/api/` (stats, topics,
connections, closing a connection, server-side publish, revoking tokens), each request carrying the key as
`Authorization: Bearer KEY`.

Everything but health tells what flows through the broker (topic names, rates, users), so it
is guarded twice: the key, and the `Host` header, checked against the server's own names (a
page of another site whose name was made to resolve to this server, DNS rebinding, sends its
own name). What aiohttp would log about a malformed request, with a traceback, is one line of
the audit log instead, bounded per address and per second."""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import hmac
import ipaddress
import json
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import __version__
from ..errors import ErrorCode, ListenError, RequestError, describe_os_error
from ..messages import position_json
from ..topics import is_pattern, matches, validate_pattern
from ..revocation import rule_line
from . import dashboard
from .metrics import Collector

MAX_BODY_BYTES = 16 << 20  # a publish request's body at most
MAX_WATCHERS = 16  # dashboards open at once (each costs a snapshot a second; the topics are measured once for all)
HOT_TOPICS = 10
STATIC = Path(__file__).resolve().parent / "static"
MAX_PUBLISH_MESSAGES = 10_000  # messages one publish request may carry
# Answered to anyone: they tell whether the process lives and is ready, nothing about traffic.
HEALTH = frozenset({"/healthz", "/readyz"})
# The dashboard's page and script: static, no data in them; a browser loads them without the
# key, which the operator then gives the page (it sends it with its requests for data).
PAGE = frozenset({"/dashboard", "/dashboard/", "/dashboard/dashboard.js"})
# Host names every admin server answers to besides its own: IP addresses are always accepted
# (a page cannot have one as its name and make it resolve elsewhere).
LOOPBACK_NAMES = frozenset({"localhost"})
# Longest part of a refused Host header, or of a malformed request's error, quoted back or logged.
SHOWN = 100


class Admin:
    def __init__(self, server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(server))
        self.port: int | None = None
        self.where = ""  # host:port it listens on, for the start line
        self._runner: web.AppRunner | None = None
        config = server.config
        self.key = server.admin_api_key.encode()
        # the Host names it answers to (None: any; a worker's Unix socket, which only its
        # supervisor reaches, has no name to check)
        self.hosts: frozenset[str] | None = allowed_hosts(config.admin_host, config.admin_allowed_hosts)
        self.request_log = RequestLog(server.guard.audit)
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/api/topics", self.topics)
        app.router.add_get("/api/nodes", self.nodes)
        app.router.add_get("/api/connections", self.connections)
        app.router.add_post("/api/connections/{id}/close", self.close_connection)
        app.router.add_post("/api/users/{user}/disconnect", self.disconnect_user)
        app.router.add_post("/api/users/{user}/unsubscribe", self.unsubscribe_user)
        app.router.add_post("/api/publish", self.publish)
        app.router.add_post("/api/revocations", self.revoke)
        app.router.add_get("/dashboard", self.to_dashboard)
        app.router.add_get("/dashboard/", self.dashboard)
        app.router.add_get("/dashboard/dashboard.js", self.dashboard_js)
        app.router.add_get("/dashboard/events", self.events)
        self.app = app
        self.watchers = 0
        self.hot = dashboard.HotTopics()  # measured while a dashboard is open
        self._scanning: asyncio.TimerHandle | None = None
        self._closing: asyncio.Event | None = None

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        return await guard(request, handler, self.key, self.hosts)

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; raises ListenError naming them when that cannot be done."""
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app, access_log=None, logger=self.request_log)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(f"cannot listen on the admin port {host}:{port}: {describe_os_error(exc)}") from exc
        self.port = self._runner.addresses[0][1]
        self.where = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start_unix(self, path: str) -> None:
        """Listen on the Unix socket `path` (a worker's, asked by its supervisor, which checks
        the Host of the requests it passes on); raises ListenError naming it when that cannot
        be done."""
        self._closing = asyncio.Event()
        self.hosts = None
        self._runner = web.AppRunner(self.app, access_log=None, logger=self.request_log)
        await self._runner.setup()
        try:
            await web.UnixSite(self._runner, path).start()
        except OSError as exc:
            raise ListenError(f"cannot listen on the worker's admin socket {path}: {describe_os_error(exc)}") from exc
        self.where = f"unix:{path}"

    async def stop(self) -> None:
        if self._scanning is not None:
            self._scanning.cancel()
            self._scanning = None
        if self._closing is not None:
            self._closing.set()  # open dashboards' event streams end
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        server = self.server
        checks = {
            "listening": server.accepting_clients,
            "backplane": server.cluster is None or server.cluster.ready,
        }
        ready = all(checks.values())
        return web.json_response({"ready": ready, **checks, "state": server.state}, status=200 if ready else 503)

    # the dashboard: static files and one server-sent event a second

    async def to_dashboard(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/")

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "dashboard.html").read_bytes(), content_type="text/html", charset="utf-8")

    async def dashboard_js(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "dashboard.js").read_bytes(), content_type="text/javascript", charset="utf-8")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's feed: a JSON snapshot a second (what /metrics shows, and the
        hottest topics, measured a slice of topics at a time while a dashboard is open)."""
        if self.watchers >= MAX_WATCHERS:
            return json_error(503, f"{MAX_WATCHERS} dashboards are open already")
        self.watchers += 1
        if self._scanning is None:
            self._scan()
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            while not self._closing.is_set():
                snapshot = self.snapshot()
                await response.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
                try:
                    await asyncio.wait_for(self._closing.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            return response
        except ConnectionResetError:  # the dashboard went away: nothing failed
            return response
        finally:
            self.watchers -= 1

    def _scan(self) -> None:
        """One slice of the hot-topic measure, then the next one SLICE_INTERVAL_S later, for as
        long as a dashboard is open."""
        if not self.watchers or self._closing.is_set():
            self._scanning = None
            return
        loop = self.server.loop
        self.hot.scan(self.server.router.index.states, loop.time())
        self._scanning = loop.call_later(dashboard.SLICE_INTERVAL_S, self._scan)

    def snapshot(self) -> dict:
        """What a dashboard event says: counters the broker keeps, O(1) but for the hottest
        topics (HotTopics, kept apart)."""
        server = self.server
        stats = server.router.stats
        cluster = server.cluster
        return {
            "time": time.time(),
            "node": server.node,
            "version": __version__,
            "started": server.started,
            "instance": server.instance,
            "connections": len(server.connections),
            "published": stats.published,
            "delivered": stats.delivered,
            "topics": len(server.router.topics),
            "slow_consumers": stats.slow_consumers + stats.sheds,
            "pending_bytes": server.pending_total,
            "backplane_lag_ms": None if cluster is None else int(max(cluster.lags_s()) * 1000),
            "loop_lag_s": server.loop_lag.worst_recent(server.loop.time()),
            "hot": self.hot.hottest(HOT_TOPICS),
            "nodes": self.server.presence.view()["nodes"] if self.server.presence is not None else [],
        }

    # the JSON API

    async def stats(self, request: web.Request) -> web.Response:
        server = self.server
        stats = server.router.stats
        body = {
            "connections": len(server.connections),
            "connections_opened": server.opened,
            "topics": len(server.router.topics),
            "published": stats.published,
            "delivered": stats.delivered,
            "bytes_in": server.bytes_in,
            "bytes_out": server.bytes_out,
            "errors": {str(code): n for code, n in stats.errors.items()},
            "closes": {str(code): n for code, n in stats.closes.items()},
            "slow_consumers": stats.slow_consumers,
            "gaps": stats.gaps,
            "pending_bytes": server.pending_total,
            "backplane": "memory" if server.cluster is None else "redis",
        }
        return web.json_response(body)

    async def topics(self, request: web.Request) -> web.Response:
        """Topics, busiest first (by last sequence number), at most `limit` (default 100)."""
        limit = topics_limit(request)
        router = self.server.router
        states = heapq.nlargest(limit, router.topics.values(), key=lambda state: state.seq)
        rows = [
            {"topic": state.name, **position_json(state.epoch, state.seq), "subscribers": len(router.index.receivers(state.name))}
            for state in states
        ]
        return web.json_response({"topics": rows, "total": len(router.topics)})

    async def nodes(self, request: web.Request) -> web.Response:
        """Every node of the cluster, as they announce themselves in Redis (cluster/presence.py)."""
        return web.json_response(self.server.presence.view())

    async def connections(self, request: web.Request) -> web.Response:
        """The open connections, like NATS's /connz: filtered (user, peer, client,
        subscription), sorted, a page of them (offset, limit)."""
        query = ConnectionQuery.of(request)
        now = self.server.loop.time()
        rows = [connection_row(conn, now) for conn in list(self.server.connections.values())]
        matching = [row for row in rows if query.selects(row)]
        return web.json_response({"connections": query.page(matching), "total": len(matching), "offset": query.offset, "limit": query.limit})

    async def close_connection(self, request: web.Request) -> web.Response:
        conn_id = int_param(request.match_info["id"], "id", 0, 1 << 62)
        if not self.server.close_connection(conn_id, operator_of(request, self.hosts is None)):
            return json_error(404, f"no open connection {conn_id}")
        return web.json_response({"closed": conn_id})

    async def disconnect_user(self, request: web.Request) -> web.Response:
        """Close every open connection of a user (1008); audited."""
        user = user_param(request)
        return web.json_response({"user": user, "closed": self.server.disconnect_user(user, operator_of(request, self.hosts is None))})

    async def unsubscribe_user(self, request: web.Request) -> web.Response:
        """`{"subscription": PATTERN}`: end that subscription on every open connection of the
        user (each is told, `unsubscribed`); audited."""
        user = user_param(request)
        pattern = await subscription_body(request)
        ended = self.server.unsubscribe_user(user, pattern, operator_of(request, self.hosts is None))
        return web.json_response({"user": user, "subscription": pattern, "connections": ended})

    async def publish(self, request: web.Request) -> web.Response:
        """`{"topic": T, "data": BASE64}` (or `"text": STR`), or `{"messages": [those, ...]}`:
        each published as a WebSocket publish would be (topic rules, max_payload_bytes, the
        topic's sequence numbers); the answer lists per message `{"epoch", "epoch_str", "seq"}` or
        `{"error": {"code", "text"}}`, in order."""
        try:
            body = await request.json()
        except ValueError:
            return json_error(400, "the body is not JSON")
        single = not (isinstance(body, dict) and "messages" in body)
        items = [body] if single else body.get("messages")
        if not isinstance(items, list) or not items or len(items) > MAX_PUBLISH_MESSAGES:
            return json_error(400, f"messages: a list of 1 to {MAX_PUBLISH_MESSAGES} messages")
        loop = asyncio.get_running_loop()
        router = self.server.router
        max_payload = self.server.config.max_payload_bytes
        waits: list[asyncio.Future] = []
        for item in items:
            future = loop.create_future()
            waits.append(future)
            try:
                topic, payload = _message(item, max_payload)
                router.publish_for(
                    topic, payload,
                    lambda epoch, seq, f=future: f.done() or f.set_result(position_json(epoch, seq)),
                    lambda code, text, f=future: f.done() or f.set_result({"error": {"code": int(code), "text": text}}),
                )
            except RequestError as exc:
                future.set_result({"error": {"code": int(exc.code), "text": exc.text}})
        timeout = self.server.config.redis_timeout_s + 1
        try:
            results = await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except asyncio.TimeoutError:
            results = [f.result() if f.done() else {"error": {"code": int(ErrorCode.UNAVAILABLE), "text": "not confirmed in time; it may have been published"}} for f in waits]
        status = 200
        if single and "error" in results[0]:  # a status `curl --fail` and HTTP clients see
            status = publish_status(results[0]["error"]["code"])
        return web.json_response({"results": results}, status=status)


    async def revoke(self, request: web.Request) -> web.Response:
        """`{"jti": ID}`, `{"user": NAME}`, `{"user": NAME, "issued_before": UNIX_TIME}` or
        `{"issued_before": UNIX_TIME}`: revoke those tokens at once (open connections holding
        one are closed with 4003, handshakes and `auth` with one refused); appended to
        auth_denylist_file when there is one, else held by this process until it stops."""
        if not self.server.auth.enabled:
            return json_error(409, "authentication is off: there are no tokens to revoke")
        try:
            body = await request.json()
        except ValueError:
            return json_error(400, "the body is not JSON")
        if not isinstance(body, dict) or set(body) - {"jti", "user", "issued_before"}:
            return json_error(400, 'a revocation is {"jti": str}, {"user": str}, {"user": str, "issued_before": unix_time} or {"issued_before": unix_time}')
        jti, user, before = body.get("jti"), body.get("user"), body.get("issued_before")
        if not all(v is None or isinstance(v, str) and v for v in (jti, user)) or not (
            before is None or type(before) in (int, float) and 0 < before < 1e11
        ):
            return json_error(400, "jti and user are non-empty strings; issued_before is a Unix time in seconds")
        try:
            line = rule_line(jti, user, before)
        except ValueError as exc:
            return json_error(400, str(exc))
        try:
            closed, saved = self.server.revoke(line)
        except OSError as exc:
            path = self.server.config.auth_denylist_file
            return json_error(500, f"in force in this process, but not written to auth_denylist_file {path}: {exc.strerror or exc}")
        return web.json_response({"rule": line, "closed": closed, "saved": saved})


async def guard(request: web.Request, handler, key: bytes, hosts: frozenset[str] | None) -> web.StreamResponse:
    """The rule of every admin server (one process's, a worker's, the supervisor's): health
    answers anyone; everything else wants a Host of this server (`hosts`; None: any) and the
    key (the dashboard's static page and script only the Host). Every error is JSON with a
    reason."""
    path = request.path
    if path not in HEALTH:
        if hosts is not None:
            host = request.headers.get("Host")
            if not host_allowed(host, hosts):
                shown = "no Host header" if host is None else f"Host {host[:SHOWN]!r}"
                return json_error(403, f"{shown} is not a name of this admin server (admin_allowed_hosts)")
        if not key:
            return json_error(404, "only /healthz and /readyz answer without admin_api_key: set it to turn on /metrics, the dashboard and the API")
        if path not in PAGE:
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), key):
                return json_error(401, "this endpoint wants Authorization: Bearer <admin_api_key>", {"WWW-Authenticate": "Bearer"})
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)


def _message(item, max_payload: int) -> tuple[str, bytes]:
    if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
        raise RequestError(ErrorCode.BAD_MESSAGE, 'a message is {"topic": str, "data": base64} or {"topic": str, "text": str}')
    if "data" in item and isinstance(item["data"], str):
        try:
            payload = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(ErrorCode.BAD_MESSAGE, "data is not base64") from None
    elif "text" in item and isinstance(item["text"], str):
        payload = item["text"].encode()
    else:
        raise RequestError(ErrorCode.BAD_MESSAGE, 'a message carries "data" (base64) or "text"')
    if len(payload) > max_payload:
        raise RequestError(ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_payload}")
    return item["topic"], payload


# The HTTP status of a refused single-message publish, by the error code of docs/protocol.md
# (400 for the others): what the client sent is wrong (400, 413), or the broker cannot take it
# now (503: its topics are at max_topics, or Redis did not take it in time).
PUBLISH_STATUS = {
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_TOPICS: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.FORBIDDEN: 403,
}


def publish_status(code: int) -> int:
    return PUBLISH_STATUS.get(code, 400)


MAX_USER_CHARS = 256  # a user name in a path of the API, at most


def user_param(request: web.Request) -> str:
    """The user a path of /api/users/ names (percent-decoded), or a 400."""
    user = request.match_info["user"]
    if not user or len(user) > MAX_USER_CHARS:
        raise web.HTTPBadRequest(reason=f"user: 1 to {MAX_USER_CHARS} characters")
    return user


async def subscription_body(request: web.Request) -> str:
    """The `subscription` of a body `{"subscription": PATTERN}` (a topic or pattern), or a 400."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"subscription"} or not isinstance(body["subscription"], str):
        raise web.HTTPBadRequest(reason='the body is {"subscription": "TOPIC OR PATTERN"}')
    try:
        validate_pattern(body["subscription"], LONGEST_TOPIC)
    except RequestError as exc:
        raise web.HTTPBadRequest(reason=f"subscription: {exc.text}") from None
    return body["subscription"]


# The header in which the supervisor of workers passes on the address of the operator whose
# request it forwards (a worker's admin socket is reached by its supervisor only).
OPERATOR_HEADER = "Broker-Operator"


def operator_of(request: web.Request, forwarded: bool = False) -> str:
    """Who asked, for the log of operator actions: the address the request came from (the key
    is shared, so that is what tells operators apart); `forwarded` (a worker's admin socket):
    the address its supervisor got the request from."""
    if forwarded:
        return request.headers.get(OPERATOR_HEADER, "supervisor")[:SHOWN]
    return request.remote or ""


def connection_row(conn, now: float) -> dict:
    """What /api/connections says of one connection."""
    box, session = conn.box, conn.session
    return {
        "id": conn.id,
        "peer": conn.peer,
        "user": conn.user,
        "client": conn.client,
        "subscriptions": sorted(session.subscriptions) if session is not None else [],
        "queue_bytes": (box.size + box.transport_bytes) if box is not None else 0,
        "received": session.received if session is not None else 0,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "age_s": round(now - conn.opened_at, 3),
        "idle_s": round(now - conn.last_seen, 3),
    }


LONGEST_TOPIC = 4096  # the most max_topic_length may be: a longer filter matches nothing
# How /api/connections sorts (`sort=`): the row's field, and the default order (the largest
# first, but for the ids, in the order the connections came).
CONNECTION_SORTS = {
    "id": ("id", "asc"),
    "pending": ("queue_bytes", "desc"),
    "received": ("received", "desc"),
    "bytes_in": ("bytes_in", "desc"),
    "bytes_out": ("bytes_out", "desc"),
    "age": ("age_s", "desc"),
    "idle": ("idle_s", "desc"),
    "subscriptions": ("subscriptions", "desc"),
}


class ConnectionQuery:
    """The parameters of /api/connections (each checked, a 400 naming it otherwise), and the
    rule they make: which rows, in which order, which page. The supervisor of workers applies
    the same rule to the rows of all its workers."""

    def __init__(self, sort: str, order: str, offset: int, limit: int, user: str | None, peer: str | None,
                 client: str | None, subscription: str | None) -> None:
        self.sort, self.order, self.offset, self.limit = sort, order, offset, limit
        self.user, self.peer, self.client, self.subscription = user, peer, client, subscription

    @classmethod
    def of(cls, request: web.Request) -> "ConnectionQuery":
        q = request.query
        sort = q.get("sort", "id")
        if sort not in CONNECTION_SORTS:
            raise web.HTTPBadRequest(reason=f"sort is one of {', '.join(CONNECTION_SORTS)}")
        order = q.get("order", CONNECTION_SORTS[sort][1])
        if order not in ("asc", "desc"):
            raise web.HTTPBadRequest(reason="order is asc or desc")
        subscription = q.get("subscription")
        if subscription is not None:
            try:
                validate_pattern(subscription, LONGEST_TOPIC)
            except RequestError as exc:
                raise web.HTTPBadRequest(reason=f"subscription: {exc.text}") from None
        for name in ("user", "peer", "client"):
            if len(q.get(name, "")) > SHOWN * 4:
                raise web.HTTPBadRequest(reason=f"{name} is longer than {SHOWN * 4} characters")
        return cls(
            sort, order, int_param(q.get("offset", "0"), "offset", 0, 1 << 40), connections_limit(request),
            q.get("user"), q.get("peer"), q.get("client"), subscription,
        )

    def selects(self, row: dict) -> bool:
        """Whether a row passes the filters: `user` (exact), `peer` (the address, with or
        without its port), `client` (the name, or NAME/VERSION), `subscription` (the
        connection holds that subscription, or one that matches that topic)."""
        if self.user is not None and row["user"] != self.user:
            return False
        if self.peer is not None and row["peer"] != self.peer and row["peer"].rpartition(":")[0].strip("[]") != self.peer.strip("[]"):
            return False
        if self.client is not None:
            client = row["client"] or ""
            if client != self.client and client.partition("/")[0] != self.client:
                return False
        if self.subscription is not None:
            held = row["subscriptions"]
            if self.subscription not in held and (is_pattern(self.subscription) or not any(matches(p, self.subscription) for p in held)):
                return False
        return True

    def key(self, row: dict):
        field = CONNECTION_SORTS[self.sort][0]
        value = row[field]
        return (len(value) if field == "subscriptions" else value, row["id"])

    def page(self, rows: list[dict]) -> list[dict]:
        """`rows` in order, the page of them asked for."""
        ordered = sorted(rows, key=self.key, reverse=self.order == "desc")
        return ordered[self.offset : self.offset + self.limit]


def topics_limit(request: web.Request) -> int:
    """The `limit` of /api/topics: 1 to 100,000, default 100."""
    return int_param(request.query.get("limit", "100"), "limit", 1, 100_000)


MAX_CONNECTIONS_LIMIT = 1_000_000


def connections_limit(request: web.Request) -> int:
    """The `limit` of /api/connections: 1 to 1,000,000, default 1,000."""
    return int_param(request.query.get("limit", "1000"), "limit", 1, MAX_CONNECTIONS_LIMIT)


def int_param(text: str, name: str, low: int, high: int) -> int:
    """A query or path parameter as an integer within [low, high], or a 400 naming it."""
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} is not an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be within {low} and {high}")
    return value


def json_error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers)


def allowed_hosts(admin_host: str, setting: str) -> frozenset[str]:
    """The host names (lower case, no port) the admin server answers to, besides IP addresses:
    localhost, `admin_host` when it is a name, and the comma-separated `admin_allowed_hosts`
    (`*` in it: any name)."""
    names = set(LOOPBACK_NAMES)
    names.update(_name(part) for part in setting.split(",") if part.strip())
    if admin_host:
        names.add(_name(admin_host))
    return frozenset(names)


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    """True when a Host header names this server: an IP address (v4, or v6 in brackets), or one
    of `names` (with or without a port, in any case, with or without a final dot)."""
    if host is None:
        return False
    value = host.strip()
    if value.startswith("["):  # [v6]:port
        literal, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
        return _is_address(literal)
    name, sep, port = value.rpartition(":")
    if not sep:
        name = value
    elif not port.isdigit():
        return False
    name = _name(name)
    return bool(name) and (_is_address(name) or name in names or "*" in names)


def _name(text: str) -> str:
    return text.strip().lower().rstrip(".")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class RequestLog:
    """The logger aiohttp is given for the admin server. aiohttp logs every request it cannot
    parse or answer with a traceback (a dozen lines); here each is one `admin_request_failed`
    line of the audit log (broker.audit.AuditLog: at most a few lines per address and per
    second, the rest counted), with the address, the status and the first line of the reason.
    aiohttp's debug lines (bytes that are not HTTP at all) are left out."""

    def __init__(self, audit) -> None:
        self.audit = audit

    def exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def error(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def warning(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def info(self, message: str, *args, **kwargs) -> None:
        return None

    def debug(self, message: str, *args, **kwargs) -> None:
        return None

    def _line(self, message: str, args: tuple, exc_info) -> None:
        # "Error handling request from %s" names the peer; other messages name none
        peer = str(args[0]) if args and "%s" in message else ""
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(exc, HttpProcessingError):  # the request could not be parsed: 400, 413, ...
            status, text = exc.code, exc.message or str(exc)
        elif exc is not None:  # a handler failed: 500
            status, text = 500, f"{type(exc).__name__}: {exc}"
        else:
            status, text = 500, message.replace("%s", "").strip()
        lines = str(text).splitlines()
        reason = (lines[0] if lines else "")[:SHOWN]
        self.audit.record(("admin", peer), "admin_request_failed", {"peer": peer}, peer=peer, status=status, reason=reason)
