"""The Redis backplane's shards: their settings and counters, a writer's route, and the
links to Redis every part uses (clients, the write script loaded, the check of each shard's
epoch and write count, and a shard moving to a new epoch).

Part of broker.cluster.streams.RedisBackplane (`ShardLinks` is one of its bases, with
broker.cluster.reader.Reader and broker.cluster.writer.Writer); docs/cluster.md describes
the keys and the scripts.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, Any

from ..backplane import unique_epoch
from ..fastpath import Block
from . import scripts
from .epochs import FORKED, ShardEpochs

if TYPE_CHECKING:
    from ..router import Router

log = logging.getLogger("broker.cluster")

BLOCK_MS = 2000  # how long one XREAD waits for entries
CLUSTER_BLOCK_MS = 500  # on a cluster (one XREAD per shard; also how long a reader takes to stop)
READ_COUNT = 1000  # entries one XREAD takes per stream at most
INTEREST_REVIEW_S = 5.0  # how often the node looks for shards no subscription needs any more
INTEREST_GRACE_S = 30.0  # how long a shard no subscription needs is read on (one that comes back soon is not loaded again)
LOAD_COUNT = 1000  # entries per XRANGE page when loading history or searching
BLOCK_BYTES = 1 << 20  # a shard's block (one stream entry) holds about this many payload bytes at most
RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # pauses between attempts after a failure, then 1 s each
PROBE_S = 0.5  # how often a writer whose shards refuse publishes checks them
EAGER_MESSAGES = 256  # a write (a read) that holds (brought) this many messages does not wait for redis_batch_ms
SCRIPT_READ_COUNT = 100  # entries a write reads per stream at most (its reply is bounded; the reader reads what is left)
WRITER_READS_S = 0.05  # after a write that read, how much longer than two redis_batch_ms its reader leaves the reading to the writes
OUT_OF_MEMORY = "the cluster backplane (Redis) is out of memory (maxmemory): it takes no writes; not published (retry later)"
FOREIGN_LOG_INTERVAL_S = 10.0  # entries no broker wrote are said at most once per this many seconds, with their count
READER_RENEW = 10  # failed reads in a row after which a Redis Cluster reader gets a new client
# A read that has not come back STALL_S after its block ended means Redis does not answer:
# the node reports it (readiness, broker_backplane_connected, the lag) within the block plus
# this, publishing or not, without a command of its own (docs/operations.md says 3 s).
STALL_S = 1.0


class BackplaneStats:
    """Counters of the Redis backplane (exported as metrics)."""

    __slots__ = (
        "writes",
        "scripts",
        "entries_written",
        "messages_written",
        "bytes_written",
        "reads",
        "entries_read",
        "messages_read",
        "bytes_read",
        "commands",
        "reconnects",
        "in_doubt",
        "failed",
        "unknown",
        "refused",
        "lag_ms",
        "epoch_changes",
        "rollbacks",
        "read_failures",
        "write_failures",
        "repeats",
        "unreplicated",
    )

    def __init__(self, shards: int) -> None:
        self.writes = 0  # writes sent (each one round trip)
        self.scripts = 0  # EVALSHA calls (one per write, with every shard of the write; again for a write sent again)
        self.entries_written = 0  # stream entries appended (one per shard per write)
        self.messages_written = 0
        self.bytes_written = 0  # payload bytes
        self.reads = 0  # XREAD and XRANGE commands
        self.entries_read = 0
        self.messages_read = 0
        self.bytes_read = 0
        self.commands = 0  # every command this node sent to Redis
        self.reconnects = 0  # commands that failed for the connection (then retried)
        self.in_doubt = 0  # blocks sent again after their reply was lost
        self.failed = 0  # messages that could not be written within redis_timeout_s
        self.unknown = 0  # messages sent whose outcome Redis did not confirm within redis_timeout_s
        self.refused = 0  # publishes refused at once (buffer full, or Redis away)
        self.lag_ms = [0] * shards  # per shard: how old the newest entry read was when read (0: a read found nothing new)
        self.epoch_changes = 0  # shards whose epoch changed (Redis lost its counters or went back in time)
        self.rollbacks = 0  # times this node found a shard holding less than it had seen (then it moved the epoch on)
        self.read_failures = [0] * shards  # per shard: reads that failed in a row, now (0: reading)
        self.unreplicated = 0  # messages written that WAIT did not confirm on redis_min_replicas replicas in time
        self.repeats = 0  # publishes Redis recognised by their msg_id as published before (through any node)
        self.write_failures = (
            0  # the attempts (writes; checks while its shards refuse publishes) that failed in a row, now, of the writer that fails most
        )


class Route:
    """The shards one writer task writes, and what it holds for them. On one Redis one route
    holds every shard (a write is one script call: one round trip); on a Redis Cluster each shard
    is a route of its own, so that a master that is slow or gone holds back no other's shards."""

    __slots__ = (
        "name",
        "shards",
        "filling",
        "full",
        "writing",
        "down",
        "failures",
        "wake",
        "oom_since",
        "oom_refused",
        "oom_failed",
        "client",
        "started",
        "reads_until",
    )

    def __init__(self, name: str, shards: list[int], filling: list) -> None:
        self.name = name  # for logs: "writing to Redis", "writing shard 3"
        self.shards = shards
        self.filling = filling  # the backplane's: per shard, the block it is filling (None: none)
        self.full: list[Block] = []  # blocks that reached BLOCK_BYTES (changed in place: stage appends to it)
        self.writing: list[Block] = []  # sent (or to be sent again), at most one per shard
        self.down = False  # a write failed at its deadline, or Redis is out of memory: its shards refuse until Redis takes them
        self.failures = 0  # the writer's attempts that failed in a row
        self.wake = asyncio.Event()
        self.oom_since = 0.0  # monotonic time Redis refused a write for maxmemory (0: it takes writes)
        self.oom_refused = 0  # publishes refused at once since then
        self.oom_failed = 0  # messages of writes Redis refused since then
        # its Redis client: on Redis Cluster one of its own, so that what a command to a master
        # that does not answer does to a client (a slot map refresh it runs, its connections)
        # holds back no other route
        self.client: Any = None  # redis.asyncio Redis or RedisCluster (None: not connected)
        self.started = 0.0  # monotonic time its last write went out
        self.reads_until = 0.0  # its writes read the node's shards of it (its reader waits) until then

    def filled(self) -> list[Block]:
        """The blocks its shards are filling."""
        filling = self.filling
        return [filling[shard] for shard in self.shards if filling[shard] is not None]

    def holds(self) -> bool:
        return bool(self.writing or self.full or self.filled())

    def staged(self) -> int:
        """Messages staged for the next write."""
        return sum(block.count for block in self.filled())

    def all_blocks(self) -> list[Block]:
        return [*self.writing, *self.full, *self.filled()]

    def drop(self, blocks: list[Block]) -> None:
        """Take `blocks` out of what it fills and what waits to be written."""
        gone = set(map(id, blocks))
        self.full[:] = [block for block in self.full if id(block) not in gone]
        for shard in self.shards:
            if id(self.filling[shard]) in gone:
                self.filling[shard] = None


class ShardLinks:
    """Clients, the script, the checks of the shards' epochs (a part of RedisBackplane).

    The parts of RedisBackplane share its state (set up by its __init__ and start) and call
    each other's methods: those names are public, the internal API of the class family, used
    by broker.cluster.streams, .reader and .writer only. Each part declares below what it
    uses of the others."""

    # set up by RedisBackplane (annotations only)
    url: str
    shards: int
    node: bytes  # this node's name in the streams
    counters: list[str]  # per shard, its counters' key
    streams: list[str]  # per shard, its stream's key
    cluster: bool  # Redis is a Redis Cluster
    cluster_options: dict[str, Any]
    redis: Any  # commands and writes: redis.asyncio Redis or RedisCluster, as `cluster` says (None: not connected)
    readers: list[Any]  # the blocking XREAD clients (as `redis`)
    routes: list[Route]
    script_sha: str
    shard_epochs: ShardEpochs
    epochs: list[int]
    stats: BackplaneStats
    router: Router | None

    if TYPE_CHECKING:  # of the writer (broker.cluster.writer)

        def trim(self) -> tuple[str, str]: ...

    async def route_clients(self) -> None:
        """On Redis Cluster: a client for each route, that knows the slot map from the start
        and every node the first client found (so that none needs redis_url's node later)."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        await self.redis.initialize()
        for route in self.routes:
            seeds = [ClusterNode(node.host, node.port) for node in known_nodes(self.redis)]
            route.client = RedisCluster.from_url(self.url, startup_nodes=seeds, **self.cluster_options)
            await route.client.initialize()

    async def close_clients(self) -> None:
        routes = [route.client for route in self.routes if route.client is not None and route.client is not self.redis]
        for client in [self.redis, *routes, *self.readers]:
            if client is not None:
                await self.close_client(client)
        self.redis = None
        self.readers = []
        for route in self.routes:
            route.client = None

    async def close_client(self, client) -> None:
        try:
            await client.aclose()
        except Exception:  # closing a broken connection: nothing more to do
            pass
        if self.cluster:
            # after a connection error redis-py marks a cluster client for rediscovery, and
            # its aclose() then closes nothing: disconnect every node it knows of
            for node in known_nodes(client):
                try:
                    await node.disconnect()
                except Exception:  # closing a broken connection: nothing more to do
                    pass

    async def load_script(self) -> None:
        sha = await self._script_load_cluster() if self.cluster else await self.redis.script_load(scripts.WRITE)
        self.script_sha = sha.decode() if isinstance(sha, bytes) else sha
        self.stats.commands += 1

    async def _script_load_cluster(self) -> str:
        sha = ""
        for node in self.redis.get_primaries():
            sha = await self.redis.execute_command("SCRIPT", "LOAD", scripts.WRITE, target_nodes=node)
        return sha

    async def learn_epochs(self) -> None:
        """Every shard's epoch and write count: the ones Redis holds, or a new epoch set now."""
        for shard, (epoch, count, _) in zip(range(self.shards), await self.check(list(range(self.shards)), self.redis)):
            self.shard_epochs.move(shard, epoch)
            self.shard_epochs.know(shard, epoch, count)

    async def check(self, shards: list[int], client, write: bool = False) -> list[tuple[int, int, int]]:
        """Run scripts.CHECK on the shards: each one's (epoch, write count, 1 if this check
        started the epoch because Redis held less than this node knows); with `write`, the
        check also makes a write that changes nothing (Redis out of memory refuses it). Rare
        (at start, after failures): EVAL, so that a Redis that lost its scripts needs nothing
        loaded."""
        trim = self.trim()
        calls = []
        for shard in shards:
            known_epoch, known_count = self.shard_epochs.known[shard]
            calls.append(
                (
                    self.counters[shard],
                    self.streams[shard],
                    unique_epoch(known_epoch),
                    known_epoch,
                    known_count,
                    self.node,
                    *trim,
                    "1" if write else "",
                )
            )
        self.stats.commands += len(calls)
        if self.cluster:  # at once: a master that does not answer holds back no other's check
            outcomes = await asyncio.gather(*(client.eval(scripts.CHECK, 2, *call) for call in calls), return_exceptions=True)
            replies = []
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                replies.append(outcome)
        else:
            pipe = client.pipeline(transaction=False)
            for call in calls:
                pipe.eval(scripts.CHECK, 2, *call)
            replies = await pipe.execute()
        return [(int(epoch), int(count), int(moved)) for epoch, count, moved in replies]

    def checked(self, shard: int, epoch: int, count: int, moved: int) -> None:
        """A check's reply: a new epoch ends the one delivered in."""
        if moved and not self.shard_epochs.repeated[shard]:  # else counted when the repeat was read
            self.rolled_back(shard, epoch)
        if self.shard_epochs.checked(shard, epoch, count):
            self.move_to_epoch(shard, epoch)

    def rolled_back(self, shard: int, epoch: int) -> None:
        """This node's script started a new epoch: Redis held less of the shard than it knew."""
        self.stats.rollbacks += 1
        known_epoch, known_count = self.shard_epochs.known[shard]
        log.warning(
            "cluster backplane: Redis holds less of shard %d than this node saw (epoch %d, write %s): it lost writes or went back in time; the shard continues in epoch %d",
            shard,
            known_epoch,
            "?" if known_count >= FORKED else known_count,
            epoch,
        )

    def move_to_epoch(self, shard: int, epoch: int) -> None:
        """The shard continues in a later epoch: the one delivered in ends for every receiver
        of its topics here."""
        old = self.epochs[shard]
        self.shard_epochs.move(shard, epoch)
        self.stats.epoch_changes += 1
        log.warning("cluster backplane: shard %d continues in epoch %d; epoch %d ended (Redis lost entries of it)", shard, epoch, old)
        router = self.router
        if router is not None:
            shards = self.shards
            router.end_epochs([state for state in list(router.topics.values()) if zlib.crc32(state.key) % shards == shard], epoch)


def out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a command (or a script's write) for maxmemory."""
    from redis.exceptions import OutOfMemoryError

    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


def known_nodes(client) -> list:
    """Every node a Redis Cluster client knows of: the slot map's and its startup nodes."""
    nodes = {id(node): node for node in [*client.get_nodes(), *client.nodes_manager.startup_nodes.values()]}
    return list(nodes.values())


def id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def without_password(url: str) -> str:
    """The URL without its user and password (for logs and errors)."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
