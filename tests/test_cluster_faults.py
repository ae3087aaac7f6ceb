"""What a cluster does when Redis or a node fails: each outcome of docs/cluster.md, for real.

Every test starts its own redis-server (it stops, pauses or starves it) and real broker nodes;
timeouts are short so that each failure is reached in about a second."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import msgspec
import pytest
import redis
from test_cluster import take

from broker.client import Client, Gap, Message
from broker.errors import ErrorCode, RequestError
from conftest import run, serving, url
from redis_support import BrokerNode

FAST = {"redis_timeout_s": 1.0}


def node(redis_url: str, **settings):
    return serving(redis_url=redis_url, redis_prefix="f", **FAST, **settings)


async def publish_all(client: Client, topic: str, payloads: list[bytes]) -> dict[bytes, object]:
    """Publish each payload acknowledged, all at once; each one's ack or error."""
    results = await asyncio.gather(*(client.publish_acked(topic, p) for p in payloads), return_exceptions=True)
    return dict(zip(payloads, results))


async def until(predicate, timeout: float = 10.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)


@pytest.mark.slow
def test_redis_stopped_publishes_fail_with_err_18_then_a_new_epoch_after_it_restarts_empty(own_redis):
    async def main():
        async with node(own_redis.url) as a, node(own_redis.url) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("f.t")
                for i in range(5):
                    before = await publisher.publish_acked("f.t", b"%d" % i)
                assert [m.seq for m in await take(sub, 5)] == [1, 2, 3, 4, 5]
                own_redis.stop()
                started = time.monotonic()
                try:
                    await publisher.publish_acked("f.t", b"lost")
                    raise AssertionError("published while Redis was stopped")
                except RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                assert time.monotonic() - started < 4
                # from then on a publish is refused at once, until Redis answers again
                started = time.monotonic()
                try:
                    await publisher.publish_acked("f.t", b"refused")
                except RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                assert time.monotonic() - started < 0.5
                assert a.cluster.stats.unknown + a.cluster.stats.failed >= 1 and a.cluster.stats.refused >= 1
                # while publishes are refused, the writer's checks (every 0.5 s) count on as
                # failures in a row, as the node's readers' failures do
                await until(lambda: asyncio.sleep(0, a.cluster.stats.write_failures >= 7), 10)
                assert min(a.cluster.stats.read_failures) >= 3
                own_redis.start()  # the same port, no data: counters and streams are gone

                async def published() -> bool:
                    try:
                        await publisher.publish_acked("f.t", b"again")
                        return True
                    except RequestError as exc:
                        assert exc.code == ErrorCode.UNAVAILABLE
                        return False

                await until(published, 15, 0.2)
                gap, again = await take(sub, 2, timeout=15)
                assert a.cluster.stats.write_failures == 0
                # a reader between two attempts (up to 1 s apart) reads again at its next one
                await until(lambda: asyncio.sleep(0, a.cluster.stats.read_failures == [0] * 16), 5)
                # the old epoch ends where the subscriber was; the topic goes on in a new one
                assert isinstance(gap, Gap) and gap.cause == "ended" and gap.epoch == before.epoch and gap.first == 6 and gap.last == 0
                assert isinstance(again, Message) and again.data == b"again" and again.seq == 1 and again.epoch != before.epoch

    run(main(), timeout=60)


@pytest.mark.slow
def test_redis_paused_past_the_timeouts_every_publish_is_acked_once_or_refused(own_redis):
    async def main():
        async with node(own_redis.url) as a, node(own_redis.url) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("p.t")
                assert (await publisher.publish_acked("p.t", b"0")).seq == 1
                own_redis.pause()
                payloads = [b"%d" % i for i in range(1, 41)]
                pending = asyncio.ensure_future(publish_all(publisher, "p.t", payloads[:20]))
                await asyncio.sleep(1.5)  # longer than redis_timeout_s
                later = asyncio.ensure_future(publish_all(publisher, "p.t", payloads[20:]))
                await asyncio.sleep(1.0)
                own_redis.resume()
                outcomes = {**await pending, **await later}
                acked = {p: r.seq for p, r in outcomes.items() if not isinstance(r, BaseException)}
                errors = {p: r for p, r in outcomes.items() if isinstance(r, BaseException)}
                assert all(isinstance(r, RequestError) and r.code == ErrorCode.UNAVAILABLE for r in errors.values()), errors
                unknown = {p for p, r in errors.items() if "may have been published" in r.text}
                refused = set(errors) - unknown
                assert errors, "some publishes waited longer than redis_timeout_s"
                await until(lambda: _accepting(a), 10)  # Redis answers again
                end = await publisher.publish_acked("p.t", b"end")
                got = await take(sub, end.seq, timeout=15)
                # numbers without gap or repeat; every acknowledged message once, with its
                # number; a refused one never; one whose outcome was unknown at most once
                assert [m.seq for m in got] == list(range(1, end.seq + 1))
                delivered = [m.data for m in got[1:-1]]
                assert len(delivered) == len(set(delivered))
                assert {m.data: m.seq for m in got[1:-1] if m.data in acked} == acked
                assert not refused & set(delivered)
                assert set(delivered) <= set(acked) | unknown

    run(main(), timeout=60)


def test_a_full_buffer_refuses_publishes_at_once(own_redis):
    async def main():
        async with node(own_redis.url, redis_max_buffer_bytes=4096) as a:
            async with Client(url(a)) as publisher:
                assert (await publisher.publish_acked("b.t", b"x")).seq == 1
                own_redis.pause()
                try:
                    errors: list[RequestError] = []
                    publisher.on_error = errors.append
                    for _ in range(10):  # 10 frames of 1,000 bytes: past the buffer after 5
                        for _ in range(10):
                            publisher.publish("b.t", b"y" * 100)
                        await asyncio.sleep(0.05)
                    await until(lambda: _true(errors), 5)
                    assert errors[0].code == ErrorCode.UNAVAILABLE and "limit" in errors[0].text
                    assert a.cluster.stats.refused >= 1
                finally:
                    own_redis.resume()
                await until(lambda: _accepting(a), 10)
                assert (await publisher.publish_acked("b.t", b"z")).seq > 1

    run(main(), timeout=60)


async def _true(items) -> bool:
    return bool(items)


async def _accepting(server) -> bool:
    return server.cluster.accepting


@pytest.mark.slow
def test_redis_out_of_memory_refuses_publishes_and_they_work_again_after(own_redis):
    async def main():
        async with node(own_redis.url) as a, node(own_redis.url) as b:
            async with Client(url(a)) as publisher, Client(url(b)) as client:
                sub = await client.subscribe("m.t")
                assert (await publisher.publish_acked("m.t", b"before")).seq == 1
                used = int(own_redis.info("memory")["used_memory"])
                own_redis.config_set("maxmemory-policy", "noeviction")
                own_redis.config_set("maxmemory", str(used + 200_000))
                outcomes = await publish_all(publisher, "m.t", [b"%d" % i + b"." * 20_000 for i in range(40)])
                refused = [p for p, r in outcomes.items() if isinstance(r, RequestError)]
                assert refused and all(outcomes[p].code == ErrorCode.UNAVAILABLE for p in refused)
                acked = {p: r.seq for p, r in outcomes.items() if not isinstance(r, BaseException)}
                own_redis.config_set("maxmemory", "0")

                async def published() -> bool:
                    try:
                        await publisher.publish_acked("m.t", b"after")
                        return True
                    except RequestError:
                        return False

                await until(published, 15, 0.2)
                got = await take(sub, len(acked) + 2, timeout=15)
                assert [m.seq for m in got] == list(range(1, len(acked) + 3))
                assert got[-1].data == b"after" and {m.data: m.seq for m in got[1:-1]} == acked

    run(main(), timeout=60)


def test_redis_out_of_memory_is_named_logged_once_and_readiness_stays_down_until_it_takes_writes(own_redis, caplog):
    """Redis at maxmemory (noeviction): publishers are told Redis is out of memory (at once,
    not after redis_timeout_s), the node logs it once and again with a count when it is over,
    /readyz answers 503 all along (no flapping between 200 and 503) and 200 again soon after
    Redis takes writes again."""
    import logging

    import aiohttp

    from conftest import free_port

    caplog.set_level(logging.WARNING, logger="broker.cluster")

    async def ready(port: int) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                return response.status

    async def main():
        port = free_port()
        async with node(own_redis.url, admin_port=port) as a:
            async with Client(url(a), request_timeout=30) as publisher:
                assert (await publisher.publish_acked("o.t", b"before")).seq == 1
                used = int(own_redis.info("memory")["used_memory"])
                own_redis.config_set("maxmemory-policy", "noeviction")
                own_redis.config_set("maxmemory", str(used // 2))  # full, whatever its buffers do meanwhile
                errors: list[RequestError] = []
                full = time.monotonic()
                statuses: list[int] = []

                async def poll() -> None:  # as a load balancer would, all along
                    while True:
                        statuses.append(await ready(port))
                        await asyncio.sleep(0.02)

                poller = None
                for i in range(60):  # a publish every 50 ms or so for 3 s or more
                    try:
                        await publisher.publish_acked(f"o.{i % 20}", b"x" * 1000)
                        raise AssertionError("published while Redis was full")
                    except RequestError as exc:
                        errors.append(exc)
                    if poller is None:  # after the first refusal: the node knows
                        poller = asyncio.ensure_future(poll())
                    await asyncio.sleep(0.05)
                poller.cancel()
                assert set(statuses) == {503}, "".join("+" if status == 200 else "." for status in statuses)
                assert all(e.code == ErrorCode.UNAVAILABLE and "out of memory" in e.text for e in errors), {e.text for e in errors}
                assert time.monotonic() - full < 8  # refused at once, not each after redis_timeout_s
                own_redis.config_set("maxmemory", "0")
                back = time.monotonic()
                while await ready(port) != 200:
                    assert time.monotonic() - back < 3, "not ready 3 s after Redis takes writes again"
                    await asyncio.sleep(0.05)
                assert (await publisher.publish_acked("o.t", b"after")).seq > 1
        said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
        assert len(said) == 2, said  # when it started, and when it ended, with the counts
        refused, failed = map(int, re.search(r"(\d+) publish\(es\) refused and (\d+) message\(s\) not published", said[1]).groups())
        assert refused + failed == len(errors), said[1]
        assert not [r for r in caplog.records if "works again" in r.getMessage() or "answers again" in r.getMessage()]

    run(main(), timeout=60)


@pytest.mark.slow
def test_a_node_killed_with_clients_on_it_they_move_and_recover(own_redis):
    settings = ["--redis-url", own_redis.url, "--redis-prefix", "k"]
    with BrokerNode(*settings) as a, BrokerNode(*settings) as b:

        async def main():
            async with Client(b.url) as publisher:
                client = Client([a.url, b.url], reconnect_delay=(0.05, 0.2))
                await client.open()
                try:
                    sub = await client.subscribe("k.t")
                    for i in range(1, 101):
                        publisher.publish("k.t", b"%d" % i)
                    first = await take(sub, 100)
                    a.kill()
                    for i in range(101, 201):
                        publisher.publish("k.t", b"%d" % i)
                    rest = await take(sub, 100, timeout=15)
                finally:
                    await client.close()
                got = first + rest
                assert client.url == b.url
                assert not [g for g in got if isinstance(g, Gap)]
                assert [(m.seq, m.data) for m in got] == [(i, b"%d" % i) for i in range(1, 201)]

        run(main(), timeout=60)


@pytest.mark.slow
def test_a_stopped_node_does_not_hold_the_others_back_and_catches_up_or_reports_the_exact_gap(own_redis):
    settings = ["--redis-url", own_redis.url, "--redis-prefix", "s", "--redis-stream-maxlen", "10"]
    with BrokerNode(*settings) as a, BrokerNode(*settings) as slow:

        async def main():
            async with Client(a.url) as publisher, Client(a.url) as fast_client, Client(slow.url, reconnect=False) as slow_client:
                fast = await fast_client.subscribe("s.t")
                lagging = await slow_client.subscribe("s.t")
                assert (await publisher.publish_acked("s.t", b"1")).seq == 1
                assert [m.seq for m in await take(lagging, 1)] == [1]
                os.kill(slow.pid, signal.SIGSTOP)
                try:
                    # one stream entry per acked publish: far more than the stream keeps (~10)
                    for i in range(2, 602):
                        await publisher.publish_acked("s.t", b"%d" % i)
                    got = await take(fast, 601, timeout=20)  # while the other node is stopped
                    assert [m.seq for m in got] == list(range(1, 602))
                finally:
                    os.kill(slow.pid, signal.SIGCONT)
                items = []
                while not items or not isinstance(items[-1], Message) or items[-1].seq != 601:
                    items += await take(lagging, 1, timeout=20)
                gaps = [g for g in items if isinstance(g, Gap)]
                messages = [m for m in items if isinstance(m, Message)]
                # what the stream no longer held when the node read again is one gap with its
                # exact range (what Redis had already sent it before it stopped came first)
                assert len(gaps) == 1 and gaps[0].cause == "backplane"
                (gap,) = gaps
                before = [m.seq for m in messages if m.seq < gap.first]
                after = [m.seq for m in messages if m.seq > gap.last]
                assert before == list(range(2, gap.first)) and after == list(range(gap.last + 1, 602))
                assert len(before) + len(after) == len(messages) and gap.last > gap.first

        run(main(), timeout=90)


class CuttingProxy:
    """A TCP proxy in front of Redis that can hold Redis's replies back, pass on what it held,
    and cut every connection, dropping what it still holds: replies lost after Redis ran the
    commands, as when a connection breaks at the wrong moment."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.holding = False
        self.links: list[dict] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _link(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = {"client": client_writer, "redis": redis_writer, "held": bytearray()}
        self.links.append(link)

        async def pump(reader, writer, replies: bool):
            try:
                while (data := await reader.read(65536)) and not writer.is_closing():
                    if replies and self.holding:
                        link["held"] += data
                    else:
                        writer.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pump(client_reader, redis_writer, False), pump(redis_reader, client_writer, True))

    def pass_held(self) -> None:
        for link in self.links:
            if not link["client"].is_closing():
                link["client"].write(bytes(link["held"]))
            link["held"].clear()

    def cut(self) -> None:
        self.holding = False
        for link in self.links:
            link["held"].clear()
            link["client"].transport.abort()
            link["redis"].transport.abort()
        self.links = []

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


def test_a_write_sent_again_after_its_reply_was_lost_appends_each_block_once(own_redis):
    """Publishes staged while a write is out fill several blocks of one shard; the next write
    takes one of them, its reply is lost, and it is sent again: the script's repeat check
    answers it, so nothing is appended twice and every message has one number."""

    async def main():
        proxy = CuttingProxy(own_redis.port)
        proxied = await proxy.start()
        try:
            async with serving(redis_url=proxied, redis_prefix="cut", redis_timeout_s=10.0) as a:
                async with Client(url(a), request_timeout=60) as publisher, Client(url(a)) as client:
                    sub = await client.subscribe("big")
                    await publisher.publish_acked("big", b"warm")
                    proxy.holding = True
                    small = asyncio.ensure_future(publisher.publish_acked("big", b"small"))
                    await asyncio.sleep(0.3)  # that write is out, its reply held
                    payloads = [b"%d" % i + b"x" * (400 << 10) for i in range(6)]  # about 3 blocks of 1 MiB
                    big = asyncio.ensure_future(publish_all(publisher, "big", payloads))
                    await asyncio.sleep(0.5)  # staged behind the write that is out
                    scripts = a.cluster.stats.scripts
                    proxy.pass_held()  # the first write is answered; the next goes out, its reply held
                    await until(lambda: asyncio.sleep(0, a.cluster.stats.scripts > scripts))
                    await asyncio.sleep(0.3)  # Redis ran it
                    proxy.cut()  # and its reply is lost: the writer sends it again
                    acks = [await small, *(await big).values()]
                    assert not [ack for ack in acks if isinstance(ack, BaseException)]
                    assert a.cluster.stats.in_doubt >= 1
                    got = await take(sub, 1 + 1 + len(payloads), timeout=20)
                    assert [m.data for m in got if isinstance(m, Message)][0] == b"warm"
                    assert sorted(m.seq for m in got) == list(range(1, 9))  # one number each, none twice
                    assert {ack.seq for ack in acks} == set(range(2, 9))
            r = redis.Redis(port=own_redis.port)
            try:
                shard_stream = [key for key in r.scan_iter("{cut:*}:s") if r.xlen(key)][0]
                published = sum(len(batch[1]) for _, fields in r.xrange(shard_stream) for batch in msgspec.msgpack.decode(fields[b"d"]))
            finally:
                r.close()
            assert published == 8  # in the stream once each
        finally:
            await proxy.close()

    run(main(), timeout=60)
