"""The Redis backplane's writer: staging each tick's batches into blocks per shard, the
write loop per route (one EVALSHA of scripts.WRITE per write, WAIT with redis_min_replicas),
answers and their deadlines, and the states a route goes through (down, out of memory, back).

Part of broker.cluster.streams.RedisBackplane (one of its bases).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ..backplane import unique_epoch
from ..errors import ErrorCode
from ..fastpath import Block, TopicState
from ..fastpath import stage as stage_batches
from . import scripts
from .epochs import ShardEpochs
from .shards import (
    BLOCK_BYTES,
    EAGER_MESSAGES,
    OUT_OF_MEMORY,
    PROBE_S,
    RETRY_S,
    SCRIPT_READ_COUNT,
    WRITER_READS_S,
    BackplaneStats,
    Route,
    log,
    out_of_memory,
)

_firsts = msgspec.msgpack.Decoder(list[Annotated[int, msgspec.Meta(ge=1, le=1 << 62)]])
_repeats = msgspec.msgpack.Decoder(list[str | int])  # topic, index, "epoch seq", ... (Lua's strings are MessagePack str)
_encode = msgspec.msgpack.Encoder().encode


class Writer:
    """Staging, writes, answers (a part of RedisBackplane; broker.cluster.shards.ShardLinks
    says how its parts share state and methods)."""

    # set up by RedisBackplane (annotations only)
    shards: int
    node: bytes
    counters: list[str]
    streams: list[str]
    stream_shard: dict[bytes, int]  # a stream's key -> its shard
    mark_keys: list[str]  # per shard, the key of this node's last write
    id_prefixes: list[str]  # per shard, the prefix of its dedupe windows' keys
    clock: Callable[[], float]
    timeout: float
    batch_s: float
    max_buffer: int
    maxlen: int
    stream_age_ms: int
    min_replicas: int
    dedupe_ms: int
    cluster: bool
    closing: bool
    accepting: bool
    buffered: int
    buffer_full: bool
    routes: list[Route]
    filling: list[Block | None]
    full_of: list[list[Block]]
    waiting: dict[TopicState, list]
    expiry: asyncio.TimerHandle | None
    last_write: int  # the number of this node's last write
    script_sha: str
    positions: list[bytes]
    reading: set[int]
    read_at: list[float]
    shard_epochs: ShardEpochs
    stats: BackplaneStats

    if TYPE_CHECKING:  # of ShardLinks (broker.cluster.shards) and Reader (broker.cluster.reader)

        async def load_script(self) -> None: ...

        async def check(self, shards: list[int], client: Any, write: bool = False) -> list[tuple[int, int, int]]: ...

        def checked(self, shard: int, epoch: int, count: int, moved: int) -> None: ...

        def rolled_back(self, shard: int, epoch: int) -> None: ...

        def note_failure(self, what: str, failures: int, exc: Exception) -> None: ...

        def take(self, shard: int, entries: list, dated: bool = False, later: bool = False) -> None: ...

    def _update_accepting(self) -> None:
        self.accepting = not self.closing and not self.buffer_full and not any(route.down for route in self.routes)

    def stage(self, states: list[TopicState]) -> int:
        """Take the topics' pending batches for the next write and give each topic back the
        sequence number it had (numbers come from Redis). Returns the messages taken."""
        now = time.monotonic()
        taken, size, made = stage_batches(states, self.filling, self.full_of, self.waiting, self.shards, now, BLOCK_BYTES)
        if taken:
            self.buffered += size
            if made and self.expiry is None:
                self._arm(now)
            if self.buffered > self.max_buffer:
                self.buffer_full = True
                self.accepting = False
            for route in self.routes:
                if route.full or route.filled():
                    route.wake.set()
        return taken

    async def write_loop(self, route: Route) -> None:
        """Send the route's blocks, at most one per shard per write, until the node stops. A
        write that failed is sent again as it was (the script answers a repeat with the first
        one's numbers), unless its deadline passed meanwhile (`_answer_late`). While the route is
        down and holds nothing, its shards are checked every PROBE_S."""
        import redis.asyncio as aioredis

        while True:
            if not route.writing:
                if not (route.full or route.filled()):
                    if self.closing:
                        return
                    route.wake.clear()
                    if route.down:
                        try:
                            await asyncio.wait_for(route.wake.wait(), PROBE_S)
                        except TimeoutError:
                            pass
                        if route.down:
                            error = await self._probe(route)
                            if error is None:
                                pass
                            elif route.oom_since and out_of_memory(error):  # said once when it began
                                route.failures += 1
                                self._count_write_failures()
                            else:  # the probe is the writer's attempt while its shards refuse publishes
                                self._write_failed(
                                    route,
                                    f"checking {'Redis' if len(route.shards) > 1 else f'shard {route.shards[0]}'} (publishes are refused meanwhile)",
                                    error,
                                )
                        continue
                    await route.wake.wait()
                    continue
                # redis_batch_ms: at most one write per interval, what comes meanwhile goes in
                # it; a write of EAGER_MESSAGES or more (a busy node: few commands per message
                # anyway), a full block or stopping does not wait
                delay = route.started + self.batch_s - time.monotonic()
                if delay > 0 and not route.full and not self.closing and route.staged() < EAGER_MESSAGES:
                    route.wake.clear()
                    try:
                        await asyncio.wait_for(route.wake.wait(), delay)
                    except TimeoutError:
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
                    self.last_write += 1
                    block.write = self.last_write
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

    def _write_failed(self, route: Route, what: str, exc: Exception) -> None:
        route.failures += 1
        self._count_write_failures()
        self.note_failure(what, route.failures, exc)

    def _count_write_failures(self) -> None:
        self.stats.write_failures = max(route.failures for route in self.routes)

    async def _send(self, route: Route, blocks: list[Block]) -> None:
        """Write the blocks with one EVALSHA (scripts.WRITE), which also reads what the node
        reads of the route's shards since its positions; with redis_min_replicas, WAIT after
        it on the same connection. A write that failed or whose reply was lost keeps its
        blocks in `route.writing`: they are sent again as they are, unless their deadline
        passed meanwhile."""
        import redis.asyncio as aioredis
        from redis.exceptions import NoScriptError

        trim = self.trim()
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
            keys += (
                self.counters[shard],
                self.streams[shard],
                self.mark_keys[shard],
                f"{self.id_prefixes[shard]}{window}",
                f"{self.id_prefixes[shard]}{window - 1}",
            )
            topics = block.topics
            args += (
                unique_epoch(known_epoch),
                known_epoch,
                known_count,
                block.write,
                block.epoch if sent else "",
                _encode(list(topics.items())),
                _encode(list(topics)),
                _encode(ids) if ids else "",
                _encode(list(map(len, topics.values()))),
            )
        reading = [shard for shard in route.shards if shard in self.reading]
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
                pipe.evalsha(self.script_sha, len(keys), *keys, *args)
                wait_ms = max(1, int((min(block.staged for block in blocks) + self.timeout - time.monotonic()) * 1000))
                if self.cluster:
                    pipe.execute_command(
                        "WAIT", self.min_replicas, wait_ms, target_nodes=route.client.get_node_from_key(self.streams[blocks[0].shard])
                    )
                else:
                    pipe.execute_command("WAIT", self.min_replicas, wait_ms)
                self.stats.commands += 1
                reply, waited = await pipe.execute(raise_on_error=False)
                if isinstance(reply, BaseException):
                    raise reply
                waited = waited if isinstance(waited, int) else -1
            else:
                reply = await route.client.evalsha(self.script_sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis lost its scripts (it restarted): nothing of the write ran
            for block, sent in zip(blocks, was_sent):
                block.sent = sent
            await self.load_script()
            return
        except aioredis.ResponseError as exc:
            if out_of_memory(exc):  # refused at its first write: nothing of it was made
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
                self.rolled_back(block.shard, epoch)
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
            if waited is not None and waited < self.min_replicas and outcome != scripts.ENDED:  # not confirmed
                # on the master, not on the replicas (yet): a failover may lose it. Not taken as
                # known (a node must not end the epoch for a write nobody was told of)
                self._unreplicated(block, waited)
                continue
            if outcome == scripts.ENDED:
                self.shard_epochs.know(block.shard, epoch, int(count))
                if not block.answered:
                    self.stats.unknown += block.count
                    self._fail(
                        block,
                        f"the cluster backplane (Redis) lost what it held of epoch {block.epoch}, in which this publish was sent without an answer: it may have been published then (and delivered once) or not",
                        "may not have been published",
                    )
                continue
            self.shard_epochs.wrote(block.shard, epoch, int(count), block.write)
            self._written(block, epoch, _firsts.decode(firsts))
        if reading:
            now = time.monotonic()
            route.reads_until = now + 2 * self.batch_s + WRITER_READS_S
            for shard in reading:
                self.read_at[shard] = now
            for stream, entries in read or ():
                self.take(self.stream_shard[stream], entries, later=True)
        if route.down:
            self._back(route)

    def _out_of_memory(self, route: Route, blocks: list[Block]) -> None:
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
                count,
                "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}",
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
        if self.buffer_full and self.buffered <= self.max_buffer // 2:
            self.buffer_full = False
            self._update_accepting()

    def _arm(self, now: float) -> None:
        """Answer the oldest block at its deadline (redis_timeout_s after it was staged)."""
        oldest = min((block.staged for route in self.routes for block in route.all_blocks()), default=None)
        if oldest is None:
            self.expiry = None
            return
        self.expiry = asyncio.get_running_loop().call_later(max(0.0, oldest + self.timeout - now), self._answer_late)

    def _answer_late(self) -> None:
        """Answer every block whose deadline passed, wherever it is: a block never sent was not
        published; one sent without a reply may have been (its command may still be out). It
        is not sent again, so it is published once or never, and its acks say so. Its route's
        shards refuse publishes until Redis answers for them again."""
        now = time.monotonic()
        for route in self.routes:
            late = [block for block in route.all_blocks() if now - block.staged >= self.timeout]
            if not late:
                continue
            for block in late:
                if block.sent:
                    self.stats.unknown += block.count
                    self._fail(
                        block,
                        f"Redis did not confirm the publish within redis_timeout_s ({self.timeout:g} s): it may have been published (then it is delivered once) or not",
                        "may not have been published",
                    )
                else:
                    self._fail(
                        block,
                        f"the cluster backplane (Redis) did not take the publish within redis_timeout_s ({self.timeout:g} s); not published",
                    )
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

    def fail_all(self, text: str) -> None:
        for route in self.routes:
            for block in route.all_blocks():
                if not block.answered:
                    self._fail(block, text)
            route.writing = []
            route.full.clear()
            for shard in route.shards:
                route.filling[shard] = None
        for _state, waiting in self.waiting.items():
            for _, _, fail, _ in waiting:
                if fail is not None:
                    fail(ErrorCode.UNAVAILABLE, text)
        self.waiting = {}

    async def _probe(self, route: Route) -> Exception | None:
        """While the route's shards refuse publishes: check them (which also finds a Redis that
        came back older; after Redis was out of memory, with a write that changes nothing,
        which Redis refuses while it is full); when every check is answered, take publishes
        again. Returns why not, if not."""
        try:
            for shard, reply in zip(route.shards, await self.check(route.shards, route.client, write=bool(route.oom_since))):
                self.checked(shard, *reply)
        except Exception as exc:  # connection errors; on a cluster also RedisClusterException
            return exc
        if route.failures:
            if not route.oom_since:  # else `_back` says it
                log.warning(
                    "cluster backplane: Redis answers again for %s after %d failed attempt(s) to write or check",
                    "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}",
                    route.failures,
                )
            route.failures = 0
            self._count_write_failures()
        self._back(route)
        return None

    def trim(self) -> tuple[str, str]:
        """How an XADD trims its stream now: MINID ~ (by age) or MAXLEN ~."""
        if self.stream_age_ms:
            return "MINID", f"{int(self.clock() * 1000) - self.stream_age_ms}-0"
        return "MAXLEN", str(self.maxlen)

    def _back(self, route: Route) -> None:
        where = "every shard" if len(route.shards) > 1 else f"shard {route.shards[0]}"
        if route.oom_since:
            log.warning(
                "cluster backplane: Redis takes writes again for %s after being out of memory for %.1f s: %d publish(es) refused and %d message(s) not published meanwhile",
                where,
                time.monotonic() - route.oom_since,
                route.oom_refused,
                route.oom_failed,
            )
            route.oom_since = 0.0
            route.oom_refused = route.oom_failed = 0
        else:
            log.warning("cluster backplane: Redis answers again for %s; publishing", where)
        route.down = False
        self._update_accepting()
