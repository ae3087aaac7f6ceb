"""The admin JSON API: stats, topics, connections, closing one, and server-side publish."""

from __future__ import annotations

import asyncio
import base64

import aiohttp

from broker.client import Client
from broker.errors import ErrorCode

from conftest import run, serving, url
from redis_support import free_port

KEY = "admin-key-of-this-test"


async def call(port: int, method: str, path: str, key: str | None = KEY, **kwargs) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, **kwargs) as response:
            return response.status, await response.json()


def test_the_api_wants_its_key_and_is_off_without_one():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            assert (await call(port, "GET", "/api/stats", key=None))[0] == 401
            assert (await call(port, "GET", "/api/stats", key="wrong"))[0] == 401
            status, body = await call(port, "GET", "/api/stats")
            assert status == 200 and body["connections"] == 0 and body["backplane"] == "memory"
            status, body = await call(port, "GET", "/api/topics?limit=0")
            assert status == 400 and "limit" in body["error"]
        port = free_port()
        async with serving(admin_port=port):
            status, body = await call(port, "GET", "/api/stats")
            assert status == 404 and "admin_api_key" in body["error"]
            async with aiohttp.ClientSession() as session:  # the dashboard needs no key
                for path, kind in (("/dashboard", "text/html"), ("/dashboard/dashboard.js", "text/javascript")):
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        assert response.status == 200 and response.content_type == kind

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
                assert body["topics"][0] == {"topic": "md.a", "epoch": ok["epoch"], "seq": 2, "subscribers": 1}
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


def test_server_side_publish_through_the_redis_backplane_reaches_other_nodes(redis_url, redis_prefix):
    async def main():
        port = free_port()
        settings = dict(redis_url=redis_url, redis_prefix=redis_prefix)
        async with serving(admin_port=port, admin_api_key=KEY, **settings), serving(**settings) as other:
            async with Client(url(other)) as client:
                sub = await client.subscribe("rp.t")
                status, body = await call(port, "POST", "/api/publish", json={"messages": [{"topic": "rp.t", "text": "1"}, {"topic": "rp.t", "text": "2"}]})
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
