"""Limits (broker/limits.py): connection admission at the handshake (per IP, in all, per user,
Origin), publish and new-topic rates (err 15), closes for persistent abuse (1008) and the
bounded audit log. Real servers on free ports and real sockets; the token bucket, the streak
rule and the audit log's bounds also with a clock of their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import pytest

from broker.audit import AuditLog
from broker.buckets import TokenBucket
from broker.errors import CloseCode, ConfigError, ErrorCode, RequestError
from broker.limits import Guard, LimitRefused
from broker.messages import SUBPROTOCOL, Ack, Delivery, Err, Pub, Req, Sub
from broker.settings import load
from conftest import RawSocketClient, eventually, replies, run, send_upgrade, serving, upgrade_request
from redis_support import BrokerNode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def audit_lines():
    """The broker's log records (WARNING and up) while the block runs, as (event, fields)."""
    records: list[tuple[str, dict]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    log = logging.getLogger("broker")
    handler = Collect(logging.WARNING)
    level = log.level
    if not log.isEnabledFor(logging.WARNING):
        log.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def with_header(request: bytes, line: str) -> bytes:
    return request[:-2] + line.encode() + b"\r\n\r\n"


async def upgrade(port: int, *, source: str = "127.0.0.1", header: str | None = None):
    """A broker.v1 upgrade from `source`: (status, body, writer). The writer stays open."""
    request = upgrade_request("/", [SUBPROTOCOL])
    if header:
        request = with_header(request, header)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    status = int(head.split(b" ")[1])
    body = b""
    if status != 101:
        body = await asyncio.wait_for(reader.read(), 3)
    return status, body.decode(), writer


def server_conns(server, before: set) -> list:
    return [server.connections[i] for i in sorted(set(server.connections) - before)]


# the token bucket


def test_token_bucket_burst_refill_and_cap():
    clock = Clock()
    bucket = TokenBucket(10, 50, clock)
    assert bucket.take(50) and not bucket.take(1)
    clock.now += 0.25
    assert bucket.level() == pytest.approx(2.5)
    assert bucket.take(2) and not bucket.take(1)
    clock.now += 3600
    assert bucket.level() == 50 and bucket.full(clock.now)
    with pytest.raises(ValueError):
        TokenBucket(10, 0)


def test_a_rate_without_a_burst_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="user_publish_burst must be at least 1 when user_publish_rate is set"):
        load({"user_publish_rate": 100}, environ={})
    load({"user_publish_rate": 100, "user_publish_burst": 100}, environ={})


# admission


def test_connection_flood_from_one_ip_gets_429_and_other_addresses_still_connect():
    async def main():
        async with serving(max_connections_per_ip=5) as server:
            with audit_lines() as lines:
                clients = [await RawSocketClient.connect(server.port) for _ in range(5)]
                refused = [await upgrade(server.port) for _ in range(20)]
                assert {status for status, _, _ in refused} == {429}
                body = refused[0][1]
                assert body == "5 connections from 127.0.0.1, the limit (max_connections_per_ip)\n"
                status, _, other = await upgrade(server.port, source="127.0.0.2")  # another address's count
                assert status == 101
                assert server.guard.per_ip == {"127.0.0.1": 5, "127.0.0.2": 1}
                assert server.guard.stats.refused == {"max_connections_per_ip": 20}
                for _, _, writer in refused:
                    writer.close()
                # closing two lets exactly two more in
                clients.pop().close()
                clients.pop().close()
                await eventually(lambda: server.guard.per_ip["127.0.0.1"] == 3, 3, "the closed connections released")
                clients += [await RawSocketClient.connect(server.port) for _ in range(2)]
                assert (await upgrade(server.port))[0] == 429
                # the audit log: the first lines of the address, then one line with the rest
                refusals = [f for e, f in lines if e == "handshake_refused"]
                assert len(refusals) == 5
                assert refusals[0]["status"] == 429 and refusals[0]["limit"] == "max_connections_per_ip"
                assert refusals[0]["peer"].startswith("127.0.0.1:") and refusals[0]["user"] is None
                server.guard.audit.flush()
                assert ("audit_lines_skipped", {"kind": "handshake_refused", "peer": "127.0.0.1", "count": 16}) in lines
            other.close()
            for client in clients:
                client.close()
            await eventually(lambda: server.guard.total == 0, 3, "every connection released")

    run(main())


def silent(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """`n` TCP connections to `port` from `source` that never send a byte (non-blocking)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) for _ in range(n)]
    for sock in socks:
        sock.setblocking(False)
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many of `socks` the server neither answered nor closed."""
    held = 0
    for sock in socks:
        try:
            sock.recv(4096)
        except BlockingIOError:
            held += 1
        except OSError:  # reset
            pass
    return held


def test_silent_connections_from_one_address_do_not_lock_out_another():
    """300 connections from one address that never send a request, to a broker with 256
    descriptors on its default settings: counted from their accept, no more than
    max_handshakes_per_ip (100) of them are held, the rest are answered 429 and closed, and a
    client from another address connects at once."""
    with BrokerNode("--handshake-timeout-s", "10", max_files=256) as node:
        socks = silent(node.port, 300)
        try:
            started = time.monotonic()

            async def honest():
                status, body, writer = await upgrade(node.port, source="127.0.0.2")
                writer.close()
                return status, body

            assert run(honest(), timeout=3)[0] == 101
            assert time.monotonic() - started < 3  # long before the silent ones time out (10 s)
            # the refused ones wait up to 1 s for their request before they close (at most 64
            # at a time; past that a refused connection is closed at once, which may reset it
            # before its 429 is read): let them go
            time.sleep(1.3)
            assert still_open(socks) == 100
            status, body, _ = run(asyncio.wait_for(upgrade(node.port), 3))  # the address itself: at its bound
            assert (status, body) == (429, "100 connections from 127.0.0.1 are in their handshake, the limit (max_handshakes_per_ip)\n")
        finally:
            for sock in socks:
                sock.close()


def test_connections_count_from_their_accept_in_all_per_address_and_in_the_handshake():
    async def main():
        settings = dict(max_connections=6, max_connections_per_ip=3, max_handshakes=4, max_handshakes_per_ip=2, handshake_timeout_s=1)
        async with serving(**settings) as server:
            guard = server.guard
            with audit_lines() as lines:
                quiet = silent(server.port, 2)
                await eventually(lambda: guard.handshakes_per_ip == {"127.0.0.1": 2}, 3, "the silent connections counted")
                status, body, writer = await upgrade(server.port)
                assert (status, body) == (429, "2 connections from 127.0.0.1 are in their handshake, the limit (max_handshakes_per_ip)\n")
                writer.close()
                quiet += silent(server.port, 2, "127.0.0.2")
                await eventually(lambda: guard.handshakes == 4, 3, "four in their handshake")
                status, body, writer = await upgrade(server.port, source="127.0.0.3")
                assert (status, body) == (503, "4 connections are in their handshake, the limit (max_handshakes); try again later\n")
                writer.close()
                assert guard.per_ip == {"127.0.0.1": 2, "127.0.0.2": 2} and guard.total == 4
                # handshake_timeout_s drops them and releases every count
                await eventually(lambda: guard.total == 0 and guard.handshakes == 0, 3, "the silent connections dropped")
                assert guard.handshakes_per_ip == {} and still_open(quiet) == 0
                # open connections count per address too; silent ones on top of them are refused at accept
                clients = [await RawSocketClient.connect(server.port) for _ in range(2)]
                assert guard.handshakes == 0 and guard.per_ip == {"127.0.0.1": 2}
                quiet = silent(server.port, 2)
                await asyncio.sleep(0.2)
                assert still_open(quiet) == 1 and guard.per_ip == {"127.0.0.1": 3}
                refusals = [f["limit"] for e, f in lines if e == "handshake_refused"]
                assert refusals == ["max_handshakes_per_ip", "max_handshakes", "max_connections_per_ip"]
            assert guard.stats.refused == {"max_handshakes_per_ip": 1, "max_handshakes": 1, "max_connections_per_ip": 1}
            assert server.refused_by_status == {429: 2, 503: 1}
            for sock in quiet:
                sock.close()
            for client in clients:
                client.close()
            await eventually(lambda: guard.total == 0, 3, "every connection released")

    run(main())


def test_max_connections_gets_503_whatever_the_address():
    async def main():
        async with serving(max_connections=3) as server:
            clients = [await RawSocketClient.connect(server.port) for _ in range(3)]
            status, body, writer = await upgrade(server.port, source="127.0.0.3")
            assert status == 503
            assert body == "the broker holds 3 connections, its limit (max_connections); try again later\n"
            writer.close()
            clients[0].close()
            await eventually(lambda: server.guard.total == 2, 3, "the closed connection released")
            status, _, writer = await upgrade(server.port, source="127.0.0.3")
            assert status == 101
            writer.close()
            for client in clients[1:]:
                client.close()

    run(main())


def test_connections_refused_during_the_handshake_are_released():
    async def main():
        async with serving(max_connections_per_ip=2) as server:
            for _ in range(6):  # admitted, then refused by a later check (the path): 404
                status, _, reader, writer = await send_upgrade(server.port, upgrade_request("/elsewhere", [SUBPROTOCOL]))
                assert status == 404
                writer.close()
            await eventually(lambda: server.guard.total == 0, 3, "the refused handshakes released")
            clients = [await RawSocketClient.connect(server.port) for _ in range(2)]
            for client in clients:
                client.close()

    run(main())


def test_origin_allow_list():
    async def main():
        async with serving(allowed_origins="https://app.example, https://ops.example:8443") as server:
            status, _, ok = await upgrade(server.port, header="Origin: https://app.example")
            assert status == 101
            status, _, ok2 = await upgrade(server.port, header="Origin: HTTPS://OPS.example:8443")  # case does not matter
            assert status == 101
            status, _, plain = await upgrade(server.port)  # no Origin: not a browser
            assert status == 101
            with audit_lines() as lines:
                status, body, bad = await upgrade(server.port, header="Origin: https://evil.example")
            assert status == 403 and body == "origin https://evil.example is not allowed (allowed_origins)\n"
            assert lines[0][0] == "handshake_refused" and lines[0][1]["limit"] == "allowed_origins"
            assert server.guard.stats.refused == {"allowed_origins": 1}
            for writer in (ok, ok2, plain, bad):
                writer.close()

    run(main())


# publish rates


def test_publish_rate_accepts_exactly_the_burst_then_refuses_with_ids_and_refills():
    async def main():
        async with serving(publish_rate=10, publish_burst=50) as server:
            clock = server.guard.clock = Clock()  # the connection's buckets read it: time passes when the test says
            client = await RawSocketClient.connect(server.port)
            await client.send([Pub(i, "rate.t", b"x") for i in range(1, 81)])
            got = await replies(client, 80)
            assert got[:50] == [Ack(i, got[0].epoch, i) for i in range(1, 51)]
            text = "rate limited: a connection may publish 10 messages a second (publish_rate, burst 50)"
            assert got[50:] == [Err(i, ErrorCode.RATE_LIMITED, text) for i in range(51, 81)]
            await client.send(Req(81, "svc.none", b"?"))  # a request is charged too
            assert await client.recv() == Err(81, ErrorCode.RATE_LIMITED, text)
            clock.now += 0.25  # two and a half tokens come back
            await client.send([Pub(82, "rate.t", b"x"), Pub(83, "rate.t", b"x"), Pub(84, "rate.t", b"x")])
            assert [type(m) for m in await replies(client, 3)] == [Ack, Ack, Err]
            assert server.guard.stats.rate_limited == {"publish_rate": 32}
            assert server.router.stats.errors[ErrorCode.RATE_LIMITED] == 32
            assert server.router.stats.dead_letters == 0  # refused by policy: in the audit log, not dead letters
            client.close()

    run(main())


def test_the_fire_and_forget_fast_path_cannot_exceed_the_limit():
    async def main():
        async with serving(publish_rate=5, publish_burst=40) as server:
            clock = server.guard.clock = Clock()
            reader = await RawSocketClient.connect(server.port)
            await reader.send(Sub(1, "fast.t"))
            assert type(await reader.recv()) is Ack
            client = await RawSocketClient.connect(server.port)
            await client.send(Pub(1, "fast.t", b"first"))  # the topic exists: the fast path takes it
            assert type(await client.recv()) is Ack
            await client.send([Pub(0, "fast.t", b"%d" % i) for i in range(100)])  # one frame of 100
            errors = await replies(client, 61)
            assert {(e.id, e.code) for e in errors} == {(0, ErrorCode.RATE_LIMITED)}
            delivered: list[bytes] = []
            while len(delivered) < 40:
                message = await reader.recv()
                assert type(message) is Delivery
                delivered += message.data
            assert delivered == [b"first"] + [b"%d" % i for i in range(39)]
            # a small frame within the allowance later passes whole
            clock.now += 0.5  # 2.5 tokens
            await client.send([Pub(0, "fast.t", b"a"), Pub(0, "fast.t", b"b")])
            got = []
            while len(got) < 2:
                got += (await reader.recv()).data
            assert got == [b"a", b"b"]
            assert server.guard.stats.rate_limited == {"publish_rate": 61}
            assert server.router.topics["fast.t"].seq == 42
            reader.close()
            client.close()

    run(main())


def test_persistent_abuse_closes_with_1008():
    async def main():
        async with serving(publish_rate=1, publish_burst=1, rate_limit_close_after=20) as server:
            with audit_lines() as lines:
                client = await RawSocketClient.connect(server.port)
                (conn,) = server.connections.values()
                await client.send([Pub(i, "abuse.t", b"secret-payload") for i in range(1, 31)])
                _, code, reason = await client.read_close()
                assert code == CloseCode.POLICY_VIOLATION
                assert reason == "rate limit abuse: 20 messages refused in a row (publish_rate)"
                await eventually(lambda: not server.connections, 3, "the connection gone")
                assert server.guard.stats.abuse_closes == 1
                assert server.router.stats.closes == {1008: 1}
                server.guard.audit.flush()
            limited = [f for e, f in lines if e == "rate_limited"]
            assert len(limited) == 5  # the first few of this connection in this second
            assert limited[0] == {
                "conn": conn.id,
                "peer": conn.peer,
                "user": None,
                "limit": "publish_rate",
                "id": 2,
                "reason": "rate limited: a connection may publish 1 message a second (publish_rate, burst 1)",
            }
            assert ("audit_lines_skipped", {"kind": "rate_limited", "conn": conn.id, "peer": conn.peer, "user": None, "count": 15}) in lines
            closes = [f for e, f in lines if e == "rate_limit_close"]
            assert closes == [{"conn": conn.id, "peer": conn.peer, "user": None, "code": 1008, "reason": reason}]
            assert not any("secret" in str(f) for _, f in lines)  # never payloads
            client.close()

    run(main())


def test_the_streak_is_refusals_in_a_row_within_10_s():
    clock = Clock()
    guard = Guard(
        load({"publish_rate": 1, "publish_burst": 1, "rate_limit_close_after": 5}, environ={}), clock=clock, log=lambda *a, **k: None
    )

    class Owner:
        id = 1
        peer = "10.0.0.1:4000"
        closed: tuple | None = None

        def close(self, code, reason):
            self.closed = (code, reason)

    def refuse(limits, n):
        for _ in range(n):
            with pytest.raises(RequestError):
                limits.check(7)

    owner = Owner()
    limits = guard.admit("10.0.0.1", owner=owner)
    limits.check(1)  # the burst
    refuse(limits, 4)
    clock.now += 1.0
    limits.check(2)  # accepted: the streak starts again
    refuse(limits, 4)
    clock.now += 11.0
    limits.check(3)
    refuse(limits, 3)
    clock.now += 10.5  # the streak is older than 10 s: it starts again at the next refusal
    limits.check(4)
    refuse(limits, 4)
    assert owner.closed is None
    refuse(limits, 1)
    assert owner.closed == (CloseCode.POLICY_VIOLATION, "rate limit abuse: 5 messages refused in a row (publish_rate)")


def test_new_topic_rate_refuses_creation_past_the_limit():
    async def main():
        async with serving(new_topic_rate=1, new_topic_burst=5, max_topics=1000) as server:
            client = await RawSocketClient.connect(server.port)
            await client.send([Pub(i, f"new.t{i}", b"x") for i in range(1, 11)])
            got = await replies(client, 10)
            assert [type(m) for m in got] == [Ack] * 5 + [Err] * 5
            text = "rate limited: a connection may create 1 new topic a second (new_topic_rate, burst 5)"
            assert got[5:] == [Err(i, ErrorCode.RATE_LIMITED, text) for i in range(6, 11)]
            assert sorted(t for t in server.router.topics if t.startswith("new.")) == [f"new.t{i}" for i in range(1, 6)]
            # publishing to topics that exist is not creating them; fire-and-forget to a new one is
            await client.send([Pub(20 + i, f"new.t{i}", b"y") for i in range(1, 6)] + [Pub(0, "new.t99", b"z")])
            got = await replies(client, 6)
            assert [type(m) for m in got] == [Ack] * 5 + [Err] and got[5] == Err(0, ErrorCode.RATE_LIMITED, text)
            assert "new.t99" not in server.router.topics
            assert server.guard.stats.rate_limited == {"new_topic_rate": 6}
            client.close()

    run(main())


def test_the_connections_of_one_address_share_a_new_topic_budget():
    """Ten connections from one address cannot create more new topics together than
    ip_new_topic_burst, while a client at another address still creates its own; reconnecting
    does not refill the address's bucket."""

    async def main():
        async with serving(new_topic_burst=100, ip_new_topic_rate=1, ip_new_topic_burst=20, max_topics=1000) as server:
            clients = [await RawSocketClient.connect(server.port) for _ in range(10)]
            accepted = 0
            for n, client in enumerate(clients):
                await client.send([Pub(i, f"ip.c{n}.t{i}", b"x") for i in range(1, 6)])
                got = await replies(client, 5)
                accepted += sum(type(m) is Ack for m in got)
                refused = [m for m in got if type(m) is Err]
                assert all(m.code == ErrorCode.RATE_LIMITED for m in refused)
            assert accepted in (20, 21)  # the burst (and what a second of rate refilled)
            assert (
                refused[0].text
                == "rate limited: the connections from 127.0.0.1 may create 1 new topic a second together (ip_new_topic_rate, burst 20)"
            )
            assert server.guard.stats.rate_limited["ip_new_topic_rate"] >= 29
            other = await RawSocketClient.connect(server.port, source="127.0.0.2")
            await other.send([Pub(i, f"ip.other.t{i}", b"x") for i in range(1, 6)])
            assert [type(m) for m in await replies(other, 5)] == [Ack] * 5
            for client in clients:
                client.close()
            await eventually(lambda: server.guard.per_ip.get("127.0.0.1", 0) == 0, 3, "the connections released")
            again = await RawSocketClient.connect(server.port)
            await again.send([Pub(i, f"ip.again.t{i}", b"x") for i in range(1, 4)])
            assert sum(type(m) is Ack for m in await replies(again, 3)) <= 2  # the bucket kept its level
            again.close()
            other.close()

    run(main())


def test_on_the_defaults_several_connections_of_one_address_cannot_fill_max_topics():
    """Three connections from one address each ask for 5,000 new topics at once: on the
    default settings the address gets ip_new_topic_burst (10,000) of them and what the rate
    refilled meanwhile, not 15,000 (each connection's own bucket would allow 10,000)."""

    async def main():
        async with serving() as server:
            clients = [await RawSocketClient.connect(server.port) for _ in range(3)]
            started = time.monotonic()
            for n, client in enumerate(clients):
                for start in range(0, 5000, 1000):
                    await client.send([Pub(0, f"d.c{n}.t{i}", b"x") for i in range(start, start + 1000)])
            await eventually(lambda: server.guard.stats.rate_limited.get("ip_new_topic_rate", 0) > 0, 10, "a refusal")
            await asyncio.sleep(0.3)
            elapsed = time.monotonic() - started
            created = sum(1 for t in server.router.topics if t.startswith("d."))
            assert 10_000 <= created <= 10_000 + 1000 * elapsed + 10, (created, elapsed)
            for client in clients:
                client.close()

    run(main())


# per user


def test_per_user_connections_and_shared_buckets_through_the_admission_hook():
    """`Guard.admit_user(conn, user)` is what authentication calls once it knows the user (at
    the handshake, where a refusal is a 429 response); here it is called on open connections."""

    async def main():
        settings = dict(
            max_connections_per_user=2,
            publish_rate=0,
            user_publish_rate=1,
            user_publish_burst=30,
            user_new_topic_rate=1,
            user_new_topic_burst=3,
        )
        async with serving(**settings) as server:
            guard = server.guard
            before = set(server.connections)
            c1, c2, c3 = [await RawSocketClient.connect(server.port) for _ in range(3)]
            s1, s2, s3 = server_conns(server, before)
            guard.admit_user(s1, "alice")
            guard.admit_user(s2, "alice")
            guard.admit_user(s2, "alice")  # again: nothing changes
            with audit_lines() as lines, pytest.raises(LimitRefused) as refused:
                guard.admit_user(s3, "alice")
            assert refused.value.status == 429
            assert refused.value.text == "user 'alice' has 2 connections, the limit (max_connections_per_user)"
            assert s3.user is None and lines[0][1]["user"] == "alice" and lines[0][1]["conn"] == s3.id
            guard.admit_user(s3, "bob")
            assert (s1.user, s2.user, s3.user) == ("alice", "alice", "bob")

            # alice's 30 messages are shared by her two connections; bob has his own
            await c1.send([Pub(i, "user.a", b"x") for i in range(1, 21)])
            assert [type(m) for m in await replies(c1, 20)] == [Ack] * 20
            await c2.send([Pub(i, "user.a", b"x") for i in range(1, 21)])
            got = await replies(c2, 20)
            assert [type(m) for m in got] == [Ack] * 10 + [Err] * 10
            assert (
                got[10].text
                == "rate limited: user 'alice' may publish 1 message a second over all its connections (user_publish_rate, burst 30)"
            )
            await c3.send([Pub(i, "user.b", b"x") for i in range(1, 21)])
            assert [type(m) for m in await replies(c3, 20)] == [Ack] * 20
            assert guard.stats.rate_limited == {"user_publish_rate": 10}

            # new topics: bob created user.b; two more, then the third is refused
            await c3.send([Pub(30 + i, f"user.b{i}", b"x") for i in range(3)])
            got = await replies(c3, 3)
            assert [type(m) for m in got] == [Ack, Ack, Err] and "user_new_topic_rate" in got[2].text

            # a user's connection that leaves makes room for another; its buckets stay drained
            c1.close()
            c2.close()
            await eventually(lambda: guard.users["alice"].connections == 0, 3, "alice's connections released")
            before = set(server.connections)
            c4 = await RawSocketClient.connect(server.port)
            (s4,) = server_conns(server, before)
            guard.admit_user(s4, "alice")
            await c4.send(Pub(1, "user.a", b"x"))
            assert (await c4.recv()).code == ErrorCode.RATE_LIMITED  # reconnecting does not refill
            c3.close()
            c4.close()
            await eventually(lambda: guard.total == 0, 3, "every connection released")
            assert guard.users["alice"].connections == 0  # kept until its buckets are full again

    run(main())


# the audit log's bounds


def test_audit_log_is_bounded_per_key_and_per_event():
    clock = Clock()
    lines: list[tuple[str, dict]] = []
    audit = AuditLog(lambda level, event, **fields: lines.append((event, fields)), clock, per_key=5, per_event=50)
    for i in range(1000):
        audit.record(7, "rate_limited", {"conn": 7}, conn=7, id=i)
    assert len(lines) == 5
    for key in range(200):
        audit.record(("ip", key), "handshake_refused", {"peer": key}, peer=key)
    assert len(lines) == 55
    clock.now += 1.0
    audit.record(7, "rate_limited", {"conn": 7}, conn=7, id=1000)  # a new second: the summary first
    assert lines[55:] == [
        ("audit_lines_skipped", {"kind": "rate_limited", "conn": 7, "count": 995}),
        ("audit_lines_skipped", {"kind": "handshake_refused", "count": 150, "sources": 150}),
        ("rate_limited", {"conn": 7, "id": 1000}),
    ]


# `auth` messages: a signature check each, counted in the iteration's budget and rate limited


def _es256_key_file(tmp_path):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "es256.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def token(**claims) -> str:
        import time

        claims = {"sub": "flood", "exp": int(time.time()) + 120, "subscribe": [">"], "publish": [">"], **claims}
        return jwt.encode(claims, key, algorithm="ES256")

    return str(path), token


async def _round_trips(port: int, headers: dict, seconds: float) -> tuple[int, float]:
    """An honest client's publish-and-ack round trips in `seconds`, and the longest wait."""
    import time

    client = await RawSocketClient.connect(port, headers=headers)
    try:
        count, longest = 0, 0.0
        start = last = time.monotonic()
        while last - start < seconds:
            await client.send(Pub(count + 1, "honest", b"x"))
            reply = await client.recv()
            assert isinstance(reply, Ack), reply
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
            count += 1
        return count, longest
    finally:
        client.close()


@pytest.mark.slow
def test_an_auth_flood_does_not_stall_an_honest_round_trip(tmp_path):
    """Frames of 3,000 `auth` messages with a valid ES256 token (a signature check of about
    0.1 ms each), sent back to back by one connection with the rate limit off: the checks
    count in the iteration's budget, so an honest client's publish-and-ack loop goes on
    (before: 2 or 3 round trips in 1.5 s, pauses of seconds) while the flood is served too."""
    from broker.messages import Auth, encode
    from conftest import client_frame

    key_file, token = _es256_key_file(tmp_path)

    async def main():
        async with serving(auth_jwt_public_key_file=key_file, auth_message_rate=0) as server:
            honest = {"Authorization": f"Bearer {token(sub='honest')}"}
            baseline, _ = await _round_trips(server.port, honest, 0.5)
            flood_token = token()
            flooder = await RawSocketClient.connect(server.port, headers={"Authorization": f"Bearer {flood_token}"})
            frame = client_frame(0x2, encode([Auth(0, flood_token)] * 3000))
            stop = asyncio.Event()

            async def flood() -> int:
                sent = 0
                while not stop.is_set():
                    await flooder.loop.sock_sendall(flooder.sock, frame)
                    sent += 1
                return sent

            checks = server.auth.checks
            task = asyncio.create_task(flood())
            await asyncio.sleep(0.2)  # the flood is under way
            count, longest = await _round_trips(server.port, honest, 1.5)
            stop.set()
            flooder.close()
            await asyncio.wait_for(task, 5)
            return baseline, count, longest, server.auth.checks - checks

    baseline, count, longest, checks = run(main(), timeout=60)
    assert checks >= 1000, f"the flood was not served ({checks} tokens checked)"
    assert count >= 30 and longest < 0.75, (
        f"{count} round trips in 1.5 s during the flood (baseline {baseline} in 0.5 s), longest wait {longest:.3f} s"
    )


def test_auth_messages_are_rate_limited_per_connection_anonymous_or_not(tmp_path):
    """Past auth_message_burst an `auth` gets err 15 naming auth_message_rate and its token is
    not checked; anonymous connections are held to it alike, and one that ignores the
    refusals is closed with 1008 like any other rate-limit abuser."""
    from broker.messages import Auth

    key_file, token = _es256_key_file(tmp_path)

    async def main():
        settings = dict(
            auth_jwt_public_key_file=key_file, auth_anonymous=True, auth_message_rate=1, auth_message_burst=3, rate_limit_close_after=20
        )
        async with serving(**settings) as server:
            named = await RawSocketClient.connect(server.port, headers={"Authorization": f"Bearer {token()}"})
            anonymous = await RawSocketClient.connect(server.port)
            try:
                for client in (named, anonymous):
                    checks = server.auth.checks
                    for i in range(1, 6):
                        await client.send(Auth(i, token()))
                    replies = [await client.recv() for _ in range(5)]
                    assert [getattr(r, "code", 0) for r in replies[3:]] == [ErrorCode.RATE_LIMITED] * 2
                    assert (
                        replies[3].text
                        == "rate limited: a connection may send 1 auth message a second (auth_message_rate, burst 3); the token was not checked"
                    )
                    assert server.auth.checks - checks == 3
                assert [type(r) for r in replies[:3]] == [Err] * 3  # anonymous: another user, refused after the check
                assert server.guard.stats.rate_limited["auth_message_rate"] == 4
                await anonymous.send([Auth(100 + i, "x") for i in range(30)])
                _, code, reason = await anonymous.read_close()
                assert (code, reason) == (CloseCode.POLICY_VIOLATION, "rate limit abuse: 20 messages refused in a row (auth_message_rate)")
            finally:
                named.close()
                anonymous.close()

    run(main())


def test_a_token_check_counts_in_the_iteration_budget():
    from broker.router import TICK_INPUT_BYTES, TICK_TOKEN_CHECK_BYTES
    from conftest import Harness

    h = Harness()
    assert not h.router.busy
    for _ in range(TICK_INPUT_BYTES // TICK_TOKEN_CHECK_BYTES):
        h.router.token_checked()
    assert h.router.busy
