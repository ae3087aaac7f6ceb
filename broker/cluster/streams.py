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

`RedisBackplane` here is the facade (the seam the router sees, start and stop, health); its
parts are its bases, one module each: broker.cluster.shards (settings, counters, routes,
clients, checks), broker.cluster.writer (staging and writes), broker.cluster.reader (interest,
reads, arrival).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

from ..config import read_secret
from ..errors import ConfigError
from ..fastpath import Block, TopicState, stamp
from ..history import History
from .epochs import ShardEpochs
from .reader import Reader
from .shards import (
    BLOCK_MS,
    CLUSTER_BLOCK_MS,
    FOREIGN_LOG_INTERVAL_S,
    INTEREST_REVIEW_S,
    OUT_OF_MEMORY,
    BackplaneStats,
    Route,
    ShardLinks,
    without_password,
)
from .writer import Writer

Ok = Callable[[int, int], None]
Fail = Callable[[int, str], None]


class RedisBackplane(Reader, Writer, ShardLinks):
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
        self.mark_keys = [f"{{{self.prefix}:{i}}}:w:{self.node.decode()}" for i in range(self.shards)]
        self.id_prefixes = [f"{{{self.prefix}:{i}}}:i:" for i in range(self.shards)]  # + the dedupe window's number
        self.shard_epochs = ShardEpochs(self.shards)
        self.epochs = self.shard_epochs.epochs  # per shard, the epoch this node delivers in
        self.positions: list[bytes] = [b"0-0"] * self.shards  # the last entry read, per shard
        self.at_ms = 0  # while loaded entries are delivered: the time of theirs history keeps (0: now)
        self.taken: deque = deque()  # (shard, entries, dated) read and not handed to the router yet, in order
        self.handing = False  # a hand-over is scheduled
        self.reading: set[int] = set()  # shards read (loaded first): those subscriptions need, or every one
        self.wanted: set[int] = set()  # shards subscriptions wait for (being loaded)
        self.unneeded: dict[int, float] = {}  # shard read that no subscription needs -> since when
        self._reviewed = 0.0
        self.loader: asyncio.Task | None = None
        self.woken: list[asyncio.Event] = []  # per reader: the shards to read changed
        self.asked = [0.0] * self.shards  # per shard: monotonic time its reader's command went out (0: none out)
        self.patience = [0.0] * self.shards  # per shard: how long that command may take (a blocking read's block + STALL_S; a ping STALL_S)
        self.read_at = [time.monotonic()] * self.shards  # per shard: when a read of it last came back
        self.foreign_entries = 0  # entries read that no broker wrote (skipped)
        self.foreign_logged = 0  # of them, counted in a log line
        self.foreign_logged_at = -FOREIGN_LOG_INTERVAL_S  # when the last such line was written
        self.stats = BackplaneStats(self.shards)
        self.accepting = False  # every shard takes publishes (and the compiled path may stamp them); False until start() connected
        self.buffered = 0  # payload bytes staged or being written
        self.cluster = False
        self.block_ms = BLOCK_MS
        self.router = None
        self.routes: list[Route] = []  # made at start: one, or one per shard on a cluster
        self.route_of: list[Route] = []  # per shard
        self.filling: list[Block | None] = [None] * self.shards  # per shard, the block staged publishes go to
        self.full_of: list[list[Block]] = []  # per shard, its route's list of full blocks
        self.buffer_full = False  # past redis_max_buffer_bytes, until half of it is written
        self.expiry: asyncio.TimerHandle | None = None  # answers the oldest block at its deadline
        self.waiting: dict[TopicState, list] = {}  # provisional seq, ok, fail per staged-to-be publish
        self.last_write = 0
        self._writers: list[asyncio.Task] = []
        self._tasks: list[asyncio.Task] = []  # the readers
        self.closing = False
        self.redis = None  # commands and writes
        self.readers: list = []  # blocking XREAD clients
        self.reader_options: dict = {}
        self.cluster_options: dict = {}
        self.script_sha = ""

    # the seam

    def topic_epoch(self, name: str) -> int:
        return self.epochs[self.shard_of(name)]

    def shard_of(self, name: str) -> int:
        return zlib.crc32(name.encode()) % self.shards

    def publish(
        self,
        state: TopicState,
        payload: bytes,
        dirty: list,
        on_sequenced: Ok | None = None,
        on_failed: Fail | None = None,
        msg_id: str = "",
    ) -> None:
        """Add `payload` to the topic's pending batch, numbered for now in this node's count
        (the compiled publish path does the same); `stage` hands it over at the end of the
        tick, and `on_sequenced(epoch, seq)` (or `on_failed(code, text)`) follows: with a
        `msg_id` published to the topic before (through any node, within the dedupe window),
        the first one's numbers, and it is not published again. The router asked
        `refusal(state)` first."""
        stamp(state, payload, dirty)
        if on_sequenced is not None:
            waiting = self.waiting.get(state)
            if waiting is None:
                waiting = self.waiting[state] = []
            waiting.append((state.seq, on_sequenced, on_failed, msg_id if self.dedupe_ms else ""))
        return None

    def refusal(self, state: TopicState | None = None) -> str | None:
        """While `accepting` is False: why a publish to the topic is refused now (err 18), or
        None when its shard takes it (another shard's route is down)."""
        if self.buffer_full or self.closing:
            text = f"the cluster backplane (Redis) holds {self.buffered} bytes of publishes not yet written, its limit; not published (retry later)"
        else:
            route = self.route_of[zlib.crc32(state.key) % self.shards] if state is not None and self.route_of else None
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
        if self.closing or self.buffer_full:
            return False
        now = time.monotonic()
        return any(self._reachable(shard, now) and not self.route_of[shard].down for shard in range(self.shards))

    @property
    def connected(self) -> bool:
        """Whether Redis answers the reads and takes the writes of every shard now."""
        now = time.monotonic()
        return (
            bool(self.routes)
            and not any(route.down for route in self.routes)
            and all(self._reachable(shard, now) for shard in range(self.shards))
        )

    def _reachable(self, shard: int, now: float) -> bool:
        """The shard's reads work: the last one came back, and the one out now is not late."""
        asked = self.asked[shard]
        return self.stats.read_failures[shard] == 0 and not (asked and now - asked > self.patience[shard])

    def lags_s(self) -> list[float]:
        """Per shard, how far behind this node may be, in seconds: while its reads work, how
        old the newest entry read was when it was read (0 after a read found nothing new);
        while they fail or are late, the time since one last came back, which grows."""
        now = time.monotonic()
        lags = []
        for shard, lag_ms in enumerate(self.stats.lag_ms):
            lag = lag_ms / 1000
            if not self._reachable(shard, now):
                lag = max(lag, now - self.read_at[shard])
            lags.append(lag)
        return lags

    # start and stop

    async def start(self, router) -> None:
        """Connect, learn every shard's epoch, load the retained history, start reading and
        writing. Raises ConfigError when Redis cannot be used within redis_timeout_s."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.router = router
        options: dict[str, Any] = dict(
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), decode_responses=False
        )
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
                    raise ConfigError(
                        f"redis_url: Redis at {without_password(self.url)} refused the credentials ({where}): {exc}"
                    ) from None
                except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        raise ConfigError(
                            f"redis_url: cannot reach Redis at {without_password(self.url)} within redis_timeout_s ({self.timeout:g} s): {exc}"
                        ) from None
                    await asyncio.sleep(0.2)
                except aioredis.ResponseError as exc:
                    raise ConfigError(f"redis_url: Redis at {without_password(self.url)} refused: {exc}") from None
        finally:
            await probe.aclose()
        self.cluster = bool(info.get("cluster_enabled"))
        if self.cluster:
            self.routes = [Route(f"writing shard {i}", [i], self.filling) for i in range(self.shards)]
            self.route_of = list(self.routes)
        else:
            self.routes = [Route("writing to Redis", list(range(self.shards)), self.filling)]
            self.route_of = self.routes * self.shards
        self.full_of = [route.full for route in self.route_of]
        self.block_ms = CLUSTER_BLOCK_MS if self.cluster else BLOCK_MS
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster

            cluster_options = self.cluster_options = dict(options)  # retry: none (redis-py would retry each command 10 times)
            self.redis = RedisCluster.from_url(self.url, **cluster_options)
            self.reader_options = dict(cluster_options, socket_timeout=self.timeout + CLUSTER_BLOCK_MS / 1000)
            self.readers = [RedisCluster.from_url(self.url, **self.reader_options) for _ in range(self.shards)]
        else:
            self.redis = aioredis.Redis.from_url(self.url, **options)
            for route in self.routes:
                route.client = self.redis
            self.readers = [aioredis.Redis.from_url(self.url, **dict(options, socket_timeout=self.timeout + BLOCK_MS / 1000))]
        try:
            if self.cluster:
                await self.route_clients()
            await self.load_script()
            await self.learn_epochs()
            if self.read_all:
                for shard in range(self.shards):
                    await self.load(shard)
                self.reading = set(range(self.shards))
        except (OSError, aioredis.RedisError) as exc:
            await self.close_clients()
            raise ConfigError(f"redis_url: Redis at {without_password(self.url)} could not be used: {exc}") from None
        self.accepting = True
        loop = asyncio.get_running_loop()
        self._writers = [loop.create_task(self.write_loop(route)) for route in self.routes]
        self.woken = [asyncio.Event() for _ in self.readers]
        if self.cluster:
            self._tasks.extend(loop.create_task(self.read_loop([i], i)) for i in range(self.shards))
        else:
            self._tasks.append(loop.create_task(self.read_loop(list(range(self.shards)), 0)))

    async def stop(self) -> None:
        """Write what is staged (waiting at most redis_timeout_s), then stop reading."""
        self.closing = True
        self.accepting = False
        if self._writers:
            for route in self.routes:
                route.wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained()), self.timeout)
            except TimeoutError:
                pass
            for writer in self._writers:
                writer.cancel()
            await asyncio.gather(*self._writers, return_exceptions=True)
            self._writers = []
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.loader is not None:
            self.loader.cancel()
            await asyncio.gather(self.loader, return_exceptions=True)
            self.loader = None
        for event in self.woken:
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
        self.fail_all("the broker node stopped before Redis took the publish")
        await self.close_clients()

    async def _drained(self) -> None:
        while any(route.holds() for route in self.routes):
            await asyncio.sleep(0.01)

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
                self.review_interest(now)

    # reading

    def now_ms(self) -> int:
        return self.at_ms or int(self.clock() * 1000)

    # writing
