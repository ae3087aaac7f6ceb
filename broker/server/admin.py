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
the audit log instead, bounded per address and per second.

This module is the `Admin` server (its routes: health, metrics, the JSON API, the dashboard's
feed); who may ask is broker.server.adminguard, how the API's parameters are read is
broker.server.adminparams (their public names are re-exported here for the supervisor's admin
server, broker.cluster.group_admin)."""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import __version__
from ..errors import ErrorCode, ListenError, RequestError, describe_os_error
from ..messages import position_json
from ..revocation import rule_line
from . import dashboard
from .adminguard import HEALTH, PAGE, SHOWN, RequestLog, allowed_hosts, guard, host_allowed, json_error
from .adminparams import (
    MAX_CONNECTIONS_LIMIT,
    OPERATOR_HEADER,
    ConnectionQuery,
    connection_row,
    int_param,
    operator_of,
    publish_item,
    publish_status,
    subscription_body,
    topics_limit,
    user_param,
)
from .metrics import Collector

__all__ = [  # besides Admin, what the supervisor's admin server (broker.cluster.group_admin) uses
    "Admin",
    "HEALTH",
    "PAGE",
    "SHOWN",
    "MAX_BODY_BYTES",
    "MAX_WATCHERS",
    "HOT_TOPICS",
    "STATIC",
    "MAX_CONNECTIONS_LIMIT",
    "OPERATOR_HEADER",
    "ConnectionQuery",
    "allowed_hosts",
    "guard",
    "host_allowed",
    "int_param",
    "json_error",
    "topics_limit",
    "user_param",
]

MAX_BODY_BYTES = 16 << 20  # a publish request's body at most
MAX_WATCHERS = 16  # dashboards open at once (each costs a snapshot a second; the topics are measured once for all)
HOT_TOPICS = 10
STATIC = Path(__file__).resolve().parent / "static"
MAX_PUBLISH_MESSAGES = 10_000  # messages one publish request may carry


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
        self.hosts: frozenset[str] | None = allowed_hosts(config.admin_host, config.admin_host_names)
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
        self._closing = asyncio.Event()  # set by stop(); made again by each start

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
                except TimeoutError:
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
        return web.json_response(
            {"connections": query.page(matching), "total": len(matching), "offset": query.offset, "limit": query.limit}
        )

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
                topic, payload = publish_item(item, max_payload)
                router.publish_for(
                    topic,
                    payload,
                    lambda epoch, seq, f=future: f.done() or f.set_result(position_json(epoch, seq)),
                    lambda code, text, f=future: f.done() or f.set_result({"error": {"code": int(code), "text": text}}),
                )
            except RequestError as exc:
                future.set_result({"error": {"code": int(exc.code), "text": exc.text}})
        timeout = self.server.config.redis_timeout_s + 1
        try:
            results = await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            results = [
                f.result()
                if f.done()
                else {"error": {"code": int(ErrorCode.UNAVAILABLE), "text": "not confirmed in time; it may have been published"}}
                for f in waits
            ]
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
            return json_error(
                400,
                'a revocation is {"jti": str}, {"user": str}, {"user": str, "issued_before": unix_time} or {"issued_before": unix_time}',
            )
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
