"""The Redis backplane's reader: which shards the node reads (interest: loading a shard's
stream before the first subscription that needs it, dropping one none needs), the XREAD loop,
and the arrival of entries (in stream order, to `Router.deliver_remote`).

Part of broker.cluster.streams.RedisBackplane (one of its bases).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ..topics import is_pattern
from .epochs import FORKED, NEW_EPOCH, REPEAT, SKIP, ShardEpochs
from .shards import (
    EAGER_MESSAGES,
    FOREIGN_LOG_INTERVAL_S,
    INTEREST_GRACE_S,
    LOAD_COUNT,
    READ_COUNT,
    READER_RENEW,
    RETRY_S,
    STALL_S,
    BackplaneStats,
    Route,
    id_key,
    known_nodes,
    log,
)

_data = msgspec.msgpack.Decoder(list[tuple[str, list[bytes]]])
_firsts = msgspec.msgpack.Decoder(list[Annotated[int, msgspec.Meta(ge=1, le=1 << 62)]])

WOKEN = object()  # what a read cut short for a change of the shards to read returns


if TYPE_CHECKING:
    from ..router import Router


class Reader:
    """Interest, reads and arrival (a part of RedisBackplane; broker.cluster.shards.ShardLinks
    says how its parts share state and methods)."""

    # set up by RedisBackplane (annotations only)
    url: str
    shards: int
    node: bytes
    streams: list[str]
    stream_shard: dict[bytes, int]
    clock: Callable[[], float]
    timeout: float
    batch_s: float
    block_ms: int  # how long one XREAD blocks
    max_age_ms: int
    cluster: bool
    closing: bool
    redis: Any
    readers: list[Any]
    reader_options: dict[str, Any]
    route_of: list[Route]
    router: Router | None
    positions: list[bytes]  # per shard, the last entry read
    reading: set[int]  # shards read (loaded first)
    wanted: set[int]  # shards subscriptions wait for (being loaded)
    unneeded: dict[int, float]  # shard read that no subscription needs -> since when
    loader: asyncio.Task[None] | None
    woken: list[asyncio.Event]  # per reader: the shards to read changed
    asked: list[float]  # per shard: when its reader's command went out (0: none out)
    patience: list[float]  # per shard: how long that command may take
    read_at: list[float]  # per shard: when a read of it last came back
    foreign_entries: int  # entries read that no broker wrote (skipped)
    foreign_logged: int  # of them, counted in a log line
    foreign_logged_at: float  # when the last such line was written
    taken: deque[tuple[int, list, bool]]  # (shard, entries, dated) not handed to the router yet
    handing: bool  # a hand-over is scheduled
    at_ms: int  # while loaded entries are delivered: the time history keeps them with (0: now)
    shard_epochs: ShardEpochs
    stats: BackplaneStats

    if TYPE_CHECKING:  # of the facade (broker.cluster.streams) and ShardLinks (broker.cluster.shards)

        def shard_of(self, name: str) -> int: ...

        async def check(self, shards: list[int], client: Any, write: bool = False) -> list[tuple[int, int, int]]: ...

        def checked(self, shard: int, epoch: int, count: int, moved: int) -> None: ...

        def move_to_epoch(self, shard: int, epoch: int) -> None: ...

        async def close_client(self, client: Any) -> None: ...

    def reads(self, pattern: str) -> bool:
        """Whether this node reads (having loaded them) the shards a subscription to `pattern`
        needs: the topic's, or every one for a pattern. If not, it starts loading them and
        calls `router.loaded()` once it has, or once Redis has not answered the loads for
        redis_timeout_s (the subscriptions that waited are refused)."""
        reading = self.reading
        if len(reading) == self.shards:
            return True
        missing = [shard for shard in (range(self.shards) if is_pattern(pattern) else (self.shard_of(pattern),)) if shard not in reading]
        if not missing:
            return True
        self.wanted.update(missing)
        if self.loader is None or self.loader.done():
            self.loader = asyncio.get_running_loop().create_task(self._load_wanted())
        return False

    async def load(self, shard: int) -> None:
        """Deliver what the shard's stream holds after what this node read of it (a shard it
        never read: from the last history_max_age_s) into history and to the receivers of its
        topics, and read on from there."""
        if self.positions[shard] == b"0-0":
            position = lower = f"{max(0, int(self.clock() * 1000) - self.max_age_ms)}-0".encode()
        else:
            position = self.positions[shard]
            lower = b"(" + position
        while True:
            entries = await self.redis.xrange(self.streams[shard], min=lower, max="+", count=LOAD_COUNT)
            self.stats.commands += 1
            self.stats.reads += 1
            if not entries:
                break
            self.take(shard, entries, dated=True)
            position = entries[-1][0]
            lower = b"(" + position
            if len(entries) < LOAD_COUNT:
                break
        self.positions[shard] = max(position, self.positions[shard], key=id_key)

    async def _load_wanted(self) -> None:
        """Load the shards subscriptions wait for, then read them, and let the subscriptions
        go on. While Redis does not answer, they are refused once it has not for
        redis_timeout_s, and loading stops until a subscription asks again."""
        failures = 0
        failing = 0.0  # monotonic time the loads began to fail
        refused = None
        while not self.closing:
            todo = sorted(self.wanted - self.reading)
            if not todo:
                break
            attempt = time.monotonic()
            try:
                for shard in todo:
                    await self.load(shard)
                    self.reading.add(shard)
                    self.unneeded.pop(shard, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors; on a cluster also RedisClusterException
                failures += 1
                failing = failing or attempt
                self.note_failure("loading a shard stream a subscription needs", failures, exc)
                if time.monotonic() - failing >= self.timeout:
                    refused = f"the cluster backplane (Redis) did not answer within redis_timeout_s ({self.timeout:g} s): this node could not load the shard stream the subscription needs; not subscribed (retry later)"
                    break
                await asyncio.sleep(RETRY_S[min(failures - 1, len(RETRY_S) - 1)])
                continue
            failing = 0.0
            if failures:
                log.warning("cluster backplane: loading shard streams works again after %d failed attempt(s)", failures)
                failures = 0
        self.wanted.clear()
        for event in self.woken:
            event.set()
        if self.router is not None:
            self.router.loaded(refused)

    def review_interest(self, now: float) -> None:
        """Stop reading the shards no subscription has needed for INTEREST_GRACE_S (a later
        subscription loads what it missed first)."""
        router = self.router
        if router is None:  # not started: no subscriptions
            return
        patterns, topics = router.subscribed()
        if patterns:
            self.unneeded.clear()
            return
        needed = {self.shard_of(name) for name in topics} | self.wanted
        for shard in list(self.reading):
            if shard in needed:
                self.unneeded.pop(shard, None)
            elif now - self.unneeded.setdefault(shard, now) >= INTEREST_GRACE_S:
                self.reading.discard(shard)
                del self.unneeded[shard]

    async def read_loop(self, shards: list[int], reader: int) -> None:
        """Read those of `shards` the node reads (`reading`) with client
        `self.readers[reader]` until the node stops; with none of them, PING Redis every
        block instead, so that the node knows it answers (`_reachable`). After a failure the
        shards are checked before reading on (Redis may have come back older), and so is a
        shard whose stream repeated a write count."""
        failures = 0
        asked = self.asked
        woken = self.woken[reader]
        route = self.route_of[shards[0]]  # the writer of these shards (one route holds them all)
        last = 0.0  # when this reader's last read went out
        brought = 0  # the messages it brought
        what = f"reading shard {shards[0]}" if len(shards) == 1 else "reading the shard streams"
        while not self.closing:
            client = self.readers[reader]
            unchecked = self.shard_epochs.unchecked
            woken.clear()
            reading = [shard for shard in shards if shard in self.reading]
            now = time.monotonic()
            if reading and not failures and not unchecked:
                # while the route's writes read these shards, they need no read of their own;
                # and a read goes out at most once per redis_batch_ms
                pause = max(route.reads_until - now, last + self.batch_s - now if brought < EAGER_MESSAGES else 0.0)
                if pause > 0:
                    try:
                        await asyncio.wait_for(woken.wait(), pause)
                    except TimeoutError:
                        pass
                    continue
                last = now
            patience = self.block_ms / 1000 + STALL_S if reading else STALL_S
            for shard in shards:
                asked[shard] = now
                self.patience[shard] = patience
            try:
                if failures and self.cluster:
                    # the failed read may have gone to a master that is gone: learn the slot
                    # map now (redis-py would only after a command it routes itself failed)
                    await client.initialize()
                if failures or unchecked:
                    todo = shards if failures else [shard for shard in shards if shard in unchecked]
                    if todo:
                        for shard, answer in zip(todo, await self.check(todo, client)):
                            self.checked(shard, *answer)
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
                if self.cluster and failures % READER_RENEW == 0 and not self.closing:
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
                self.read_at[shard] = now
                lag_ms[shard] = 0  # nothing new, unless the reply holds entries of it
            self.stats.commands += 1
            if not reading:  # nothing to read: wait for a subscription that needs a shard, or the next ping
                try:
                    await asyncio.wait_for(woken.wait(), self.block_ms / 1000)
                except TimeoutError:
                    pass
                continue
            if reply is WOKEN:
                continue
            self.stats.reads += 1
            brought = 0
            if not reply or self.closing:
                continue
            before = self.stats.messages_read
            for stream, entries in reply:
                self.take(self.stream_shard[stream if isinstance(stream, bytes) else stream.encode()], entries)
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
        return await client.execute_command(
            "XREAD", "COUNT", READ_COUNT, "BLOCK", self.block_ms, "STREAMS", stream, self.positions[shard], target_nodes=node
        )

    async def _renew_reader(self, reader: int) -> None:
        """Replace a Redis Cluster reader's client by a new one that starts from every node the
        old one knew and the configured URL: whatever state redis-py's client got into, a new
        one learns the cluster as it is now."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        old = self.readers[reader]
        seeds = [ClusterNode(node.host, node.port) for node in known_nodes(old)]
        self.readers[reader] = RedisCluster.from_url(self.url, startup_nodes=seeds, **self.reader_options)
        log.warning(
            "cluster backplane: reader %d starts with a new Redis Cluster client (seeds: redis_url and %s)",
            reader,
            ", ".join(sorted({f"{n.host}:{n.port}" for n in seeds})) or "no other node",
        )
        await self.close_client(old)

    async def _after_failure(self, what: str, failures: int, exc: Exception) -> None:
        """Count and log a failed command (`note_failure`), and pause before the next try."""
        self.note_failure(what, failures, exc)
        await asyncio.sleep(RETRY_S[min(failures - 1, len(RETRY_S) - 1)])

    def foreign_entry(self, entry_id: bytes, shard: int) -> None:
        """An entry no broker wrote is skipped, and said at most once per
        FOREIGN_LOG_INTERVAL_S with the count of such entries since the last line: whoever
        writes into the streams cannot flood the log."""
        self.foreign_entries += 1
        now = self.clock()
        if now - self.foreign_logged_at >= FOREIGN_LOG_INTERVAL_S:
            count = self.foreign_entries - self.foreign_logged
            self.foreign_logged, self.foreign_logged_at = self.foreign_entries, now
            log.error(
                "cluster backplane: entry %s of %s is not one of this broker's; skipped (%d such entries since the last line)",
                entry_id,
                self.streams[shard],
                count,
            )

    def note_failure(self, what: str, failures: int, exc: Exception) -> None:
        """Count a failed command; log the first of a series and again at 2, 4, 8, ...
        failures in a row (a failure that lasts is seen, a log it does not flood)."""
        self.stats.reconnects += 1
        if failures == 1:
            log.warning("cluster backplane: %s failed (%s); retrying", what, exc)
        elif failures & (failures - 1) == 0:
            log.warning("cluster backplane: %s failed %d times in a row (%s); retrying", what, failures, exc)

    def take(self, shard: int, entries: list, dated: bool = False, later: bool = False) -> None:
        """Take a shard's entries read: the shard's position moves past them now; their
        batches go to the router in stream order, through one queue for every read, at once or
        (`later`: a write's reply, so that the writer sends its next write before the node
        delivers these) in the loop's next turn. Entries at or before the position were taken
        already (a write's read and the reader's may both bring one): skipped."""
        position = id_key(self.positions[shard])
        if id_key(entries[-1][0]) <= position:
            return
        fresh = [entry for entry in entries if id_key(entry[0]) > position]
        last = entries[-1][0]
        self.positions[shard] = last
        self.stats.entries_read += len(fresh)
        self.stats.lag_ms[shard] = max(0, int(self.clock() * 1000) - int(last.split(b"-")[0]))
        self.taken.append((shard, fresh, dated))
        if not later:
            self._hand_over()
        elif not self.handing:
            self.handing = True
            asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Hand what was taken to the router, in the order it was taken."""
        self.handing = False
        taken = self.taken
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
        taken: list[tuple[int, list[tuple[str, list[bytes]]], list[int]]] = []  # (epoch, batches, firsts)
        stats = self.stats
        epochs = self.shard_epochs
        size = 0
        second = 0  # with `dated`: the second of the entries in `taken`
        for entry_id, fields in entries:
            if type(fields) is list:
                fields = dict(zip(fields[::2], fields[1::2]))
            if dated:
                ms = id_key(entry_id)[0]
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
                self.foreign_entry(entry_id, shard)
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
                        entry_id,
                        self.streams[shard],
                        count,
                        epoch,
                        epochs.read[shard],
                    )
                    continue
                self.move_to_epoch(shard, epoch)
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
        self.at_ms = at_ms
        try:
            return self.router.deliver_remote(taken)
        finally:
            self.at_ms = 0
