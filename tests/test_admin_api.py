"""The admin port: what wants the key and which Host names it answers to, its log of
malformed requests, and the JSON API (stats, topics, connections, closing one, server-side
publish)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import aiohttp
import jwt
import pytest

from broker import __version__
from broker.audit import AUDIT_PER_KEY
from broker.client import Client
from broker.cluster import group_admin
from broker.cluster.group_admin import GroupAdmin
from broker.errors import ErrorCode, SubscriptionEnded
from broker.messages import SUBPROTOCOL
from broker.server import admin
from broker.settings import load
from conftest import free_port, run, send_upgrade, serving, upgrade_request, url

KEY = "admin-key-of-this-test"


async def call(port: int, method: str, path: str, key: str | None = KEY, **kwargs) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, **kwargs) as response:
            return response.status, await response.json()


async def fetch(port: int, path: str, key: str | None = None, host: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, the first bytes of the body) of a GET; the event stream is read
    up to its first event only."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if host is not None:
        headers["Host"] = host
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers, allow_redirects=False) as response:
            if response.content_type == "text/event-stream":
                body = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            else:
                body = await response.read()
            return response.status, response.content_type, body


# Everything of the admin port that tells what flows through the broker, and what it answers
# when given the key.
GUARDED = {
    "/metrics": "text/plain",
    "/dashboard/events": "text/event-stream",
    "/api/stats": "application/json",
    "/api/topics": "application/json",
    "/api/connections": "application/json",
}


def test_everything_but_health_wants_the_key():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            for path in ("/healthz", "/readyz"):
                assert (await fetch(port, path))[0] == 200
            for path, kind in GUARDED.items():
                for key in (None, "wrong", KEY[:-1]):
                    status, _, body = await fetch(port, path, key)
                    assert status == 401 and b"admin_api_key" in body, (path, key, status)
                status, content_type, body = await fetch(port, path, KEY)
                assert status == 200 and content_type == kind, (path, status)
            assert (await fetch(port, "/dashboard/events", KEY))[2].startswith(b"data: {")
            # the dashboard's page and script hold no data: a browser loads them, then the key
            for path, kind in (("/dashboard/", "text/html"), ("/dashboard/dashboard.js", "text/javascript")):
                status, content_type, _ = await fetch(port, path)
                assert status == 200 and content_type == kind
            assert (await fetch(port, "/dashboard"))[0] == 302
            # what changes something wants the key as much as what shows something
            for path, body in (
                ("/api/publish", {"topic": "t", "text": "x"}),
                ("/api/connections/1/close", None),
                ("/api/revocations", {"user": "x"}),
                ("/api/nothing-here", None),
            ):
                for key in (None, "wrong", KEY[:-1]):
                    status, answer = await call(port, "POST", path, key, json=body)
                    assert status == 401 and "admin_api_key" in answer["error"], (path, key, status)
            status, body = await call(port, "GET", "/api/topics?limit=0")
            assert status == 400 and "limit" in body["error"]
        port = free_port()
        async with serving(admin_port=port):  # no key: health only
            for path in ("/healthz", "/readyz"):
                assert (await fetch(port, path))[0] == 200
            for path in (*GUARDED, "/dashboard/", "/dashboard/dashboard.js"):
                status, _, body = await fetch(port, path)
                assert status == 404 and b"admin_api_key" in body, (path, status)

    run(main())


def test_the_api_key_may_come_from_a_file(tmp_path):
    path = tmp_path / "admin-key"
    path.write_text(KEY + "\n")

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key_file=str(path)):
            assert (await call(port, "GET", "/api/stats", key=None))[0] == 401
            assert (await call(port, "GET", "/api/stats"))[0] == 200

    run(main())


def test_the_admin_port_answers_only_to_its_own_names():
    """A page of another site whose name was made to resolve to the admin server (DNS
    rebinding) sends its own name in Host: refused, key or not. Health answers any Host."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, admin_allowed_hosts="ops.example.com, Broker-1"):
            own = [
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                "LOCALHOST",
                f"[::1]:{port}",
                "10.1.2.3",
                f"ops.example.com:{port}",
                "ops.example.com.",
                f"broker-1:{port}",
            ]
            for host in own:
                assert (await fetch(port, "/metrics", KEY, host))[0] == 200, host
            for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example", "ops.example.com:x", "[::1"):
                for path in ("/metrics", "/dashboard/events", "/api/stats", "/dashboard/"):
                    status, _, body = await fetch(port, path, KEY, host)
                    assert status == 403 and b"admin_allowed_hosts" in body, (host, path, status)
                for path in ("/healthz", "/readyz"):
                    assert (await fetch(port, path, None, host))[0] == 200

    run(main())


def test_the_hosts_an_admin_server_answers_to():
    allowed_hosts, host_allowed = admin.allowed_hosts, admin.host_allowed
    names = allowed_hosts("127.0.0.1", frozenset())
    assert names == {"localhost", "127.0.0.1"}
    assert host_allowed("localhost:9341", names) and host_allowed("127.0.0.1", names) and host_allowed("[::1]:1", names)
    assert host_allowed("192.0.2.7:9341", names)  # an address cannot be a rebound name
    assert not host_allowed("example.com", names) and not host_allowed(None, names) and not host_allowed("", names)
    assert not host_allowed("[::1]x", names) and not host_allowed("[example.com]", names)
    named = allowed_hosts("admin.internal", load({"admin_allowed_hosts": "a.example, B.EXAMPLE."}, environ={}).admin_host_names)
    assert all(host_allowed(h, named) for h in ("admin.internal:1", "a.example", "b.example", "B.Example:80"))
    assert host_allowed("anything.example", allowed_hosts("0.0.0.0", load({"admin_allowed_hosts": "*"}, environ={}).admin_host_names))


def test_malformed_requests_are_logged_in_one_bounded_line_each(caplog):
    """40 requests aiohttp cannot parse: no traceback, at most one line each, and at most a
    few per address a second (the rest counted in one line)."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            for i in range(40):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nthis line has no colon %d\r\n\r\n" % i)
                head = await asyncio.wait_for(reader.readline(), 5)
                assert b" 400 " in head, head
                writer.close()
            await asyncio.sleep(1.2)  # the audit log's window ends: the count of what it left out
            assert (await fetch(port, "/healthz"))[0] == 200  # and the server answers on

    with caplog.at_level(logging.INFO):
        run(main())
    assert not [r for r in caplog.records if r.exc_info or "\n" in r.getMessage()], "a traceback was logged"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [r for r in records if r.getMessage() == "admin_request_failed"]
    assert 1 <= len(lines) <= AUDIT_PER_KEY
    assert lines[0].fields["status"] == 400 and lines[0].fields["peer"] == "127.0.0.1"
    (skipped,) = [r for r in records if r.getMessage() == "audit_lines_skipped"]
    assert skipped.fields["kind"] == "admin_request_failed" and skipped.fields["count"] == 40 - len(lines)
    assert len(records) == len(lines) + 1


def test_server_side_publish_topics_connections_and_closing_one():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, max_payload_bytes=1024) as server:
            async with Client(url(server), reconnect=False) as client:
                sub = await client.subscribe("md.>")
                status, body = await call(port, "POST", "/api/publish", json={"topic": "md.a", "text": "hello"})
                assert status == 200 and body["results"][0]["seq"] == 1
                messages = [
                    {"topic": "md.a", "data": base64.b64encode(b"\x00\x01").decode()},
                    {"topic": "md.*", "text": "a pattern"},
                    {"topic": "md.b", "text": "x" * 2000},
                    {"topic": "md.b", "data": "not base64!"},
                    {"topic": "md.b", "text": "b"},
                ]
                status, body = await call(port, "POST", "/api/publish", json={"messages": messages})
                ok, pattern, big, bad, last = body["results"]
                assert ok["seq"] == 2 and last["seq"] == 1 and ok["epoch"] == last["epoch"]
                assert pattern["error"]["code"] in (ErrorCode.PATTERN_NOT_ALLOWED, ErrorCode.INVALID_TOPIC)
                assert big["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE and bad["error"]["code"] == ErrorCode.BAD_MESSAGE
                got = []
                async for message in sub:
                    got.append((message.topic, message.seq, message.data))
                    if len(got) == 3:
                        break
                assert got == [("md.a", 1, b"hello"), ("md.a", 2, b"\x00\x01"), ("md.b", 1, b"b")]
                status, body = await call(port, "GET", "/api/topics")
                assert body["topics"][0] == {
                    "topic": "md.a",
                    "epoch": ok["epoch"],
                    "epoch_str": str(ok["epoch"]),
                    "seq": 2,
                    "subscribers": 1,
                }
                # JavaScript's JSON.parse rounds integers past 2^53: epochs are there as strings too
                assert ok["epoch"] > 1 << 53 and ok["epoch_str"] == str(ok["epoch"])
                status, body = await call(port, "GET", "/api/connections")
                (row,) = body["connections"]
                assert row["subscriptions"] == ["md.>"] and row["queue_bytes"] == 0
                assert (await call(port, "POST", "/api/connections/999999/close"))[0] == 404
                status, body = await call(port, "POST", f"/api/connections/{row['id']}/close")
                assert status == 200
                code, reason = await asyncio.wait_for(client.wait_closed(), 5)
                assert (code, reason) == (1008, "closed by an operator")
            assert (await call(port, "POST", "/api/publish", data=b"{not json"))[0] == 400

    run(main())


def test_a_refused_single_message_publish_answers_an_error_status():
    """`curl --fail` (and any HTTP client) sees that one message was not published; a batch
    answers 200 with each message's result."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, max_payload_bytes=1024, max_topics=1):
            refused = {
                400: {"topic": "md.*", "text": "a pattern"},
                413: {"topic": "md.a", "text": "x" * 2000},
            }
            for status, message in refused.items():
                got, body = await call(port, "POST", "/api/publish", json=message)
                assert got == status, (message, body)
                assert body["results"][0]["error"]["code"] in (
                    ErrorCode.PATTERN_NOT_ALLOWED,
                    ErrorCode.INVALID_TOPIC,
                    ErrorCode.PAYLOAD_TOO_LARGE,
                )
            assert (await call(port, "POST", "/api/publish", json={"topic": "md.a", "text": "ok"}))[0] == 200
            status, body = await call(port, "POST", "/api/publish", json={"topic": "md.b", "text": "one topic too many"})
            assert status == 503 and body["results"][0]["error"]["code"] == ErrorCode.TOO_MANY_TOPICS
            status, body = await call(port, "POST", "/api/publish", json={"messages": [{"topic": "md.a", "text": "x" * 2000}]})
            assert status == 200 and body["results"][0]["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE

    run(main())


def test_server_side_publish_through_the_redis_backplane_reaches_other_nodes(redis_url, redis_prefix):
    async def main():
        port = free_port()
        settings = dict(redis_url=redis_url, redis_prefix=redis_prefix)
        async with serving(admin_port=port, admin_api_key=KEY, **settings), serving(**settings) as other:
            async with Client(url(other)) as client:
                sub = await client.subscribe("rp.t")
                status, body = await call(
                    port, "POST", "/api/publish", json={"messages": [{"topic": "rp.t", "text": "1"}, {"topic": "rp.t", "text": "2"}]}
                )
                assert status == 200 and [r["seq"] for r in body["results"]] == [1, 2]
                got = []
                async for message in sub:
                    got.append((message.seq, message.data))
                    if len(got) == 2:
                        break
                assert got == [(1, b"1"), (2, b"2")]

    run(main())


def test_an_operator_revokes_tokens_by_id_user_or_time_and_open_connections_close_at_once(tmp_path):
    """POST /api/revocations: the rule is in force when the answer comes (the connections it
    revokes are closed with 4003 already, not at the next sweep), written to the denylist
    file when there is one (so it lasts), held in memory otherwise."""
    import time

    import jwt

    from broker.messages import Ack, Sub
    from conftest import RawSocketClient

    secret = "s3cret-for-tests-only-32-bytes!!"
    now = int(time.time())

    def bearer(**claims) -> dict:
        claims = {"exp": now + 60, "subscribe": [">"], "publish": [">"], **claims}
        return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    denylist = tmp_path / "denied.txt"
    denylist.write_text("# revoked tokens\nt-0")  # no final line break: the rule goes on a line of its own

    async def main():
        for settings in ({"auth_denylist_file": str(denylist)}, {}):
            port = free_port()
            async with serving(admin_port=port, admin_api_key=KEY, auth_jwt_secret=secret, **settings) as server:
                clients = [
                    await RawSocketClient.connect(server.port, headers=bearer(sub="mallory", jti="m-1")),
                    await RawSocketClient.connect(server.port, headers=bearer(sub="mallory", jti="m-2")),
                    await RawSocketClient.connect(server.port, headers=bearer(sub="alice", iat=now - 100)),
                    await RawSocketClient.connect(server.port, headers=bearer(sub="alice", iat=now)),
                    await RawSocketClient.connect(server.port, headers=bearer(sub="bob", jti="b-1", iat=now)),
                ]
                try:
                    assert (await call(port, "POST", "/api/revocations", key=None, json={"user": "x"}))[0] == 401
                    status, body = await call(port, "POST", "/api/revocations", json={"user": "mallory"})
                    saved = str(denylist) if settings else None
                    assert (status, body) == (200, {"rule": "user:mallory", "closed": 2, "saved": saved})
                    status, body = await call(port, "POST", "/api/revocations", json={"user": "alice", "issued_before": now - 10})
                    assert (status, body) == (200, {"rule": f"user:alice before:{now - 10}", "closed": 1, "saved": saved})
                    status, body = await call(port, "POST", "/api/revocations", json={"jti": "b-1"})
                    assert (status, body) == (200, {"rule": "jti:b-1", "closed": 1, "saved": saved})
                    for client in clients[:3] + clients[4:]:
                        assert (await client.read_close())[1:] == (4003, "token revoked")
                    await clients[3].send(Sub(1, "alive"))
                    assert await clients[3].recv() == Ack(1)
                    for bad in ({}, {"jti": "a", "user": "b"}, {"user": ""}, {"issued_before": "yesterday"}, {"who": "x"}, ["user"]):
                        status, body = await call(port, "POST", "/api/revocations", json=bad)
                        assert status == 400 and body["error"], (bad, body)
                finally:
                    for client in clients:
                        client.close()
        assert denylist.read_text() == f"# revoked tokens\nt-0\nuser:mallory\nuser:alice before:{now - 10}\njti:b-1\n"
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            status, body = await call(port, "POST", "/api/revocations", json={"user": "mallory"})
            assert status == 409 and "authentication is off" in body["error"]

    run(main())


def test_every_401_says_how_to_authenticate():
    """Each answer 401 carries WWW-Authenticate (RFC 9110 11.6.1): every path of the admin
    server of one process and of the supervisor of `--workers`, without the key and with a
    wrong one, and the WebSocket handshake without a token and with a bad one. A worker that
    refuses the key the supervisor accepted is the server's fault: 502, not a bare 401."""
    secret = "s" * 32

    async def refusals(port: int, routes) -> list[tuple[str, str, int, str | None]]:
        out = []
        async with aiohttp.ClientSession() as session:
            for method, path in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
                    async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as response:
                        out.append((method, path, response.status, response.headers.get("WWW-Authenticate")))
        return out

    def routes_of(app) -> set[tuple[str, str]]:
        return {
            (route.method, route.resource.canonical.replace("{id}", "1"))
            for route in app.router.routes()
            if route.method in ("GET", "POST")
        } | {("GET", "/no/such/path"), ("POST", "/metrics")}

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, auth_jwt_secret=secret) as server:
            answers = await refusals(port, routes_of(server.admin.app))
            for token in (None, "not.a.token"):
                headers = {} if token is None else {"Authorization": f"Bearer {token}"}
                status, head, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], headers))
                writer.close()
                answers.append(("GET", f"ws:{token}", status, (head.get("www-authenticate") or [None])[0]))
        group_port = free_port()
        group = GroupAdmin(load({"admin_api_key": KEY, "redis_url": "redis://127.0.0.1:1", "workers": 2}, environ={}), [], lambda: [])
        await group.start("127.0.0.1", group_port)
        try:
            answers += await refusals(group_port, routes_of(group.app))
        finally:
            await group.stop()
        return answers

    answers = run(main())
    unauthorized = [a for a in answers if a[2] == 401]
    assert len(unauthorized) >= 40, answers
    assert all(a[3] and a[3].startswith("Bearer") for a in unauthorized), [a for a in unauthorized if not a[3]]
    assert {a[2] for a in answers if a[1] not in admin.HEALTH | admin.PAGE} == {401}, answers
    relayed = group_admin.relayed(1, (401, b'{"error": "this endpoint wants Authorization: Bearer <admin_api_key>"}'))
    assert relayed.status == 502 and b"worker 1 refused the admin key" in relayed.body
    assert group_admin.relayed(0, (404, b'{"error": "no open connection 3"}')).status == 404


def test_connections_are_filtered_sorted_and_paged_with_what_each_client_says_it_is():
    """/api/connections as NATS's /connz: a client says its name and version (the Python client
    in the Broker-Client header, a browser in the `client` query parameter); rows carry age,
    idle time and bytes both ways; filters by user, address, client and subscription; sorts
    by pending bytes, messages, age...; pages with offset and limit; a bad parameter is a 400
    naming it, and a malformed identification is refused at the handshake."""
    secret = "s" * 32

    def token(user: str) -> str:
        return jwt.encode({"sub": user, "exp": int(time.time()) + 600, "subscribe": [">"], "publish": [">"]}, secret, algorithm="HS256")

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, auth_jwt_secret=secret) as server:
            async with Client(url(server), token=token("alice")) as alice, Client(url(server), token=token("bob")) as bob:
                await alice.subscribe("md.>")
                await alice.subscribe("news.eu")
                await bob.subscribe("md.NASDAQ.AAPL")
                for i in range(20):
                    await bob.publish_acked("md.x", b"%d" % i)
                browser, _, reader, writer = await send_upgrade(
                    server.port,
                    upgrade_request(
                        f"/?client=broker-js/0.3.1&token={token('carol')}", [SUBPROTOCOL], {"Authorization": f"Bearer {token('carol')}"}
                    ),
                )
                assert browser == 101
                await asyncio.sleep(0.05)

                status, body = await call(port, "GET", "/api/connections")
                assert status == 200 and body["total"] == 3 and (body["offset"], body["limit"]) == (0, 1000)
                rows = {row["user"]: row for row in body["connections"]}
                assert [row["id"] for row in body["connections"]] == sorted(row["id"] for row in body["connections"])
                assert rows["alice"]["client"] == rows["bob"]["client"] == f"broker-py/{__version__}"
                assert rows["carol"]["client"] == "broker-js/0.3.1"
                assert rows["alice"]["subscriptions"] == ["md.>", "news.eu"]
                assert rows["bob"]["received"] >= 21 and rows["bob"]["bytes_in"] > rows["carol"]["bytes_in"]
                assert rows["alice"]["bytes_out"] > 20 and rows["carol"]["bytes_out"] == 0
                assert all(row["age_s"] >= 0.05 and row["idle_s"] >= 0 for row in rows.values())
                assert abs(rows["carol"]["idle_s"] - rows["carol"]["age_s"]) < 0.05  # it sent nothing since its upgrade

                async def users(query: str) -> list[str]:
                    status, body = await call(port, "GET", f"/api/connections?{query}")
                    assert status == 200, body
                    return [row["user"] for row in body["connections"]]

                assert await users("user=bob") == ["bob"]
                assert await users("client=broker-py") == ["alice", "bob"]
                assert await users("client=broker-js/0.3.1") == ["carol"]
                assert await users("peer=127.0.0.1&sort=received&limit=1") == ["bob"]
                assert await users(f"peer={rows['carol']['peer']}") == ["carol"]
                assert await users("peer=10.0.0.1") == []
                assert await users("subscription=md.NASDAQ.AAPL") == ["alice", "bob"]  # held, or matching that topic
                assert await users("subscription=md.>") == ["alice"]
                assert await users("subscription=news.us") == []
                assert await users("sort=subscriptions") == ["alice", "bob", "carol"]
                assert (await users("sort=bytes_out&order=asc"))[0] == "carol"
                assert await users("sort=bytes_in") == ["bob", "alice", "carol"]
                assert (await users("sort=age"))[-1] == "carol" and (await users("sort=age&order=asc"))[0] == "carol"  # the youngest
                assert await users("sort=id&order=desc&offset=1&limit=1") == ["bob"]
                for query, named in [
                    ("sort=size", "sort"),
                    ("order=up", "order"),
                    ("offset=-1", "offset"),
                    ("limit=0", "limit"),
                    ("subscription=a..b", "subscription"),
                ]:
                    status, body = await call(port, "GET", f"/api/connections?{query}")
                    assert status == 400 and body["error"].startswith(named), (query, body)
                writer.close()
            for bad in ("x", "no-version/", "a/b c", "n/" + "1" * 40):
                status, _, _, writer = await send_upgrade(
                    server.port, upgrade_request("/", [SUBPROTOCOL], {"Broker-Client": bad, "Authorization": f"Bearer {token('dave')}"})
                )
                writer.close()
                assert status == 400, bad

    run(main())


def test_an_operator_disconnects_or_unsubscribes_every_connection_of_a_user_and_it_is_logged(caplog):
    """Not one connection id: every connection of a user. Unsubscribing ends that subscription
    on each (the client is told, `unsubscribed`, and its Subscription ends; the others go on);
    disconnecting closes each with 1008. Each action is one `operator_action` log line naming
    it, the user, the count and the operator's address."""
    secret = "s" * 32

    def token(user: str) -> str:
        return jwt.encode({"sub": user, "exp": int(time.time()) + 600, "subscribe": [">"], "publish": [">"]}, secret, algorithm="HS256")

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, auth_jwt_secret=secret, log_level="info") as server:
            alices = [await Client.connect(url(server), token=token("alice"), reconnect=False) for _ in range(2)]
            bob = await Client.connect(url(server), token=token("bob"), reconnect=False)
            ended = [await alice.subscribe("md.>") for alice in alices]
            kept = await alices[0].subscribe("news.eu")
            bobs = await bob.subscribe("md.>")

            status, body = await call(port, "POST", "/api/users/alice/unsubscribe", json={"subscription": "md.>"})
            assert (status, body) == (200, {"user": "alice", "subscription": "md.>", "connections": 2})
            for sub in ended:
                with pytest.raises(SubscriptionEnded) as info:
                    await sub.next(5)
                assert info.value.pattern == "md.>" and info.value.reason == "unsubscribed by an operator"
            await bob.publish_acked("md.a", b"after")
            await bob.publish_acked("news.eu", b"still")
            assert (await bobs.next(5)).data == b"after"
            assert (await kept.next(5)).data == b"still"
            assert sorted(sorted(c.session.subscriptions) for c in server.connections.values() if c.user == "alice") == [[], ["news.eu"]]
            assert (await call(port, "POST", "/api/users/alice/unsubscribe", json={"subscription": "md.>"}))[1]["connections"] == 0

            status, body = await call(port, "POST", "/api/users/alice/disconnect")
            assert (status, body) == (200, {"user": "alice", "closed": 2})
            for alice in alices:
                assert await asyncio.wait_for(alice.wait_closed(), 5) == (1008, "closed by an operator")
            assert not bob.closed and [c.user for c in server.connections.values()] == ["bob"]
            assert (await call(port, "POST", "/api/users/nobody/disconnect"))[1] == {"user": "nobody", "closed": 0}
            for body in ({"pattern": "md.>"}, {"subscription": "a..b"}, {"subscription": 5}):
                status, answer = await call(port, "POST", "/api/users/bob/unsubscribe", json=body)
                assert status == 400, (body, answer)
            await bob.close()

    with caplog.at_level(logging.INFO, logger="broker"):
        run(main())
    actions = [r.fields for r in caplog.records if r.getMessage() == "operator_action"]
    assert [(a["action"], a["user"]) for a in actions] == [
        ("unsubscribe_user", "alice"),
        ("unsubscribe_user", "alice"),
        ("disconnect_user", "alice"),
        ("disconnect_user", "nobody"),
    ]
    assert actions[0]["connections"] == 2 and actions[0]["subscription"] == "md.>" and actions[2]["closed"] == 2
    assert all(a["operator"] == "127.0.0.1" for a in actions)
