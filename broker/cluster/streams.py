"""The Redis Streams backplane: broker nodes (processes, machines) joined through Redis.

Topics hash (CRC-32 of the name) to `redis_shards` shards. Each shard is two Redis keys under
one hash tag, `{PREFIX:N}`, so that Redis Cluster keeps them in one slot and spreads the shards
over its slots:

- `{PREFIX:N}:s`, the shard's stream: one entry per publishing node per tick that published
  to the shard, `n` (node), `w` (the node's write number), `e` (epoch), `c` (the shard's write
  count in the epoch), `s` (MessagePack, the first sequence number of each topic's batch) and
  `d` (MessagePack `[[topic, [payload, ...]], ...]`, the batches in the order of `s`);
- `{PREFIX:N}:h`, the shard's counters: field `""` the shard's epoch, `.count` its write
  count, one field per topic the topic's last sequence number.

A node sequences nothing itself. What its clients publish in a tick is handed over at the end
of the tick (`stage`, compiled), one block per shard; a write is one EVALSHA of
`scripts.WRITE`, which per block numbers the batches (HMGET and HSET of the topics' last
numbers) and appends the entry (XADD, trimmed with MAXLEN ~ or MINID ~) atomically, then reads
what the node reads of those shards since its positions. So per topic the order of the stream
is the order of the numbers, and every node delivers in it. Writers are independent per route
(`_Route`): on one Redis one writer sends every shard's block in one script call; on a Redis
Cluster each shard has a writer of its own, so a master that is slow or gone holds back only
its own shards. While a write is out, the next ticks' publishes wait and go in the next one:
the busier the node, the more messages per Redis command; a quiet node writes at most once per
`redis_batch_ms` (unless a write holds EAGER_MESSAGES), and its reader reads at most that
often, so that few messages cost few commands.

A node reads the shards its subscriptions need (with `redis_read = "all"`, every shard;
with its writes while it writes, else with a blocking XREAD from the last entry it read, one
command for all of them on a single Redis, one per shard on a cluster) and hands each entry's batches to the router (`Router.deliver_remote`),
its own entries included: local and remote messages reach subscribers by one path, in one
order. Before the first subscription that needs a shard is made (`reads`; the subscription
waits, `Router.interest`), the node loads what the shard's stream holds after what it read of
it before, or from the last `history_max_age_s`, into its history, so that the subscription's
ack and its recovery (`since`, `last`) are exact on a node that just started or that a client
just moved to. A shard no subscription needed for INTEREST_GRACE_S is read no more.

Acks: a publish with a request id is acknowledged when the script's reply gives its number.
A write whose reply was lost (timeout, broken connection) is in doubt: it is sent again as it
was, and the script, which keeps per node and shard the last write made (`{PREFIX:N}:w:NODE`,
for a day), answers a repeat with the numbers the first one got instead of appending twice.
A publish with a msg_id is recognised by the script when the same msg_id was published to the
topic through any node within the dedupe window (`{PREFIX:N}:i:WINDOW`, scripts.WRITE): it is
acknowledged with the first one's numbers and not published again.
Every block is answered by `redis_timeout_s` after its first message was published, wherever
it is then (staged, out, or waiting to be sent again): a timer fails it (`_answer_late`), so no wait
depends on how long a command to a stuck Redis takes. Acks then become err 18 (UNAVAILABLE),
fire-and-forget messages are counted (`failed`) and logged. While more than
`redis_max_buffer_bytes` wait, publishes are refused at once with err 18; after a write failed
that way, so are publishes to the shards of its route, until Redis answers for them again.

Redis that comes back older than a node saw it (an older snapshot, a replica promoted without
the last writes) is found by the write count (broker.cluster.epochs, broker.cluster.scripts):
on every write, on every entry read, and by a check of every shard after a command failed.
The shard then continues in a new epoch and the old one ends for every receiver with a gap
(cause `ended`), so no position is given to two messages.

A command that keeps failing is logged at its first failure, again at 2, 4, 8, ... failures
in a row with the count, and when it works again; `read_failures` (per shard) and
`write_failures` count the failures in a row now. On Redis Cluster each reader sends its XREAD
to the master its shard's slot map names (redis-py would ask another node for the keys of
XREAD, one that may be gone), and a reader that failed READER_RENEW times in a row starts
afresh with a new client that knows every node the old one knew.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import zlib
from collections import deque
from typing import Annotated, Callable

import msgspec

from ..backplane import unique_epoch
from ..config import read_secret
from ..errors import ConfigError, ErrorCode, RequestError
from ..fastpath import Block, TopicState, stamp
from ..history import History
from ..fastpath import stage as stage_batches
from ..topics import is_pattern
from . import scripts
from .epochs import FORKED, NEW_EPOCH, REPEAT, SKIP, ShardEpochs

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
READER_RENEW = 10  # failed reads in a row after which a Redis Cluster reader gets a new client
# A read that has not come back STALL_S after its block ended means Redis does not answer:
# the node reports it (readiness, broker_backplane_connected, the lag) within the block plus
# this, publishing or not, without a command of its own (docs/operations.md says 3 s).
STALL_S = 1.0

_data = msgspec.msgpack.Decoder(list[tuple[str, list[bytes]]])
_firsts = msgspec.msgpack.Decoder(list[Annotated[int, msgspec.Meta(ge=1, le=1 << 62)]])
_repeats = msgspec.msgpack.Decoder(list[str | int])  # topic, index, "epoch seq", ... (Lua's strings are MessagePack str)
_encode = msgspec.msgpack.Encoder().encode

WOKEN = object()  # what a read cut short for a change of the shards to read returns

Ok = Callable[[int, int], None]
Fail = Callable[[int, str], None]


class BackplaneStats:
    """Counters of the Redis backplane (exported as metrics)."""

    __slots__ = (
        "writes", "scripts", "entries_written", "messages_written", "bytes_written", "reads", "entries_read",
        "messages_read", "bytes_read", "commands", "reconnects", "in_doubt", "failed", "unknown", "refused",
        "lag_ms", "epoch_changes", "rollbacks", "read_failures", "write_failures", "repeats", "unreplicated",
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
        self.write_failures = 0  # the attempts (writes; checks while its shards refuse publishes) that failed in a row, now, of the writer that fails most


class _Route:
    """The shards one writer task writes, and what it holds for them. On one Redis one route
    holds every shard (a write is one script call: one round trip); on a Redis Cluster each shard
    is a route of its own, so that a master that is slow or gone holds back no other's shards."""

    __slots__ = (
        "name", "shards", "filling", "full", "writing", "down", "failures", "wake", "oom_since", "oom_refused", "oom_failed", "client",
        "started", "reads_until",
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
        self.client = None
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


class RedisBackplane:
    """Sequencing in Redis, history here (a held broker.history.History, filled from the
    streams), delivery from the streams. A Backplane with the Sequencer ability
    (broker.backplane)."""

    def __init__(self, config, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.history = History(
            self.now_ms,
            max_messages=config.history_max_messages,
            max_bytes=config.history_max_bytes,
            max_age_s=config.history_max_age_s,
            max_total_bytes=config.history_max_total_bytes,
        )
        self.store = self.history.store  # the emit path retains through it (None: no history)
        self.url = config.redis_url
        self.password = read_secret(config, "redis_password")  # redis_password_file: kept out of the URL
        self.shards = config.redis_shards
        self.prefix = config.redis_prefix
        self.timeout = config.redis_timeout_s
        self.max_buffer = config.redis_max_buffer_bytes
        self.maxlen = config.redis_stream_maxlen
        self.max_age_ms = int(config.history_max_age_s * 1000)
        self.stream_age_ms = int(config.redis_stream_max_age_s * 1000)
        self.min_replicas = config.redis_min_replicas
        self.read_all = config.redis_read == "all"
        self.batch_s = config.redis_batch_ms / 1000  # a route writes, and a reader reads, at most once per this
        self.dedupe_ms = int(config.dedupe_window_s * 1000)  # msg_ids are recognised across nodes for at least this long
        self.node = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}".encode()
        self.counters = [f"{{{self.prefix}:{i}}}:h" for i in range(self.shards)]
        self.streams = [f"{{{self.prefix}:{i}}}:s" for i in range(self.shards)]
        self.stream_shard = {name.encode(): i for i, name in enumerate(self.streams)}
        self._marks = [f"{{{self.prefix}:{i}}}:w:{self.node.decode()}" for i in range(self.shards)]
        self._ids = [f"{{{self.prefix}:{i}}}:i:" for i in range(self.shards)]  # + the dedupe window's number
        self.shard_epochs = ShardEpochs(self.shards)
        self.epochs = self.shard_epochs.epochs  # per shard, the epoch this node delivers in
        self.positions: list[bytes] = [b"0-0"] * self.shards  # the last entry read, per shard
        self._at_ms = 0  # while loaded entries are delivered: the time of theirs history keeps (0: now)
        self._taken: deque = deque()  # (shard, entries, dated) read and not handed to the router yet, in order
        self._handing = False  # a hand-over is scheduled
        self._reading: set[int] = set()  # shards read (loaded first): those subscriptions need, or every one
        self._wanted: set[int] = set()  # shards subscriptions wait for (being loaded)
        self._unneeded: dict[int, float] = {}  # shard read that no subscription needs -> since when
        self._reviewed = 0.0
        self._loader: asyncio.Task | None = None
        self._woken: list[asyncio.Event] = []  # per reader: the shards to read changed
        self._asked = [0.0] * self.shards  # per shard: monotonic time its reader's command went out (0: none out)
        self._patience = [0.0] * self.shards  # per shard: how long that command may take (a blocking read's block + STALL_S; a ping STALL_S)
        self._read_at = [time.monotonic()] * self.shards  # per shard: when a read of it last came back
        self.stats = BackplaneStats(self.shards)
        self.accepting = False  # every shard takes publishes (and the compiled path may stamp them); False until start() connected
        self.buffered = 0  # payload bytes staged or being written
        self.cluster = False
        self.block_ms = BLOCK_MS
        self.router = None
        self._routes: list[_Route] = []  # made at start: one, or one per shard on a cluster
        self._route_of: list[_Route] = []  # per shard
        self._filling: list[Block | None] = [None] * self.shards  # per shard, the block staged publishes go to
        self._full_of: list[list[Block]] = []  # per shard, its route's list of full blocks
        self._buffer_full = False  # past redis_max_buffer_bytes, until half of it is written
        self._expiry: asyncio.TimerHandle | None = None  # answers the oldest block at its deadline
        self._waiting: dict[TopicState, list] = {}  # provisional seq, ok, fail per staged-to-be publish
        self._writes = 0
        self._writers: list[asyncio.Task] = []
        self._tasks: list[asyncio.Task] = []  # the readers
        self._closing = False
        self._redis = None  # commands and writes
        self._readers: list = []  # blocking XREAD clients
        self._reader_options: dict = {}
        self._cluster_options: dict = {}
        self._sha = ""

    # the seam

    def topic_epoch(self, name: str) -> int:
        return self.epochs[self.shard_of(name)]

    def shard_of(self, name: str) -> int:
        return zlib.crc32(name.encode()) % self.shards

    def publish(self, state: TopicState, payload: bytes, dirty: list, on_sequenced: Ok | None = None, on_failed: Fail | None = None, msg_id: str = "") -> None:
        """Add `payload` to the topic's pending batch, numbered for now in this node's count
        (the compiled publish path does the same); `stage` hands it over at the end of the
        tick, and `on_sequenced(epoch, seq)` (or `on_failed(code, text)`) follows: with a
        `msg_id` published to the topic before (through any node, within the dedupe window),
        the first one's numbers, and it is not published again. The router asked
        `refusal(state)` first."""
        stamp(state, payload, dirty)
        if on_sequenced is not None:
            waiting = self._waiting.get(state)
            if waiting is None:
                waiting = self._waiting[state] = []
            waiting.append((state.seq, on_sequenced, on_failed, msg_id if self.dedupe_ms else ""))
        return None

    def reads(self, pattern: str) -> bool:
        """Whether this node reads (having loaded them) the shards a subscription to `pattern`
        needs: the topic's, or every one for a pattern. If not, it starts loading them and
        calls `router.loaded()` once it has, or once Redis has not answered the loads for
        redis_timeout_s (the subscriptions that waited are refused)."""
        reading = self._reading
        if len(reading) == self.shards:
            return True
        missing = [shard for shard in (range(self.shards) if is_pattern(pattern) else (self.shard_of(pattern),)) if shard not in reading]
        if not missing:
            return True
        self._wanted.update(missing)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_wanted())
        return False

    def refusal(self, state: TopicState | None = None) -> str | None:
        """While `accepting` is False: why a publish to the topic is refused now (err 18), or
        None when its shard takes it (another shard's route is down)."""
        if self._buffer_full or self._closing:
            text = f"the cluster backplane (Redis) holds {self.buffered} bytes of publishes not yet written, its limit; not published (retry later)"
        else:
            route = self._route_of[zlib.crc32(state.key) % self.shards] if state is not None and self._route_of else None
            if route is not None and not route.down:
                return None
            if route is not None and route.oom_since:
                route.oom_refused += 1
                text = OUT_OF_MEMORY
            else:
                text = "the cluster backplane (Redis) does not answer; not published (retry later)"
        self.stats.refused += 1
        return text

    @property
    def ready(self) -> bool:
        """Whether the node takes publishes at all (readiness): not stopping, the buffer below
        its limit, and Redis answering the reads and writes of at least one shard."""
        if self._closing or self._buffer_full:
            return False
        now = time.monotonic()
        return any(self._reachable(shard, now) and not self._route_of[shard].down for shard in range(self.shards))

    @property
    def connected(self) -> bool:
        """Whether Redis answers the reads and takes the writes of every shard now."""
        now = time.monotonic()
        return bool(self._routes) and not any(route.down for route in self._routes) and all(self._reachable(shard, now) for shard in range(self.shards))

    def _reachable(self, shard: int, now: float) -> bool:
        """The shard's reads work: the last one came back, and the one out now is not late."""
        asked = self._asked[shard]
        return self.stats.read_failures[shard] == 0 and not (asked and now - asked > self._patience[shard])

    def lags_s(self) -> list[float]:
        """Per shard, how far behind this node may be, in seconds: while its reads work, how
        old the newest entry read was when it was read (0 after a read found nothing new);
        while they fail or are late, the time since one last came back, which grows."""
        now = time.monotonic()
        lags = []
        for shard, lag_ms in enumerate(self.stats.lag_ms):
            lag = lag_ms / 1000
            if not self._reachable(shard, now):
                lag = max(lag, now - self._read_at[shard])
            lags.append(lag)
        return lags

    def _update_accepting(self) -> None:
        self.accepting = not self._closing and not self._buffer_full and not any(route.down for route in self._routes)

    def stage(self, states: list[TopicState]) -> int:
        """Take the topics' pending batches for the next write and give each topic back the
        sequence number it had (numbers come from Redis). Returns the messages taken."""
        now = time.monotonic()
        taken, size, made = stage_batches(states, self._filling, self._full_of, self._waiting, self.shards, now, BLOCK_BYTES)
        if taken:
            self.buffered += size
            if made and self._expiry is None:
                self._arm(now)
            if self.buffered > self.max_buffer:
                self._buffer_full = True
                self.accepting = False
            for route in self._routes:
                if route.full or route.filled():
                    route.wake.set()
        return taken

    # start and stop

    async def start(self, router) -> None:
        """Connect, learn every shard's epoch, load the retained history, start reading and
        writing. Raises ConfigError when Redis cannot be used within redis_timeout_s."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.router = router
        options = dict(socket_timeout=self.timeout, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), decode_responses=False)
        if self.password:
            options["password"] = self.password
        deadline = time.monotonic() + self.timeout
        probe = aioredis.Redis.from_url(self.url, **options)
        try:
            while True:
                try:
                    info = await probe.info("cluster")
                    break
                except aioredis.AuthenticationError as exc:  # no use retrying
                    where = "redis_password_file" if self.password else "the password in redis_url, or redis_password_file"
                    raise ConfigError(f"redis_url: Redis at {without_password(self.url)} refused the credentials ({where}): {exc}") from None
                except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        raise ConfigError(f"redis_url: cannot reach Redis at {without_password(self.url)} within redis_timeout_s ({self.timeout:g} s): {exc}") from None
                    await asyncio.sleep(0.2)
                except aioredis.ResponseError as exc:
                    raise ConfigError(f"redis_url: Redis at {without_password(self.url)} refused: {exc}") from None
        finally:
            await probe.aclose()
        self.cluster = bool(info.get("cluster_enabled"))
        if self.cluster:
            self._routes = [_Route(f"writing shard {i}", [i], self._filling) for i in range(self.shards)]
            self._route_of = list(self._routes)
        else:
            self._routes = [_Route("writing to Redis", list(range(self.shards)), self._filling)]
            self._route_of = self._routes * self.shards
        self._full_of = [route.full for route in self._route_of]
        self.block_ms = CLUSTER_BLOCK_MS if self.cluster else BLOCK_MS
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster

            cluster_options = self._cluster_options = dict(options)  # retry: none (redis-py would retry each command 10 times)
            self._redis = RedisCluster.from_url(self.url, **cluster_options)
            self._reader_options = dict(cluster_options, socket_timeout=self.timeout + CLUSTER_BLOCK_MS / 1000)
            self._readers = [RedisCluster.from_url(self.url, **self._reader_options) for _ in range(self.shards)]
        else:
            self._redis = aioredis.Redis.from_url(self.url, **options)
            for route in self._routes:
                route.client = self._redis
            self._readers = [aioredis.Redis.from_url(self.url, **dict(options, socket_timeout=self.timeout + BLOCK_MS / 1000))]
        try:
            if self.cluster:
                await self._route_clients()
            await self._load_script()
            await self._learn_epochs()
            if self.read_all:
                for shard in range(self.shards):
                    await self._load(shard)
                self._reading = set(range(self.shards))
        except (OSError, aioredis.RedisError) as exc:
            await self._close_clients()
            raise ConfigError(f"redis_url: Redis at {without_password(self.url)} could not be used: {exc}") from None
        self.accepting = True
        loop = asyncio.get_running_loop()
        self._writers = [loop.create_task(self._write_loop(route)) for route in self._routes]
        self._woken = [asyncio.Event() for _ in self._readers]
        if self.cluster:
            self._tasks.extend(loop.create_task(self._read_loop([i], i)) for i in range(self.shards))
        else:
            self._tasks.append(loop.create_task(self._read_loop(list(range(self.shards)), 0)))

    async def stop(self) -> None:
        """Write what is staged (waiting at most redis_timeout_s), then stop reading."""
        self._closing = True
        self.accepting = False
        if self._writers:
            for route in self._routes:
                route.wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained()), self.timeout)
            except asyncio.TimeoutError:
                pass
            for writer in self._writers:
                writer.cancel()
            await asyncio.gather(*self._writers, return_exceptions=True)
            self._writers = []
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
            self._loader = None
        for event in self._woken:
            event.set()  # a reader that reads nothing waits on it
        if self._tasks:
            readers = self._tasks
            if self.cluster:
                # redis-py's cluster client does not come back from a cancelled blocking read:
                # its readers stop by themselves when their XREAD returns (within BLOCK_MS)
                await asyncio.wait(readers, timeout=self.block_ms / 1000 + self.timeout)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            self._tasks = []
        self._fail_all("the broker node stopped before Redis took the publish")
        await self._close_clients()

    async def _drained(self) -> None:
        while any(route.holds() for route in self._routes):
            await asyncio.sleep(0.01)

    async def _route_clients(self) -> None:
        """On Redis Cluster: a client for each route, that knows the slot map from the start
        and every node the first client found (so that none needs redis_url's node later)."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        await self._redis.initialize()
        for route in self._routes:
            seeds = [ClusterNode(node.host, node.port) for node in _known_nodes(self._redis)]
            route.client = RedisCluster.from_url(self.url, startup_nodes=seeds, **self._cluster_options)
            await route.client.initialize()

    async def _close_clients(self) -> None:
        routes = [route.client for route in self._routes if route.client is not None and route.client is not self._redis]
        for client in [self._redis, *routes, *self._readers]:
            if client is not None:
                await self._close_client(client)
        self._redis = None
        self._readers = []
        for route in self._routes:
            route.client = None

    async def _close_client(self, client) -> None:
        try:
            await client.aclose()
        except Exception:  # closing a broken connection: nothing more to do
            pass
        if self.cluster:
            # after a connection error redis-py marks a cluster client for rediscovery, and
            # its aclose() then closes nothing: disconnect every node it knows of
            for node in _known_nodes(client):
                try:
                    await node.disconnect()
                except Exception:  # closing a broken connection: nothing more to do
                    pass

    async def _load_script(self) -> None:
        sha = await self._script_load_cluster() if self.cluster else await self._redis.script_load(scripts.WRITE)
        self._sha = sha.decode() if isinstance(sha, bytes) else sha
        self.stats.commands += 1

    async def _script_load_cluster(self) -> str:
        sha = ""
        for node in self._redis.get_primaries():
            sha = await self._redis.execute_command("SCRIPT", "LOAD", scripts.WRITE, target_nodes=node)
        return sha

    async def _learn_epochs(self) -> None:
        """Every shard's epoch and write count: the ones Redis holds, or a new epoch set now."""
        for shard, (epoch, count, _) in zip(range(self.shards), await self._check(list(range(self.shards)), self._redis)):
            self.shard_epochs.move(shard, epoch)
            self.shard_epochs.know(shard, epoch, count)

    async def _load(self, shard: int) -> None:
        """Deliver what the shard's stream holds after what this node read of it (a shard it
        never read: from the last history_max_age_s) into history and to the receivers of its
        topics, and read on from there."""
        if self.positions[shard] == b"0-0":
            position = lower = f"{max(0, int(self.clock() * 1000) - self.max_age_ms)}-0".encode()
        else:
            position = self.positions[shard]
            lower = b"(" + position
        while True:
            entries = await self._redis.xrange(self.streams[shard], min=lower, max="+", count=LOAD_COUNT)
            self.stats.commands += 1
            self.stats.reads += 1
            if not entries:
                break
            self._take(shard, entries, dated=True)
            position = entries[-1][0]
            lower = b"(" + position
            if len(entries) < LOAD_COUNT:
                break
        self.positions[shard] = max(position, self.positions[shard], key=_id_key)

    async def _load_wanted(self) -> None:
        """Load the shards subscriptions wait for, then read them, and let the subscriptions
        go on. While Redis does not answer, they are refused once it has not for
        redis_timeout_s, and loading stops until a subscription asks again."""
        failures = 0
        failing = 0.0  # monotonic time the loads began to fail
        refused = None
        while not self._closing:
            todo = sorted(self._wanted - self._reading)
            if not todo:
                break
            attempt = time.monotonic()
            try:
                for shard in todo:
                    await self._load(shard)
                    self._reading.add(shard)
                    self._unneeded.pop(shard, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors; on a cluster also RedisClusterException
                failures += 1
                failing = failing or attempt
                self._failed("loading a shard stream a subscription needs", failures, exc)
                if time.monotonic() - failing >= self.timeout:
                    refused = f"the cluster backplane (Redis) did not answer within redis_timeout_s ({self.timeout:g} s): this node could not load the shard stream the subscription needs; not subscribed (retry later)"
                    break
                await asyncio.sleep(RETRY_S[min(failures - 1, len(RETRY_S) - 1)])
                continue
            failing = 0.0
            if failures:
                log.warning("cluster backplane: loading shard streams works again after %d failed attempt(s)", failures)
                failures = 0
        self._wanted.clear()
        for event in self._woken:
            event.set()
        if self.router is not None:
            self.router.loaded(refused)

    # history (broker.history)

    @property
    def total(self) -> int:
        """Bytes counted over every topic's history."""
        return self.history.total

    @property
    def trimmed(self) -> int:
        """Messages dropped from history by any bound."""
        return self.history.trimmed

    def retain(self, state: TopicState, first: int, payloads: list[bytes], now_ms: int | None = None) -> None:
        self.history.retain(state, first, payloads, now_ms)

    def retained(self) -> None:
        self.history.retained()

    def retains(self, state: TopicState, now_ms: int) -> bool:
        return self.history.retains(state, now_ms)

    def forget(self, state: TopicState) -> None:
        self.history.forget(state)

    def latest(self, state: TopicState) -> tuple[int, bytes] | None:
        return self.history.latest(state)

    def since(self, state: TopicState, seq: int, max_bytes: int | None = None) -> tuple[int, list[tuple[int, list[bytes]]]]:
        return self.history.since(state, seq, max_bytes)

    def since_time(self, state: TopicState, time_ms: int) -> tuple[bool, int, list[tuple[int, list[bytes]]]]:
        return self.history.since_time(state, time_ms)

    def sweep(self, now_ms: int | None = None) -> None:
        """Forget history past its age; now and then, stop reading the shards no subscription
        needs."""
        self.history.sweep(now_ms)
        if not self.read_all and self.router is not None:
            now = time.monotonic()
            if now - self._reviewed >= INTEREST_REVIEW_S:
                self._reviewed = now
                self._review_interest(now)

    def _review_interest(self, now: float) -> None:
        """Stop reading the shards no subscription has needed for INTEREST_GRACE_S (a later
        subscription loads what it missed first)."""
        patterns, topics = self.router.subscribed()
        if patterns:
            self._unneeded.clear()
            return
        needed = {self.shard_of(name) for name in topics} | self._wanted
        for shard in list(self._reading):
            if shard in needed:
                self._unneeded.pop(shard, None)
            elif now - self._unneeded.setdefault(shard, now) >= INTEREST_GRACE_S:
                self._reading.discard(shard)
                del self._unneeded[shard]

    # reading

    async def _read_loop(self, shards: list[int], reader: int) -> None:
        """Read those of `shards` the node reads (`_reading`) with client
        `self._readers[reader]` until the node stops; with none of them, PING Redis every
        block instead, so that the node knows it answers (`_reachable`). After a failure the
        shards are checked before reading on (Redis may have come back older), and so is a
        shard whose stream repeated a write count."""
        failures = 0
        asked = self._asked
        woken = self._woken[reader]
        route = self._route_of[shards[0]]  # the writer of these shards (one route holds them all)
        last = 0.0  # when this reader's last read went out
        brought = 0  # the messages it brought
        what = f"reading shard {shards[0]}" if len(shards) == 1 else "reading the shard streams"
        while not self._closing:
            client = self._readers[reader]
            unchecked = self.shard_epochs.unchecked
            woken.clear()
            reading = [shard for shard in shards if shard in self._reading]
            now = time.monotonic()
            if reading and not failures and not unchecked:
                # while the route's writes read these shards, they need no read of their own;
                # and a read goes out at most once per redis_batch_ms
                pause = max(route.reads_until - now, last + self.batch_s - now if brought < EAGER_MESSAGES else 0.0)
                if pause > 0:
                    try:
                        await asyncio.wait_for(woken.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
                    continue
                last = now
            patience = self.block_ms / 1000 + STALL_S if reading else STALL_S
            for shard in shards:
                asked[shard] = now
                self._patience[shard] = patience
            try:
                if failures and self.cluster:
                    # the failed read may have gone to a master that is gone: learn the slot
                    # map now (redis-py would only after a command it routes itself failed)
                    await client.initialize()
                if failures or unchecked:
                    todo = shards if failures else [shard for shard in shards if shard in unchecked]
                    if todo:
                        for shard, reply in zip(todo, await self._check(todo, client)):
                            self._checked(shard, *reply)
                if reading:
                    reply = await self._xread(client, reading, woken)
                else:
                    await self._ping(client, shards[0])
                    reply = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors; on a cluster also RedisClusterException
                failures += 1
                for shard in shards:
                    self.stats.read_failures[shard] = failures
                await self._after_failure(what, failures, exc)
                if self.cluster and failures % READER_RENEW == 0 and not self._closing:
                    await self._renew_reader(reader)
                continue
            if failures:
                log.warning("cluster backplane: %s works again after %d failed attempt(s)", what, failures)
                failures = 0
                for shard in shards:
                    self.stats.read_failures[shard] = 0
            now = time.monotonic()
            lag_ms = self.stats.lag_ms
            for shard in shards:
                asked[shard] = 0.0
                self._read_at[shard] = now
                lag_ms[shard] = 0  # nothing new, unless the reply holds entries of it
            self.stats.commands += 1
            if not reading:  # nothing to read: wait for a subscription that needs a shard, or the next ping
                try:
                    await asyncio.wait_for(woken.wait(), self.block_ms / 1000)
                except asyncio.TimeoutError:
                    pass
                continue
            if reply is WOKEN:
                continue
            self.stats.reads += 1
            brought = 0
            if not reply or self._closing:
                continue
            before = self.stats.messages_read
            for stream, entries in reply:
                self._take(self.stream_shard[stream if isinstance(stream, bytes) else stream.encode()], entries)
            brought = self.stats.messages_read - before

    async def _ping(self, client, shard: int) -> None:
        """PING the Redis (on a cluster, the master of the shard's slot) a reader reads nothing of."""
        if not self.cluster:
            await client.ping()
            return
        try:
            node = client.get_node_from_key(self.streams[shard])
        except Exception:  # no slot map yet, or the slot is not covered now: learn it anew
            await client.initialize()
            node = client.get_node_from_key(self.streams[shard])
        await client.execute_command("PING", target_nodes=node)

    async def _xread(self, client, shards: list[int], woken: asyncio.Event):
        """One blocking XREAD of the shards from their positions. On one Redis, a subscription
        that needs a shard not among them cuts it short (WOKEN: the reader reads again with
        that shard; the connection the XREAD was on is dropped, the entries stay in Redis). On
        Redis Cluster (one shard per reader) it goes to the master the client's slot map names
        for the shard: left to redis-py, the keys of XREAD are asked of one node (COMMAND
        GETKEYS), and a reader whose node is gone would fail there for ever, never learning
        the new slot map."""
        if not self.cluster:
            command = client.xread({self.streams[i]: self.positions[i] for i in shards}, count=READ_COUNT, block=self.block_ms)
            if len(shards) == self.shards:
                return await command
            read = asyncio.ensure_future(command)
            wake = asyncio.ensure_future(woken.wait())
            try:
                await asyncio.wait((read, wake), return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the reader is cancelled: nothing left running, no error unread
                wake.cancel()
                if not read.done():
                    read.cancel()
                await asyncio.gather(read, wake, return_exceptions=True)
            if read.cancelled():
                return WOKEN
            return read.result()
        (shard,) = shards
        stream = self.streams[shard]
        try:
            node = client.get_node_from_key(stream)
        except Exception:  # no slot map yet, or the slot is not covered now: learn it anew
            await client.initialize()
            node = client.get_node_from_key(stream)
        return await client.execute_command("XREAD", "COUNT", READ_COUNT, "BLOCK", self.block_ms, "STREAMS", stream, self.positions[shard], target_nodes=node)

    async def _renew_reader(self, reader: int) -> None:
        """Replace a Redis Cluster reader's client by a new one that starts from every node the
        old one knew and the configured URL: whatever state redis-py's client got into, a new
        one learns the cluster as it is now."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        old = self._readers[reader]
        seeds = [ClusterNode(node.host, node.port) for node in _known_nodes(old)]
        self._readers[reader] = RedisCluster.from_url(self.url, startup_nodes=seeds, **self._reader_options)
        log.warning("cluster backplane: reader %d starts with a new Redis Cluster client (seeds: redis_url and %s)", reader, ", ".join(sorted({f"{n.host}:{n.port}" for n in seeds})) or "no other node")
        await self._close_client(old)

    async def _after_failure(self, what: str, failures: int, exc: Exception) -> None:
        """Count and log a failed command (`_failed`), and pause before the next try."""
        self._failed(what, failures, exc)
        await asyncio.sleep(RETRY_S[min(failures - 1, len(RETRY_S) - 1)])

    def _failed(self, what: str, failures: int, exc: Exception) -> None:
        """Count a failed command; log the first of a series and again at 2, 4, 8, ...
        failures in a row (a failure that lasts is seen, a log it does not flood)."""
        self.stats.reconnects += 1
        if failures == 1:
            log.warning("cluster backplane: %s failed (%s); retrying", what, exc)
        elif failures & (failures - 1) == 0:
            log.warning("cluster backplane: %s failed %d times in a row (%s); retrying", what, failures, exc)

    async def _check(self, shards: list[int], client, write: bool = False) -> list[tuple[int, int, int]]:
        """Run scripts.CHECK on the shards: each one's (epoch, write count, 1 if this check
        started the epoch because Redis held less than this node knows); with `write`, the
        check also makes a write that changes nothing (Redis out of memory refuses it). Rare
        (at start, after failures): EVAL, so that a Redis that lost its scripts needs nothing
        loaded."""
        trim = self._trim()
        calls = []
        for shard in shards:
            known_epoch, known_count = self.shard_epochs.known[shard]
            calls.append((self.counters[shard], self.streams[shard], unique_epoch(known_epoch), known_epoch, known_count, self.node, *trim, "1" if write else ""))
        self.stats.commands += len(calls)
        if self.cluster:  # at once: a master that does not answer holds back no other's check
            replies = await asyncio.gather(*(client.eval(scripts.CHECK, 2, *call) for call in calls), return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        else:
            pipe = client.pipeline(transaction=False)
            for call in calls:
                pipe.eval(scripts.CHECK, 2, *call)
            replies = await pipe.execute()
        return [(int(epoch), int(count), int(moved)) for epoch, count, moved in replies]

    def _checked(self, shard: int, epoch: int, count: int, moved: int) -> None:
        """A check's reply: a new epoch ends the one delivered in."""
        if moved and not self.shard_epochs.repeated[shard]:  # else counted when the repeat was read
            self._rolled_back(shard, epoch)
        if self.shard_epochs.checked(shard, epoch, count):
            self._move(shard, epoch)

    def _rolled_back(self, shard: int, epoch: int) -> None:
        """This node's script started a new epoch: Redis held less of the shard than it knew."""
        self.stats.rollbacks += 1
        known_epoch, known_count = self.shard_epochs.known[shard]
        log.warning(
            "cluster backplane: Redis holds less of shard %d than this node saw (epoch %d, write %s): it lost writes or went back in time; the shard continues in epoch %d",
            shard, known_epoch, "?" if known_count >= FORKED else known_count, epoch,
        )

    def _move(self, shard: int, epoch: int) -> None:
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

    def _take(self, shard: int, entries: list, dated: bool = False, later: bool = False) -> None:
        """Take a shard's entries read: the shard's position moves past them now; their
        batches go to the router in stream order, through one queue for every read, at once or
        (`later`: a write's reply, so that the writer sends its next write before the node
        delivers these) in the loop's next turn. Entries at or before the position were taken
        already (a write's read and the reader's may both bring one): skipped."""
        position = _id_key(self.positions[shard])
        if _id_key(entries[-1][0]) <= position:
            return
        fresh = [entry for entry in entries if _id_key(entry[0]) > position]
        last = entries[-1][0]
        self.positions[shard] = last
        self.stats.entries_read += len(fresh)
        self.stats.lag_ms[shard] = max(0, int(self.clock() * 1000) - int(last.split(b"-")[0]))
        self._taken.append((shard, fresh, dated))
        if not later:
            self._hand_over()
        elif not self._handing:
            self._handing = True
            asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Hand what was taken to the router, in the order it was taken."""
        self._handing = False
        taken = self._taken
        while taken:
            shard, entries, dated = taken.popleft()
            try:
                self._deliver_entries(shard, entries, dated)
            except Exception:  # a bug or an entry no broker wrote: reading goes on after it
                log.exception("cluster backplane: entries of %s up to %s could not be delivered", self.streams[shard], entries[-1][0])

    def _deliver_entries(self, shard: int, entries: list, dated: bool) -> None:
        """Hand the batches of a shard's entries to the router, in stream order; an entry of a
        later epoch ends the one delivered in first; one that repeats a write count is held
        back, and the shard checked (broker.cluster.epochs). `dated` (a load of what the
        stream held): history keeps each message with the time of its entry, not now, so that
        a recovery by time (a pattern's `since`) does not take it for a new one. Fields may
        come as a dict (XREAD) or a flat list (a script's reply)."""
        taken = []
        stats = self.stats
        epochs = self.shard_epochs
        size = 0
        second = 0  # with `dated`: the second of the entries in `taken`
        for entry_id, fields in entries:
            if type(fields) is list:
                fields = dict(zip(fields[::2], fields[1::2]))
            if dated:
                ms = _id_key(entry_id)[0]
                if taken and ms // 1000 != second:
                    stats.messages_read += self._deliver(taken, second * 1000)
                    taken = []
                second = ms // 1000
            try:
                epoch = int(fields[b"e"])
                if not 0 < epoch < 1 << 63:
                    raise ValueError("epoch out of range")
                count = int(fields.get(b"c", 0))
                if not 0 <= count < FORKED:
                    raise ValueError("write count out of range")
                write = int(fields[b"w"]) if fields.get(b"n") == self.node else 0
                data = fields[b"d"]
                batches = _data.decode(data)
                firsts = _firsts.decode(fields[b"s"])
            except (KeyError, ValueError, msgspec.DecodeError):
                log.error("cluster backplane: entry %s of %s is not one of this broker's; skipped", entry_id, self.streams[shard])
                continue
            verdict = epochs.entry(shard, epoch, count, write)
            if verdict == SKIP:
                continue
            if verdict == NEW_EPOCH or verdict == REPEAT:  # what came before goes out first
                if taken:
                    stats.messages_read += self._deliver(taken, second * 1000 if dated else 0)
                    taken = []
                if verdict == REPEAT:
                    stats.rollbacks += 1
                    log.warning(
                        "cluster backplane: entry %s of %s repeats write %d of epoch %d (this node read up to %d, or made that write itself): Redis went back in time; the epoch ends",
                        entry_id, self.streams[shard], count, epoch, epochs.read[shard],
                    )
                    continue
                self._move(shard, epoch)
                epochs.entry(shard, epoch, count, write)
            if batches:
                taken.append((epoch, batches, firsts))
                size += len(data)
        stats.bytes_read += size
        if taken:
            stats.messages_read += self._deliver(taken, second * 1000 if dated else 0)

    def _deliver(self, taken: list, at_ms: int = 0) -> int:
        """Hand batches to the router; `at_ms`: the time history keeps them with (0: now)."""
        if self.router is None:
            return 0
        self._at_ms = at_ms
        try:
            return self.router.deliver_remote(taken)
        finally:
            self._at_ms = 0

    def now_ms(self) -> int:
        return self._at_ms or int(self.clock() * 1000)

    # writing

    async def _write_loop(self, route: _Route) -> None:
        """Send the route's blocks, at most one per shard per write, until the node stops. A
        write that failed is sent again as it was (the script answers a repeat with the first
        one's numbers), unless its deadline passed meanwhile (`_answer_late`). While the route is
        down and holds nothing, its shards are checked every PROBE_S."""
        import redis.asyncio as aioredis

        while True:
            if not route.writing:
                if not (route.full or route.filled()):
                    if self._closing:
                        return
                    route.wake.clear()
                    if route.down:
                        try:
                            await asyncio.wait_for(route.wake.wait(), PROBE_S)
                        except asyncio.TimeoutError:
                            pass
                        if route.down:
                            error = await self._probe(route)
                            if error is None:
                                pass
                            elif route.oom_since and _out_of_memory(error):  # said once when it began
                                route.failures += 1
                                self._count_write_failures()
                            else:  # the probe is the writer's attempt while its shards refuse publishes
                                self._write_failed(route, f"checking {'Redis' if len(route.shards) > 1 else f'shard {route.shards[0]}'} (publishes are refused meanwhile)", error)
                        continue
                    await route.wake.wait()
                    continue
                # redis_batch_ms: at most one write per interval, what comes meanwhile goes in
                # it; a write of EAGER_MESSAGES or more (a busy node: few commands per message
                # anyway), a full block or stopping does not wait
                delay = route.started + self.batch_s - time.monotonic()
                if delay > 0 and not route.full and not self._closing and route.staged() < EAGER_MESSAGES:
                    route.wake.clear()
                    try:
                        await asyncio.wait_for(route.wake.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    continue
                # at most one block per shard in a write: the script's repeat check knows the
                # last write per shard, so a write sent again must hold one block per shard
                shards: set[int] = set()
                for block in [*route.full, *route.filled()]:
                    if block.shard not in shards:
                        shards.add(block.shard)
                        route.writing.append(block)
                route.drop(route.writing)
                for block in route.writing:
                    self._writes += 1
                    block.write = self._writes
            route.started = time.monotonic()
            try:
                await self._send(route, list(route.writing))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors; anything else is a bug, logged: the writer goes on (its blocks time out)
                if not isinstance(exc, (OSError, aioredis.RedisError)):
                    log.exception("cluster backplane: the writer failed")
                self._write_failed(route, route.name, exc)
                await asyncio.sleep(RETRY_S[min(route.failures - 1, len(RETRY_S) - 1)])
                continue
            if route.failures:
                log.warning("cluster backplane: %s works again after %d failed attempt(s)", route.name, route.failures)
                route.failures = 0
                self._count_write_failures()

    def _write_failed(self, route: _Route, what: str, exc: Exception) -> None:
        route.failures += 1
        self._count_write_failures()
        self._failed(what, route.failures, exc)

    def _count_write_failures(self) -> None:
        self.stats.write_failures = max(route.failures for route in self._routes)

    async def _send(self, route: _Route, blocks: list[Block]) -> None:
        """Write the blocks with one EVALSHA (scripts.WRITE), which also reads what the node
        reads of the route's shards since its positions; with redis_min_replicas, WAIT after
        it on the same connection. A write that failed or whose reply was lost keeps its
        blocks in `route.writing`: they are sent again as they are, unless their deadline
        passed meanwhile."""
        import redis.asyncio as aioredis
        from redis.exceptions import NoScriptError

        trim = self._trim()
        known = self.shard_epochs.known
        was_sent = [block.sent for block in blocks]
        for block in blocks:
            if block.sent:
                self.stats.in_doubt += 1  # sent before without a reply: the script knows whether it was made
            else:
                block.epoch = known[block.shard][0]
            block.sent = True
        window = int(self.clock() * 1000) // self.dedupe_ms if self.dedupe_ms else 0
        keys: list = []
        args: list = [self.node, *trim, 2 * self.dedupe_ms, "1" if self.min_replicas else "", len(blocks), SCRIPT_READ_COUNT]
        for block, sent in zip(blocks, was_sent):
            shard = block.shard
            ids = [item for name, index, _, _, msg_id in block.waiters if msg_id for item in (name, index, msg_id)]
            known_epoch, known_count = known[shard]
            keys += (self.counters[shard], self.streams[shard], self._marks[shard], f"{self._ids[shard]}{window}", f"{self._ids[shard]}{window - 1}")
            topics = block.topics
            args += (
                unique_epoch(known_epoch), known_epoch, known_count, block.write, block.epoch if sent else "",
                _encode(list(topics.items())), _encode(list(topics)), _encode(ids) if ids else "", _encode(list(map(len, topics.values()))),
            )
        reading = [shard for shard in route.shards if shard in self._reading]
        keys += [self.streams[shard] for shard in reading]
        args += [self.positions[shard] for shard in reading]
        self.stats.writes += 1
        self.stats.scripts += 1
        self.stats.commands += 1
        waited = None  # with redis_min_replicas: the replicas WAIT counted (None: not asked)
        try:
            if self.min_replicas:
                # one connection for the script and the WAIT after it (WAIT waits for the
                # writes of its own connection; on a cluster the route's shard is on one master)
                pipe = route.client.pipeline(transaction=False)
                pipe.evalsha(self._sha, len(keys), *keys, *args)
                wait_ms = max(1, int((min(block.staged for block in blocks) + self.timeout - time.monotonic()) * 1000))
                if self.cluster:
                    pipe.execute_command("WAIT", self.min_replicas, wait_ms, target_nodes=route.client.get_node_from_key(self.streams[blocks[0].shard]))
                else:
                    pipe.execute_command("WAIT", self.min_replicas, wait_ms)
                self.stats.commands += 1
                reply, waited = await pipe.execute(raise_on_error=False)
                if isinstance(reply, BaseException):
                    raise reply
                waited = waited if isinstance(waited, int) else -1
            else:
                reply = await route.client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis lost its scripts (it restarted): nothing of the write ran
            for block, sent in zip(blocks, was_sent):
                block.sent = sent
            await self._load_script()
            return
        except aioredis.ResponseError as exc:
            if _out_of_memory(exc):  # refused at its first write: nothing of it was made
                for block, sent in zip(blocks, was_sent):
                    block.sent = sent
                self._out_of_memory(route, blocks)
                return
            raise  # an earlier block may have been made: sent again, the marks tell
        written, read = reply
        confirmed = waited is None or waited >= self.min_replicas
        for block, outcome_reply, sent in zip(blocks, written, was_sent):
            outcome, epoch, count, firsts, moved = outcome_reply
            epoch = int(epoch)
            if moved:
                self._rolled_back(block.shard, epoch)
            if outcome == scripts.REPEAT:  # nothing written: it goes again without its repeats
                block.sent = sent
                if not confirmed:  # the first ones may not be on the replicas: sent again, and waited for again
                    continue
                self.shard_epochs.know(block.shard, epoch, int(count))
                if self._repeated(block, _repeats.decode(firsts)) and block in route.writing:
                    route.writing.remove(block)
                continue
            if block in route.writing:
                route.writing.remove(block)
            if not confirmed and outcome != scripts.ENDED:
                # on the master, not on the replicas (yet): a failover may lose it. Not taken as
                # known (a node must not end the epoch for a write nobody was told of)
                self._unreplicated(block, waited)
                continue
            if outcome == scripts.ENDED:
                self.shard_epochs.know(block.shard, epoch, int(count))
                if not block.answered:
                    self.stats.unknown += block.count
                    self._fail(block, f"the cluster backplane (Redis) lost what it held of epoch {block.epoch}, in which this publish was sent without an answer: it may have been published then (and delivered once) or not", "may not have been published")
                continue
            self.shard_epochs.wrote(block.shard, epoch, int(count), block.write)
            self._written(block, epoch, _firsts.decode(firsts))
        if reading:
            now = time.monotonic()
            route.reads_until = now + 2 * self.batch_s + WRITER_READS_S
            for shard in reading:
                self._read_at[shard] = now
            for stream, entries in read or ():
                self._take(self.stream_shard[stream], entries, later=True)
        if route.down:
            self._back(route)

    def _out_of_memory(self, route: _Route, blocks: list[Block]) -> None:
        """Redis refused the blocks for maxmemory (before the script wrote anything): their
        publishes fail at once, saying so, and so do further publishes to the route's shards
        until Redis takes a write again (`_probe`). Logged once when it begins; `_back` says
        when it ends, with the counts."""
        count = 0
        for block in blocks:
            if block in route.writing:
                route.writing.remove(block)
            if not block.answered:
                count += block.count
                self._fail(block, OUT_OF_MEMORY, logged=False)
        route.oom_failed += count
        if not route.oom_since:
            route.oom_since = time.monotonic()
            log.error(
                "cluster backplane: Redis is out of memory (maxmemory; it refuses writes): %d message(s) not published; publishes to %s are refused until it takes writes again",
                count, "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}",
            )
        if not route.down:
            route.down = True
            self._update_accepting()

    def _unreplicated(self, block: Block, waited: int) -> None:
        """A block written on the master that WAIT did not confirm on redis_min_replicas
        replicas in time: it is delivered unless its master fails first, then it is lost."""
        self.stats.unreplicated += block.count
        self.stats.entries_written += 1
        self.stats.messages_written += block.count
        self.stats.bytes_written += block.size
        if not block.answered:
            self._fail(
                block,
                f"written on the Redis master but confirmed on {max(waited, 0)} of redis_min_replicas ({self.min_replicas}) replicas within redis_timeout_s "
                f"({self.timeout:g} s): it may have been published (it is delivered unless the master fails first)",
                "may not be on the replicas",
            )

    def _repeated(self, block: Block, repeats: list) -> bool:
        """Take out of the block the publishes Redis recognised by their msg_id and acknowledge
        them with their first numbers. True when nothing is left to write."""
        stats = self.stats
        gone: dict[str, list[int]] = {}
        numbers: dict[tuple[str, int], tuple[int, int]] = {}
        for i in range(0, len(repeats) - 2, 3):
            name, index, seen = repeats[i], int(repeats[i + 1]), repeats[i + 2]
            epoch, _, seq = seen.partition(" ")
            gone.setdefault(name, []).append(index)
            numbers[(name, index)] = (int(epoch), int(seq))
        waiters = []
        for name, index, ok, fail, msg_id in block.waiters:
            number = numbers.get((name, index))
            if number is not None:
                stats.repeats += 1
                if not block.answered:
                    ok(*number)
                continue
            shift = sum(1 for cut in gone.get(name, ()) if cut < index)  # later ones move up
            waiters.append((name, index - shift, ok, fail, msg_id))
        block.waiters = waiters
        for name, indexes in gone.items():
            payloads = block.topics.get(name)
            if payloads is None:
                continue
            for index in sorted(set(indexes), reverse=True):
                if 0 <= index < len(payloads):
                    size = len(payloads.pop(index))
                    block.size -= size
                    block.count -= 1
                    if not block.answered:
                        self.buffered -= size
            if not payloads:
                del block.topics[name]
        if block.count:
            return False
        block.answered = True
        return True

    def _written(self, block: Block, epoch: int, firsts: list[int]) -> None:
        stats = self.stats
        stats.entries_written += 1
        stats.messages_written += block.count
        stats.bytes_written += block.size
        if block.answered:  # its deadline passed first: told "may have been published", and it was
            return
        block.answered = True
        self.buffered -= block.size
        if block.waiters:
            first_of = dict(zip(block.topics, firsts))
            for name, index, ok, _, _ in block.waiters:
                ok(epoch, first_of[name] + index)
        if self._buffer_full and self.buffered <= self.max_buffer // 2:
            self._buffer_full = False
            self._update_accepting()

    def _arm(self, now: float) -> None:
        """Answer the oldest block at its deadline (redis_timeout_s after it was staged)."""
        oldest = min((block.staged for route in self._routes for block in route.all_blocks()), default=None)
        if oldest is None:
            self._expiry = None
            return
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, oldest + self.timeout - now), self._answer_late)

    def _answer_late(self) -> None:
        """Answer every block whose deadline passed, wherever it is: a block never sent was not
        published; one sent without a reply may have been (its command may still be out). It
        is not sent again, so it is published once or never, and its acks say so. Its route's
        shards refuse publishes until Redis answers for them again."""
        now = time.monotonic()
        for route in self._routes:
            late = [block for block in route.all_blocks() if now - block.staged >= self.timeout]
            if not late:
                continue
            for block in late:
                if block.sent:
                    self.stats.unknown += block.count
                    self._fail(block, f"Redis did not confirm the publish within redis_timeout_s ({self.timeout:g} s): it may have been published (then it is delivered once) or not", "may not have been published")
                else:
                    self._fail(block, f"the cluster backplane (Redis) did not take the publish within redis_timeout_s ({self.timeout:g} s); not published")
            gone = set(map(id, late))
            route.writing = [block for block in route.writing if id(block) not in gone]
            route.drop(late)
            if not route.down:
                route.down = True
                self._update_accepting()
        self._arm(now)

    def _fail(self, block: Block, text: str, outcome: str = "not published", logged: bool = True) -> None:
        block.answered = True
        self.buffered -= block.size
        if outcome == "not published":
            self.stats.failed += block.count
        if logged:
            log.error("cluster backplane: %d message(s) on shard %d %s: %s", block.count, block.shard, outcome, text)
        for _, _, _, fail, _ in block.waiters:
            if fail is not None:
                fail(ErrorCode.UNAVAILABLE, text)

    def _fail_all(self, text: str) -> None:
        for route in self._routes:
            for block in route.all_blocks():
                if not block.answered:
                    self._fail(block, text)
            route.writing = []
            route.full.clear()
            for shard in route.shards:
                route.filling[shard] = None
        for state, waiting in self._waiting.items():
            for _, _, fail, _ in waiting:
                if fail is not None:
                    fail(ErrorCode.UNAVAILABLE, text)
        self._waiting = {}

    async def _probe(self, route: _Route) -> Exception | None:
        """While the route's shards refuse publishes: check them (which also finds a Redis that
        came back older; after Redis was out of memory, with a write that changes nothing,
        which Redis refuses while it is full); when every check is answered, take publishes
        again. Returns why not, if not."""
        try:
            for shard, reply in zip(route.shards, await self._check(route.shards, route.client, write=bool(route.oom_since))):
                self._checked(shard, *reply)
        except Exception as exc:  # connection errors; on a cluster also RedisClusterException
            return exc
        if route.failures:
            if not route.oom_since:  # else `_back` says it
                log.warning("cluster backplane: Redis answers again for %s after %d failed attempt(s) to write or check", "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}", route.failures)
            route.failures = 0
            self._count_write_failures()
        self._back(route)
        return None

    def _trim(self) -> tuple[str, str]:
        """How an XADD trims its stream now: MINID ~ (by age) or MAXLEN ~."""
        if self.stream_age_ms:
            return "MINID", f"{int(self.clock() * 1000) - self.stream_age_ms}-0"
        return "MAXLEN", str(self.maxlen)

    def _back(self, route: _Route) -> None:
        where = "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}"
        if route.oom_since:
            log.warning(
                "cluster backplane: Redis takes writes again for %s after being out of memory for %.1f s: %d publish(es) refused and %d message(s) not published meanwhile",
                where, time.monotonic() - route.oom_since, route.oom_refused, route.oom_failed,
            )
            route.oom_since = 0.0
            route.oom_refused = route.oom_failed = 0
        else:
            log.warning("cluster backplane: Redis answers again for %s; publishing", where)
        route.down = False
        self._update_accepting()


def _out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a command (or a script's write) for maxmemory."""
    from redis.exceptions import OutOfMemoryError

    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


def _known_nodes(client) -> list:
    """Every node a Redis Cluster client knows of: the slot map's and its startup nodes."""
    nodes = {id(node): node for node in [*client.get_nodes(), *client.nodes_manager.startup_nodes.values()]}
    return list(nodes.values())


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def without_password(url: str) -> str:
    """The URL without its user and password (for logs and errors)."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
