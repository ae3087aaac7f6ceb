"""The cluster-wide view: every node announces itself in Redis, and any node's admin API and
dashboard show them all (as NATS's surveyor and Centrifugo's `info` do).

Each node (each worker process of `--workers` is one) writes one small JSON entry, its field
of the hash `{PREFIX:nodes}`, every ANNOUNCE_S seconds: its name, version, start time, state,
connections, topics, counters and rates, and when the entry expires (TTL_S after it was
written). The same round trip reads the whole hash back: that is the view, at most ANNOUNCE_S
old; entries past their expiry are left out (and deleted after FORGET_S), so a node that died
drops out of the view within TTL_S, and one that stops deletes its entry at once. One pipeline
of three commands every ANNOUNCE_S per node, nothing on the delivery path: a Redis that does
not answer within redis_timeout_s costs a log line (once until it answers again) and an older
view, never a publish.

Without Redis (the embedded backplane) the view is the node itself. The parsing and the rules
of expiry are plain functions of the entries and the clock (`entry`, `read_view`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from ..config import read_secret
from ..server import logs

ANNOUNCE_S = 5.0  # between two announcements of a node
TTL_S = 15.0  # an entry not renewed for this long is left out of the view
FORGET_S = 300.0  # and deleted from the hash this long after it expired
HASH_EXPIRY_S = 3600  # the whole hash goes once no node wrote it for this long
STOP_WAIT_S = 1.0  # a stopping node waits this long at most to take its entry out


def key(prefix: str) -> str:
    """The hash of the announcements of the cluster named by `prefix` (one key: one slot of
    a Redis Cluster)."""
    return f"{{{prefix}:nodes}}"  # within the keys of the prefix: `{PREFIX:` ...


def entry(server, previous: dict | None, now: float) -> dict:
    """What this node announces of itself at `now` (its rates: since `previous`, its last
    announcement, when it is of the same start)."""
    stats = server.router.stats
    published, delivered = stats.published, stats.delivered
    rates = {"published_rate": None, "delivered_rate": None}
    if previous is not None and previous["instance"] == server.instance and now > previous["time"]:
        seconds = now - previous["time"]
        rates = {
            "published_rate": round(max(0, published - previous["published"]) / seconds, 1),
            "delivered_rate": round(max(0, delivered - previous["delivered"]) / seconds, 1),
        }
    return {
        "node": server.node,
        "instance": server.instance,
        "version": server.version,
        "started": server.started,
        "state": server.state,
        "time": now,
        "expires": now + TTL_S,
        "connections": len(server.connections),
        "topics": len(server.router.topics),
        "published": published,
        "delivered": delivered,
        **rates,
    }


def read_view(fields: dict, now: float) -> tuple[list[dict], list]:
    """The nodes of a read of the hash that have not expired, by name, and the fields to
    delete (expired for FORGET_S, or not an entry at all)."""
    nodes, forget = [], []
    for field, value in fields.items():
        try:
            item = json.loads(value)
            expires = float(item["expires"])
            item["node"] = str(item["node"])
        except (ValueError, TypeError, KeyError):
            forget.append(field)
            continue
        if expires >= now:
            nodes.append(item)
        elif now - expires > FORGET_S:
            forget.append(field)
    nodes.sort(key=lambda item: item["node"])
    return nodes, forget


class Presence:
    """This node's announcements and the view of the cluster they make."""

    def __init__(self, server, clock=time.time) -> None:
        self.server = server
        self.clock = clock
        config = server.config
        self.url = config.redis_url
        self.key = key(config.redis_prefix)
        self.timeout = config.redis_timeout_s
        self.password = read_secret(config, "redis_password") if self.url else ""
        self.last: dict | None = None  # this node's last announcement
        self.others: list[dict] = []  # the view as last read (this node's own entry included)
        self.read_at = 0.0  # when it was read (0: never)
        self.failing = False  # the last announcement failed (logged once)
        self._redis: Any = None  # redis.asyncio Redis or RedisCluster while it runs
        self._task: asyncio.Task | None = None

    async def start(self, cluster_mode: bool) -> None:
        """Start announcing (with Redis; without, the view is this node alone)."""
        if not self.url:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options = dict(socket_timeout=self.timeout, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
        if self.password:
            options["password"] = self.password
        if cluster_mode:
            from redis.asyncio.cluster import RedisCluster

            self._redis = RedisCluster.from_url(self.url, **options)
        else:
            self._redis = aioredis.Redis.from_url(self.url, **options)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop announcing and take this node's entry out of the view (waiting STOP_WAIT_S at
        most: a Redis that does not answer must not hold up the shutdown; the entry then
        expires)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.hdel(self.key, self.server.node), min(self.timeout, STOP_WAIT_S))
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    def view(self) -> dict:
        """The nodes of the cluster: as last read from Redis, this node's entry fresh."""
        now = self.clock()
        own = entry(self.server, None, now)
        if self.last is not None:  # the rates of its last announcement: they need two of them
            own["published_rate"], own["delivered_rate"] = self.last["published_rate"], self.last["delivered_rate"]
        nodes = [item for item in self.others if item["node"] != own["node"]] + [own]
        nodes.sort(key=lambda item: item["node"])
        return {
            "nodes": nodes,
            "node": own["node"],
            "source": "redis" if self.url else "this node",
            "read_s_ago": round(now - self.read_at, 1) if self.read_at else None,
        }

    async def announce(self) -> None:
        """Write this node's entry and read everyone's, in one round trip."""
        now = self.clock()
        mine = entry(self.server, self.last, now)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.key, mine["node"], json.dumps(mine))
        pipe.expire(self.key, HASH_EXPIRY_S)
        pipe.hgetall(self.key)
        results = await asyncio.wait_for(pipe.execute(), self.timeout)
        nodes, forget = read_view({k.decode(errors="replace"): v for k, v in results[-1].items()}, self.clock())
        self.last = mine
        self.others = nodes
        self.read_at = self.clock()
        if forget:
            await asyncio.wait_for(self._redis.hdel(self.key, *forget), self.timeout)

    async def _loop(self) -> None:
        while True:
            try:
                await self.announce()
                if self.failing:
                    self.failing = False
                    logs.event(logging.INFO, "cluster_view_announcing", key=self.key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away or slow: an older view, said once
                if not self.failing:
                    self.failing = True
                    logs.event(logging.WARNING, "cluster_view_not_announced", key=self.key, error=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(ANNOUNCE_S)
