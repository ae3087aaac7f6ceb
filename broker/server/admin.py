"""The admin HTTP server (aiohttp), on its own port and off unless `admin_port` is set:
`/metrics` for Prometheus, `/healthz` (the process answers) and `/readyz` (it listens, is not
shutting down, and with Redis the backplane takes publishes) for orchestrators, and with
`admin_api_key` the JSON API under `/api/` (stats, topics, connections, closing a connection,
server-side publish), each request carrying the key as `Authorization: Bearer KEY`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..errors import CloseCode, ErrorCode, RequestError
from .metrics import Collector

MAX_BODY_BYTES = 16 << 20  # a publish request's body at most
MAX_PUBLISH_MESSAGES = 10_000  # messages one publish request may carry


class Admin:
    def __init__(self, server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(server))
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.key = server.config.admin_api_key.encode()
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/api/topics", self.topics)
        app.router.add_get("/api/connections", self.connections)
        app.router.add_post("/api/connections/{id}/close", self.close_connection)
        app.router.add_post("/api/publish", self.publish)
        self.app = app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """The API wants the key; every error is JSON with a reason."""
        if request.path.startswith("/api/"):
            if not self.key:
                return _error(404, "the admin API is off: set admin_api_key")
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.key):
                return _error(401, "the admin API wants Authorization: Bearer <admin_api_key>")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
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
            "listening": server.port is not None and not server._closing,
            "backplane": server.cluster is None or server.cluster.accepting,
        }
        ready = all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)

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
        limit = _int(request.query.get("limit", "100"), "limit", 1, 100_000)
        router = self.server.router
        states = sorted(router.topics.values(), key=lambda state: state.seq, reverse=True)[:limit]
        rows = [
            {"topic": state.name, "epoch": state.epoch, "seq": state.seq, "subscribers": len(router.index.receivers(state.name))}
            for state in states
        ]
        return web.json_response({"topics": rows, "total": len(router.topics)})

    async def connections(self, request: web.Request) -> web.Response:
        limit = _int(request.query.get("limit", "1000"), "limit", 1, 1_000_000)
        rows = []
        for conn in list(self.server.connections.values())[:limit]:
            box, session = conn.box, conn.session
            rows.append({
                "id": conn.id,
                "peer": conn.peer,
                "user": conn.user,
                "subscriptions": sorted(session.subscriptions) if session is not None else [],
                "queue_bytes": (box.size + box.transport_bytes) if box is not None else 0,
                "received": session.received if session is not None else 0,
            })
        return web.json_response({"connections": rows, "total": len(self.server.connections)})

    async def close_connection(self, request: web.Request) -> web.Response:
        conn_id = _int(request.match_info["id"], "id", 0, 1 << 62)
        conn = self.server.connections.get(conn_id)
        if conn is None:
            return _error(404, f"no open connection {conn_id}")
        conn.close(CloseCode.POLICY_VIOLATION, "closed by an operator")
        return web.json_response({"closed": conn_id})

    async def publish(self, request: web.Request) -> web.Response:
        """`{"topic": T, "data": BASE64}` (or `"text": STR`), or `{"messages": [those, ...]}`:
        each published as a WebSocket publish would be (topic rules, max_payload_bytes, the
        topic's sequence numbers); the answer lists per message `{"epoch", "seq"}` or
        `{"error": {"code", "text"}}`, in order."""
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        items = body.get("messages") if isinstance(body, dict) and "messages" in body else [body]
        if not isinstance(items, list) or not items or len(items) > MAX_PUBLISH_MESSAGES:
            return _error(400, f"messages: a list of 1 to {MAX_PUBLISH_MESSAGES} messages")
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
                    lambda epoch, seq, f=future: f.done() or f.set_result({"epoch": epoch, "seq": seq}),
                    lambda code, text, f=future: f.done() or f.set_result({"error": {"code": int(code), "text": text}}),
                )
            except RequestError as exc:
                future.set_result({"error": {"code": int(exc.code), "text": exc.text}})
        timeout = self.server.config.redis_timeout_s + 1
        try:
            results = await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except asyncio.TimeoutError:
            results = [f.result() if f.done() else {"error": {"code": int(ErrorCode.UNAVAILABLE), "text": "not confirmed in time; it may have been published"}} for f in waits]
        return web.json_response({"results": results})


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


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} is not an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be within {low} and {high}")
    return value


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)
