"""The admin port of `broker serve --workers N`, served by the supervisor for the whole group.

Each worker serves its own admin server (the one a single broker serves on admin_port) on a
Unix socket in a directory only the broker's user may open; the supervisor listens on
admin_host:admin_port and answers every request by asking the workers:

- /metrics: every worker's metrics, each series with a `worker` label (Prometheus sums them
  with `sum without (worker)`), and the supervisor's own broker_worker_up and
  broker_worker_starts;
- /healthz and /readyz: 200 when every worker answers (is ready), else 503 naming each;
- /api/...: stats summed, topics and connections combined, a connection closed by the worker
  holding it, a publish handed to one worker (the backplane takes it to all of them);
- /dashboard/: the same page, fed by the workers' event streams combined.

Nothing here is on the delivery path: a request costs one request per worker.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from .. import __version__
from ..config import Config, read_secret
from ..errors import ListenError, describe_os_error
from ..server import admin
from ..server.app import node_name, worker_of_connection

ANSWER_TIMEOUT_S = 3.0  # a worker's answer to /metrics, health and the API (not publish)
STREAM_READ_TIMEOUT_S = 5.0  # silence on a worker's dashboard stream (it sends one a second)


class WorkerState(NamedTuple):
    worker: int  # its index
    running: bool  # its process runs (it may still be starting, or hung)
    starts: int  # times the supervisor started it


class WorkerLink:
    """HTTP to one worker's admin server, on its Unix socket."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(self.path))
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        timeout: float,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, bytes] | None:
        """(status, body), or None when the worker does not answer within `timeout` s."""
        try:
            async with self.session().request(
                method,
                "http://worker" + path,
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                return response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class GroupAdmin:
    """The admin HTTP server of the supervisor: one endpoint for every worker."""

    def __init__(self, config: Config, links: Sequence[WorkerLink], states: Callable[[], list[WorkerState]]) -> None:
        self.config = config
        self.links = links
        self.states = states
        self.key = read_secret(config, "admin_api_key").encode()
        self.hosts = admin.allowed_hosts(config.admin_host, config.admin_host_names)
        # what the supervisor's own requests to a worker carry (the workers want the key too)
        self.worker_headers = {"Authorization": f"Bearer {self.key.decode()}"} if self.key else {}
        self.where = ""
        self.node = node_name(config.port, None, config.node_name)  # the group's name, for its dashboard
        self.started = time.time()
        self.watchers = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._next_publisher = 0
        app = web.Application(client_max_size=admin.MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/api/topics", self.topics)
        app.router.add_get("/api/nodes", self.nodes)
        app.router.add_get("/api/connections", self.connections)
        app.router.add_post("/api/connections/{id}/close", self.close_connection)
        app.router.add_post("/api/users/{user}/disconnect", self.on_every_worker)
        app.router.add_post("/api/users/{user}/unsubscribe", self.on_every_worker)
        app.router.add_post("/api/publish", self.publish)
        app.router.add_post("/api/revocations", self.revoke)
        app.router.add_get("/dashboard", self.to_dashboard)
        app.router.add_get("/dashboard/", self.dashboard)
        app.router.add_get("/dashboard/dashboard.js", self.dashboard_js)
        app.router.add_get("/dashboard/events", self.events)
        self.app = app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        return await admin.guard(request, handler, self.key, self.hosts)

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port. The address is resolved here, in this thread: the supervisor
        forks its workers with a preexec function, which must not meet other threads (the
        event loop would resolve a name in a thread of its executor)."""
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except (OSError, UnicodeError) as exc:
            raise ListenError(f"cannot listen on the admin port {host}:{port}: {exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on the admin port {host}:{port}: {describe_os_error(exc)}") from exc
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        bound = sock.getsockname()
        self.where = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        self._closing.set()  # open dashboards' event streams end
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _ask_all(
        self, method: str, path: str, timeout: float = ANSWER_TIMEOUT_S, headers: dict[str, str] | None = None
    ) -> dict[int, tuple[int, bytes] | None]:
        """Every running worker's answer (None: no answer in time); workers not running are left out."""
        running = [state.worker for state in self.states() if state.running]
        headers = {**self.worker_headers, **(headers or {})}
        answers = await asyncio.gather(*(self.links[i].request(method, path, timeout, headers) for i in running))
        return dict(zip(running, answers))

    # metrics and health

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("GET", "/metrics")
        texts = {i: answer[1].decode() for i, answer in answers.items() if answer is not None and answer[0] == 200}
        families = relabel(texts)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed([*families, *supervisor_families(self.states(), set(texts))]))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("GET", "/healthz")
        workers = {}
        for state in self.states():
            answer = answers.get(state.worker)
            if not state.running:
                workers[str(state.worker)] = "not running"
            elif answer is None:
                workers[str(state.worker)] = "no answer"
            else:
                workers[str(state.worker)] = "ok" if answer[0] == 200 else f"status {answer[0]}"
        ok = all(value == "ok" for value in workers.values())
        return web.json_response({"status": "ok" if ok else "failing", "workers": workers}, status=200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        answers = await self._ask_all("GET", "/readyz")
        workers: dict[str, Any] = {}
        for state in self.states():
            answer = answers.get(state.worker)
            if not state.running:
                workers[str(state.worker)] = {"ready": False, "answer": "not running"}
            elif answer is None:
                workers[str(state.worker)] = {"ready": False, "answer": "none"}
            else:
                workers[str(state.worker)] = _json(answer[1]) or {"ready": False, "answer": f"status {answer[0]}"}
        ready = all(body.get("ready") is True for body in workers.values())
        return web.json_response({"ready": ready, "workers": workers}, status=200 if ready else 503)

    # the JSON API

    async def _api_bodies(self, request: web.Request, path_qs: str | None = None) -> dict[int, Any] | web.Response:
        """The JSON bodies of every worker's answer to this request (or to `path_qs`, with its
        key), or the response to give instead: a worker's error as it is, or 503 when none
        answered."""
        answers = await self._ask_all("GET", path_qs or request.path_qs, headers=_key_header(request))
        bodies = {}
        for index, answer in answers.items():
            if answer is None:
                continue
            if answer[0] != 200:  # e.g. 400 for a bad parameter: each worker says the same
                return relayed(index, answer)
            body = _json(answer[1])
            if not isinstance(body, dict):
                return admin.json_error(502, f"worker {index} did not answer with JSON")
            bodies[index] = body
        if not bodies:
            return admin.json_error(503, "no worker answered")
        return bodies

    def _missing(self, bodies: dict[int, Any]) -> list[int]:
        return [state.worker for state in self.states() if state.worker not in bodies]

    async def stats(self, request: web.Request) -> web.Response:
        bodies = await self._api_bodies(request)
        if isinstance(bodies, web.Response):
            return bodies
        return web.json_response({**merge_stats(list(bodies.values())), "missing_workers": self._missing(bodies)})

    async def topics(self, request: web.Request) -> web.Response:
        limit = admin.topics_limit(request)
        bodies = await self._api_bodies(request)
        if isinstance(bodies, web.Response):
            return bodies
        return web.json_response({**merge_topics(list(bodies.values()), limit), "missing_workers": self._missing(bodies)})

    async def nodes(self, request: web.Request) -> web.Response:
        """Every node of the cluster: each worker reads the same announcements, so the view of
        the first that answers (each worker is a node of it)."""
        bodies = await self._api_bodies(request)
        if isinstance(bodies, web.Response):
            return bodies
        return web.json_response({**merge_nodes(list(bodies.values())), "missing_workers": self._missing(bodies)})

    async def connections(self, request: web.Request) -> web.Response:
        """Each worker is asked for the first offset + limit rows of its own, with the same
        filters and order; the page is cut from all of them in that order."""
        query = admin.ConnectionQuery.of(request)
        first = min(query.offset + query.limit, admin.MAX_CONNECTIONS_LIMIT)
        asked = request.rel_url.update_query({"offset": "0", "limit": str(first)})
        bodies = await self._api_bodies(request, str(asked))
        if isinstance(bodies, web.Response):
            return bodies
        return web.json_response({**merge_connections(bodies, query), "missing_workers": self._missing(bodies)})

    async def close_connection(self, request: web.Request) -> web.Response:
        conn_id = admin.int_param(request.match_info["id"], "id", 0, 1 << 62)
        index = worker_of_connection(conn_id)
        states = self.states()
        if index >= len(states) or not states[index].running:
            return admin.json_error(404, f"no open connection {conn_id}")
        answer = await self.links[index].request("POST", request.path, ANSWER_TIMEOUT_S, {**_key_header(request), **_operator(request)})
        if answer is None:
            return admin.json_error(503, f"worker {index}, which holds connection {conn_id}, does not answer")
        return relayed(index, answer)

    async def on_every_worker(self, request: web.Request) -> web.Response:
        """An operator's action on a user (disconnect, unsubscribe), done by every running
        worker (each logs it); the counts of their answers summed. 503 naming the workers
        that did not answer (the others did it; a repeat is harmless)."""
        admin.user_param(request)
        body = await request.read()
        running = [state.worker for state in self.states() if state.running]
        if not running:
            return admin.json_error(503, "no worker answered")
        headers = {**_key_header(request), **_operator(request), "Content-Type": "application/json"}
        answers = await asyncio.gather(*(self.links[i].request("POST", request.path, ANSWER_TIMEOUT_S, headers, body) for i in running))
        merged: dict[str, Any] = {}
        failed = []
        for index, answer in zip(running, answers):
            if answer is None:
                failed.append(index)
                continue
            if answer[0] != 200:  # a bad body or user: each worker says the same
                return relayed(index, answer)
            for key, value in (_json(answer[1]) or {}).items():
                merged[key] = merged.get(key, 0) + value if isinstance(value, int) and not isinstance(value, bool) else value
        if failed:
            return admin.json_error(
                503, f"worker(s) {', '.join(map(str, failed))} did not answer; the others did it ({merged}); retry: a repeat is harmless"
            )
        return web.json_response(merged)

    async def publish(self, request: web.Request) -> web.Response:
        """Handed to one worker (the next in turn that answers): the backplane takes what it
        publishes to the subscribers of every worker."""
        body = await request.read()
        running = [state.worker for state in self.states() if state.running]
        timeout = self.config.redis_timeout_s + 1 + ANSWER_TIMEOUT_S  # the worker's own bound, and a margin
        for _ in range(len(running)):
            index = running[self._next_publisher % len(running)]
            self._next_publisher += 1
            answer = await self.links[index].request(
                "POST",
                request.path,
                timeout,
                {**_key_header(request), "Content-Type": "application/json"},
                body,
            )
            if answer is not None:
                return relayed(index, answer)
        return admin.json_error(503, "no worker answered")

    async def revoke(self, request: web.Request) -> web.Response:
        """Put the rule in force on every worker: the first running one first (it appends the
        rule to auth_denylist_file, if there is one), then the others (which find it there and
        do not append it again). The answer sums the connections closed, and fails (503) when a
        worker did not answer: the rule may then hold on some workers only."""
        body = await request.read()
        running = [state.worker for state in self.states() if state.running]
        if not running:
            return admin.json_error(503, "no worker answered")
        headers = {**_key_header(request), "Content-Type": "application/json"}
        first = await self.links[running[0]].request("POST", request.path, ANSWER_TIMEOUT_S, headers, body)
        if first is None or first[0] != 200:
            if first is None:
                return admin.json_error(503, f"worker {running[0]} does not answer; nothing was revoked")
            return relayed(running[0], first)
        rest = await asyncio.gather(*(self.links[i].request("POST", request.path, ANSWER_TIMEOUT_S, headers, body) for i in running[1:]))
        result = _json(first[1]) or {}
        closed = result.get("closed", 0)
        failed = []
        for index, answer in zip(running[1:], rest):
            if answer is None or answer[0] != 200:
                failed.append(index)
            else:
                closed += (_json(answer[1]) or {}).get("closed", 0)
        if failed:
            return admin.json_error(
                503, f"worker(s) {', '.join(map(str, failed))} did not take the rule; it holds on the others (retry: a repeat is harmless)"
            )
        return web.json_response({**result, "closed": closed})

    # the dashboard: the workers' event streams combined, one event a second

    async def to_dashboard(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/")

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=(admin.STATIC / "dashboard.html").read_bytes(), content_type="text/html", charset="utf-8")

    async def dashboard_js(self, request: web.Request) -> web.Response:
        return web.Response(body=(admin.STATIC / "dashboard.js").read_bytes(), content_type="text/javascript", charset="utf-8")

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self.watchers >= admin.MAX_WATCHERS:
            return admin.json_error(503, f"{admin.MAX_WATCHERS} dashboards are open already")
        self.watchers += 1
        latest: dict[int, dict] = {}  # worker -> its newest snapshot
        followers: dict[int, asyncio.Task] = {}
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            while not self._closing.is_set():
                for state in self.states():
                    task = followers.get(state.worker)
                    if state.running and (task is None or task.done()):
                        followers[state.worker] = asyncio.ensure_future(self._follow(state.worker, latest))
                group = {"node": self.node, "version": __version__, "started": self.started, "workers": len(self.links)}
                await response.write(b"data: " + json.dumps({**merge_snapshots(list(latest.values())), **group}).encode() + b"\n\n")
                try:
                    await asyncio.wait_for(self._closing.wait(), 1.0)
                except TimeoutError:
                    pass
            return response
        except ConnectionResetError:  # the dashboard went away: nothing failed
            return response
        finally:
            self.watchers -= 1
            for task in followers.values():
                task.cancel()
            await asyncio.gather(*followers.values(), return_exceptions=True)

    async def _follow(self, index: int, latest: dict[int, dict]) -> None:
        """Keep latest[index] the newest snapshot of worker `index`'s event stream, until it ends."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=ANSWER_TIMEOUT_S, sock_read=STREAM_READ_TIMEOUT_S)
        try:
            async with (
                self.links[index].session().get("http://worker/dashboard/events", timeout=timeout, headers=self.worker_headers) as response
            ):
                if response.status != 200:
                    return
                async for line in response.content:
                    if line.startswith(b"data: "):
                        snapshot = _json(line[6:])
                        if snapshot is not None:
                            latest[index] = snapshot
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        latest.pop(index, None)
        await asyncio.sleep(1.0)  # a worker that is not there is asked again after a second


# combining the workers' answers (plain functions of their bodies)


class _Fixed:
    """A collector of metric families made already."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def supervisor_families(states: list[WorkerState], answered: set[int]) -> list[Metric]:
    """The supervisor's own metrics: whether each worker answered this scrape, and how often
    it was started."""
    up = GaugeMetricFamily("broker_worker_up", "1 when the worker answered this scrape", labels=["worker"])
    starts = CounterMetricFamily("broker_worker_starts", "times the supervisor started the worker (1 + its restarts)", labels=["worker"])
    for state in states:
        up.add_metric([str(state.worker)], 1 if state.worker in answered else 0)
        starts.add_metric([str(state.worker)], state.starts)
    return [up, starts]


def relabel(texts: dict[int, str]) -> list[Metric]:
    """The metric families of every worker's /metrics text, each sample labelled with its
    worker, one family per name."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value, sample.timestamp)
    return list(families.values())


def merge_stats(bodies: list[dict]) -> dict:
    """/api/stats of the group: numbers and the by-code tables summed over the workers; topics
    is the most any worker keeps (with the Redis backplane each keeps the topics it has seen
    published anywhere)."""
    merged: dict[str, Any] = {}
    for body in bodies:
        for key, value in body.items():
            if isinstance(value, (bool, str)):
                merged.setdefault(key, value)
            elif isinstance(value, (int, float)):
                merged[key] = max(merged.get(key, 0), value) if key == "topics" else merged.get(key, 0) + value
            elif isinstance(value, dict):
                table = merged.setdefault(key, {})
                for code, count in value.items():
                    table[code] = table.get(code, 0) + count
    return merged


def merge_topics(bodies: list[dict], limit: int) -> dict:
    """/api/topics of the group: each topic once, with its subscribers on every worker and the
    newest position any worker saw, the highest sequence numbers first; total is the most
    topics any worker keeps."""
    rows: dict[str, dict] = {}
    for body in bodies:
        for row in body["topics"]:
            seen = rows.get(row["topic"])
            if seen is None:
                rows[row["topic"]] = dict(row)
                continue
            subscribers = seen["subscribers"] + row["subscribers"]
            if (row["epoch"], row["seq"]) > (seen["epoch"], seen["seq"]):
                seen.update(row)
            seen["subscribers"] = subscribers
    ordered = sorted(rows.values(), key=lambda row: row["seq"], reverse=True)[:limit]
    return {"topics": ordered, "total": max(body["total"] for body in bodies)}


def merge_connections(bodies: dict[int, dict], query: admin.ConnectionQuery) -> dict:
    """/api/connections of the group: the workers' rows (each with a `worker` field) in the
    query's order, its page of them; total is the rows that match over all workers."""
    rows = [{**row, "worker": index} for index, body in sorted(bodies.items()) for row in body["connections"]]
    return {
        "connections": query.page(rows),
        "total": sum(body["total"] for body in bodies.values()),
        "offset": query.offset,
        "limit": query.limit,
    }


def merge_nodes(bodies: list[dict]) -> dict:
    """/api/nodes of the group: each node once, its newest entry among the workers' views
    (each worker's own entry is fresh in its own view)."""
    newest: dict[str, dict] = {}
    for body in bodies:
        for item in body.get("nodes", []):
            seen = newest.get(item["node"])
            if seen is None or item["time"] > seen["time"]:
                newest[item["node"]] = item
    sources = {body.get("source") for body in bodies}
    return {"nodes": sorted(newest.values(), key=lambda item: item["node"]), "source": "redis" if "redis" in sources else "this node"}


def merge_snapshots(snapshots: list[dict]) -> dict:
    """One dashboard event of the group from the workers' newest: counts summed, lags the
    worst, topics the most any worker keeps, the hottest topics over all of them."""
    hot: dict[str, dict] = {}
    for snapshot in snapshots:
        for row in snapshot["hot"]:
            seen = hot.get(row["topic"])
            if seen is None or row["rate"] > seen["rate"]:
                hot[row["topic"]] = row
    lags = [s["backplane_lag_ms"] for s in snapshots if s["backplane_lag_ms"] is not None]
    return {
        "time": time.time(),
        # changes when a worker starts again (its counters from 0): the dashboard then takes
        # no rate from the sums of two different sets of workers
        "instance": "+".join(sorted(str(s.get("instance", "")) for s in snapshots)),
        "connections": sum(s["connections"] for s in snapshots),
        "published": sum(s["published"] for s in snapshots),
        "delivered": sum(s["delivered"] for s in snapshots),
        "topics": max((s["topics"] for s in snapshots), default=0),
        "slow_consumers": sum(s["slow_consumers"] for s in snapshots),
        "pending_bytes": sum(s["pending_bytes"] for s in snapshots),
        "backplane_lag_ms": max(lags) if lags else None,
        "loop_lag_s": max((s["loop_lag_s"] for s in snapshots), default=0.0),
        "hot": sorted(hot.values(), key=lambda row: row["rate"], reverse=True)[: admin.HOT_TOPICS],
        "nodes": merge_nodes([{"nodes": s.get("nodes", [])} for s in snapshots])["nodes"],
    }


def relayed(index: int, answer: tuple[int, bytes]) -> web.Response:
    """Worker `index`'s answer to a request of the API, passed on. The supervisor checked the
    request's key before asking: a worker that refuses it (401) holds another key (its
    admin_api_key_file changed since the supervisor read it), a fault of the server, not of
    the request: 502 saying so (a 401 would also want WWW-Authenticate, for a key that is right)."""
    status, body = answer
    if status == 401:
        return admin.json_error(
            502, f"worker {index} refused the admin key the supervisor accepted (did admin_api_key_file change since the start?)"
        )
    return web.Response(status=status, body=body, content_type="application/json")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _operator(request: web.Request) -> dict[str, str]:
    """The operator's address, passed on to the worker for its log of operator actions."""
    return {admin.OPERATOR_HEADER: request.remote or ""}


def _key_header(request: web.Request) -> dict[str, str]:
    """The request's API key, passed on to the worker (which checks it too)."""
    given = request.headers.get("Authorization")
    return {"Authorization": given} if given is not None else {}
