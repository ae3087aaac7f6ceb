"""The cluster-wide view: each node announces itself in Redis (its name, version, uptime,
state, connections, rates) and any node's /api/nodes and dashboard show every node; a node
that stops leaves the view at once, one that dies when its entry expires."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import aiohttp

from broker import __version__
from broker.client import Client
from broker.cluster import presence
from broker.cluster.presence import read_view
from conftest import free_port, run, serving
from redis_support import BrokerNode

KEY = "cluster-view-key"


def test_an_entry_past_its_expiry_leaves_the_view_and_is_forgotten_later():
    now = 1000.0
    fresh = {"node": "a:1", "expires": now + 1}
    expired = {"node": "b:1", "expires": now - 1}
    long_gone = {"node": "c:1", "expires": now - presence.FORGET_S - 1}
    fields = {
        "a:1": json.dumps(fresh),
        "b:1": json.dumps(expired),
        "c:1": json.dumps(long_gone),
        "junk": b"not json",
        "x": json.dumps({"node": "x"}),
    }
    nodes, forget = read_view(fields, now)
    assert [n["node"] for n in nodes] == ["a:1"]
    assert sorted(forget) == ["c:1", "junk", "x"]


def test_an_announcement_says_who_the_node_is_and_its_rates_since_the_last():
    stats = SimpleNamespace(published=100, delivered=1000)
    server = SimpleNamespace(
        node="n:1",
        instance="i1",
        version="9.9",
        started=900.0,
        state="running",
        connections={1: None, 2: None},
        router=SimpleNamespace(stats=stats, topics={"t": None}),
    )
    first = presence.entry(server, None, 1000.0)
    assert first["published_rate"] is None and first["connections"] == 2 and first["expires"] == 1000.0 + presence.TTL_S
    stats.published, stats.delivered = 150, 2000
    second = presence.entry(server, first, 1005.0)
    assert (second["published_rate"], second["delivered_rate"]) == (10.0, 200.0)
    server.instance = "i2"  # another start: no rate across it
    assert presence.entry(server, second, 1010.0)["published_rate"] is None


def test_without_redis_the_view_is_this_node():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, node_name="solo") as server:
            async with Client(f"ws://127.0.0.1:{server.port}/"):
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{port}/api/nodes", headers={"Authorization": f"Bearer {KEY}"}) as response:
                        return await response.json()

    body = run(main())
    (node,) = body["nodes"]
    assert body["source"] == "this node" and body["node"] == "solo"
    assert (node["node"], node["version"], node["state"], node["connections"]) == ("solo", __version__, "running", 1)


async def nodes_of(admin: int) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin}/api/nodes", headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status == 200
            return await response.json()


async def eventually_view(admin: int, predicate, timeout: float = presence.ANNOUNCE_S + 5) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = await nodes_of(admin)
        if predicate({n["node"]: n for n in body["nodes"]}):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


def test_every_node_shows_every_node_through_redis(redis_url, redis_prefix):
    admins = [free_port(), free_port()]
    common = ("--redis-url", redis_url, "--redis-prefix", redis_prefix, "--admin-api-key", KEY)
    with (
        BrokerNode(*common, "--admin-port", str(admins[0]), "--node-name", "alpha") as alpha,
        BrokerNode(*common, "--admin-port", str(admins[1]), "--node-name", "beta") as beta,
    ):

        async def main():
            async with Client(beta.url) as client:
                await client.subscribe("cv.>")
                for _ in range(3):
                    await client.publish_acked("cv.t", b"x")
                # alpha learns of beta's connection at beta's next announcement
                body = await eventually_view(admins[0], lambda n: n.get("beta", {}).get("connections") == 1 and "alpha" in n)
                assert body["source"] == "redis" and body["node"] == "alpha"
                nodes = {n["node"]: n for n in body["nodes"]}
                for name in ("alpha", "beta"):
                    assert nodes[name]["version"] == __version__ and nodes[name]["state"] == "running"
                    assert 0 <= nodes[name]["time"] - nodes[name]["started"] < 60
                assert nodes["beta"]["published"] >= 3 and nodes["alpha"]["connections"] == 0
                both = await nodes_of(admins[1])
                assert {n["node"] for n in both["nodes"]} == {"alpha", "beta"}

        run(main())
        assert beta.terminate() == 0  # a node that stops takes its entry out at once
        run(eventually_view(admins[0], lambda n: set(n) == {"alpha"}, timeout=presence.ANNOUNCE_S + 3))
        assert alpha.terminate() == 0
