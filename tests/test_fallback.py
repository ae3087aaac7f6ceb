"""The fallback transport (docs/protocol.md section 12) through the real server, with a plain
HTTP client: the event stream and POSTs carry the very frames a WebSocket does, with the same
rules (origin, token, limits), the stream resumes with Last-Event-ID, a silent client is found
by the ping rule, and behind a load balancer that keeps a stream's requests together by its
Broker-Stream header it works across two nodes of a cluster."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time

import jwt
import msgspec

from broker.client import Client
from conftest import eventually, run, serving, url

STREAM = "AAAAAAAAAAAAAAAAAAAAAA"  # a stream id (any 16 to 64 base64url characters)


def new_stream_id() -> str:
    return base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


def request_bytes(method: str, headers: dict[str, str], body: bytes = b"", path: str = "/") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    if method in ("POST", "DELETE") and "Content-Length" not in headers and body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body (or none): status, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return status, headers, body


async def http(port: int, method: str, headers: dict[str, str], body: bytes = b"", path: str = "/") -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(method, headers, body, path))
        return await read_response(reader)
    finally:
        writer.close()


def fallback_headers(stream: str = STREAM, **extra: str) -> dict[str, str]:
    return {"Broker-Protocol": "broker.v1", "Broker-Stream": stream, **extra}


class EventStream:
    """A fallback client: the event stream on one connection, POSTs on another (kept alive),
    as a browser's fetch does."""

    def __init__(self, port: int, stream: str | None = None) -> None:
        self.port = port
        self.stream = stream or new_stream_id()
        self.last_id = ""
        self.opening = ""
        self._buffer = b""

    async def open(self, last_event_id: str | None = None, **headers: str) -> int:
        """Open the stream; the status (200: `opening` is new or resumed)."""
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = fallback_headers(self.stream, Accept="text/event-stream", **headers)
        if last_event_id is not None:
            head["Last-Event-ID"] = last_event_id
        self.writer.write(request_bytes("GET", head))
        status, self.headers, body = await self._head()
        if status != 200:
            self.error = body.decode()
            return status
        self._buffer = b""
        kind, data, _ = await self.event()
        assert kind == "open", kind
        self.opening = data
        self.post_reader, self.post_writer = await asyncio.open_connection("127.0.0.1", self.port)
        return status

    async def _head(self):
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = {line.partition(": ")[0].lower(): line.partition(": ")[2] for line in lines[1:] if line}
        status = int(lines[0].split(" ")[1])
        body = b""
        if status != 200 and "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, body

    async def _chunk(self) -> bytes:
        size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 5)).strip(), 16)
        data = await asyncio.wait_for(self.reader.readexactly(size + 2), 5)
        if size == 0:
            raise EOFError("the response ended")
        return data[:-2]

    async def event(self, timeout: float = 5.0) -> tuple[str, str, str]:
        """The next event: (kind, data, id)."""
        while b"\n\n" not in self._buffer:
            self._buffer += await asyncio.wait_for(self._chunk(), timeout)
        block, _, self._buffer = self._buffer.partition(b"\n\n")
        kind, data, event_id = "message", "", ""
        for line in block.decode().split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data = value
            elif field == "id":
                event_id = value
        if event_id:
            self.last_id = event_id
        return kind, data, event_id

    async def messages(self, timeout: float = 5.0) -> list:
        """The messages of the next frame event (ping events are answered)."""
        while True:
            kind, data, _ = await self.event(timeout)
            if kind == "message":
                return msgspec.msgpack.decode(base64.b64decode(data))
            if kind == "ping":
                await self.post(b"")
                continue
            raise AssertionError(f"a {kind} event: {data}")

    async def until(self, predicate, timeout: float = 5.0) -> list:
        """Messages until one satisfies `predicate`; all of them."""
        seen: list = []
        deadline = time.monotonic() + timeout
        while not any(predicate(m) for m in seen):
            seen += await self.messages(max(0.05, deadline - time.monotonic()))
        return seen

    async def post(self, frame, **headers: str) -> tuple[int, bytes]:
        body = frame if isinstance(frame, bytes) else msgspec.msgpack.encode(frame)
        head = fallback_headers(self.stream, **{"Content-Type": "application/msgpack", **headers})
        self.post_writer.write(request_bytes("POST", head, body))
        status, _, text = await read_response(self.post_reader)
        return status, text

    def cut(self) -> None:
        """The event stream's TCP connection ends (the POST connection stays)."""
        self.writer.transport.abort()

    def close(self) -> None:
        for writer in (getattr(self, "writer", None), getattr(self, "post_writer", None)):
            if writer is not None:
                writer.close()


def delivered(messages: list) -> dict[str, list[tuple[int, bytes]]]:
    """topic -> [(seq, payload)] of the msg batches, topic ids resolved through the topic
    messages among `messages`."""
    names: dict[int, str] = {}
    out: dict[str, list] = {}
    for m in messages:
        if m[0] == "topic":
            names[m[1]] = m[2]
        elif m[0] == "msg":
            for batch in m[1:]:
                for i, payload in enumerate(batch[2:]):
                    out.setdefault(names[batch[0]], []).append((batch[1] + i, payload))
    return out


def test_the_stream_and_posts_carry_the_protocol_as_a_websocket_does():
    """Subscribe, publish (acked and not), get acks, the topic announcement, deliveries, an
    err with its id, a request answered by a WebSocket responder, and a heartbeat."""

    async def main():
        async with serving() as server:
            es = EventStream(server.port)
            assert await es.open() == 200 and es.opening == "new"
            assert es.headers["content-type"] == "text/event-stream" and es.headers["transfer-encoding"] == "chunked"
            assert await es.post([["sub", 1, "md.>"], ["pub", 2, "md.a", b"one"], ["pub", 0, "md.a", b"two"]]) == (204, b"")
            got = await es.until(lambda m: m[0] == "msg" and m[1][1] + len(m[1]) - 3 >= 2)
            acks = [m for m in got if m[0] == "ack"]
            assert acks[0][:2] == ["ack", 1] and acks[1][:2] == ["ack", 2] and acks[1][3] == 1
            assert delivered(got) == {"md.a": [(1, b"one"), (2, b"two")]}
            # an err with the request's id, and a publish from a WebSocket client reaches the stream
            assert await es.post(["pub", 7, "md.*", b"x"]) == (204, b"")
            assert (await es.until(lambda m: m[0] == "err"))[-1][:3] == ["err", 7, 4]
            async with Client(url(server)) as ws_client:
                await ws_client.publish_acked("md.b", b"from ws")
                await ws_client.respond("svc.echo", lambda request: b"echo " + request.data)
                assert await es.post(["req", 9, "svc.echo", b"hi", 1000]) == (204, b"")
                got = await es.until(lambda m: m[0] == "reply")
                assert delivered(got)["md.b"] == [(1, b"from ws")]
                assert got[-1] == ["reply", 9, b"echo hi"]
            assert await es.post(["hb", 3, 1000]) == (204, b"")
            await es.until(lambda m: m[0] == "ack" and m[1] == 3)
            assert (await es.messages(timeout=3))[0][0] == "beat"
            es.close()

    run(main())


def test_requests_are_checked_as_an_upgrade_is():
    """The path, the protocol header, the stream id, the content type and length, Origin,
    the token and the limit per user: each refused with its status and a clear text."""
    secret = "fallback-test-secret-of-32-bytes"
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "subscribe": [">"], "publish": [">"]}, secret, algorithm="HS256")

    async def main():
        async with serving(auth_jwt_secret=secret, allowed_origins="https://app.example", max_connections_per_user=1) as server:
            port = server.port
            stream = {"Accept": "text/event-stream"}
            status, _, body = await http(port, "GET", fallback_headers(**stream), path="/x")
            assert status == 404
            status, _, body = await http(port, "GET", {"Broker-Protocol": "broker.v2", "Broker-Stream": STREAM, **stream})
            assert (status, body) == (400, b"unsupported protocol version (Broker-Protocol: broker.v2); this server speaks broker.v1\n")
            status, _, body = await http(port, "GET", fallback_headers(Origin="https://evil.example", **stream))
            assert (status, body) == (403, b"origin https://evil.example is not allowed (allowed_origins)\n")
            status, _, body = await http(port, "GET", fallback_headers("short", **stream))
            assert status == 400 and body.startswith(b"a Broker-Stream header is required")
            status, headers, body = await http(port, "GET", fallback_headers(Origin="https://app.example", **stream))
            assert (status, headers["www-authenticate"], headers["access-control-allow-origin"]) == (
                401,
                'Bearer error="invalid_token"',
                "https://app.example",
            )
            assert body.startswith(b"a token is required")
            es = EventStream(port)
            assert await es.open(Authorization=f"Bearer {token}", Origin="https://app.example") == 200
            assert es.headers["access-control-allow-origin"] == "https://app.example"
            other = EventStream(port)
            assert await other.open(Authorization=f"Bearer {token}") == 429  # alice's one connection is the stream
            post = {"Content-Type": "application/msgpack"}
            status, _, body = await http(port, "POST", fallback_headers(new_stream_id(), **post), msgspec.msgpack.encode(["hb", 0, 0]))
            assert status == 404 and b"another node" in body  # no such stream here
            status, _, body = await http(port, "POST", fallback_headers(es.stream, **{"Content-Type": "text/plain"}), b"x")
            assert (status, body) == (415, b"a POST holds one frame as Content-Type: application/msgpack\n")
            status, _, body = await http(port, "POST", fallback_headers(es.stream, **post, **{"Content-Length": str((1 << 20) + 1)}), b"")
            assert status == 413
            status, _, body = await http(port, "POST", fallback_headers(es.stream, **post, **{"Transfer-Encoding": "chunked"}), None)
            assert status == 411
            status, headers, _ = await http(port, "OPTIONS", {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
            assert (
                status == 204
                and "Broker-Stream" in headers["access-control-allow-headers"]
                and headers["access-control-allow-origin"] == "https://app.example"
            )
            status, _, _ = await http(port, "OPTIONS", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            assert status == 403
            # the grants of the stream's token apply to what its POSTs ask
            assert await es.post(["sub", 1, "md.>"]) == (204, b"")
            await es.until(lambda m: m[0] == "ack")
            es.close()
        async with serving(http_fallback=False) as server:
            status, _, body = await http(server.port, "GET", fallback_headers(Accept="text/event-stream"))
            assert status == 404 and b"http_fallback" in body

    run(main())


def test_a_cut_stream_resumes_with_last_event_id_and_loses_nothing():
    async def main():
        async with serving() as server:
            es = EventStream(server.port)
            await es.open()
            assert await es.post(["sub", 1, "md.>"]) == (204, b"")
            await es.until(lambda m: m[0] == "ack")
            async with Client(url(server)) as publisher:
                await publisher.publish_acked("md.a", b"1")
                seen = await es.until(lambda m: m[0] == "msg")
                es.cut()
                await eventually(lambda: not server.fallback.streams[es.stream].tcp, what="the broker noticed")
                for i in range(2, 5):
                    await publisher.publish_acked("md.a", str(i).encode())  # queued for the detached stream
                assert await es.open(last_event_id=es.last_id) == 200 and es.opening == "resumed"
                seen += await es.until(lambda m: m[0] == "msg" and m[-1][1] + len(m[-1]) - 3 >= 4)
                assert delivered(seen) == {"md.a": [(1, b"1"), (2, b"2"), (3, b"3"), (4, b"4")]}
                # a Last-Event-ID that is not the last event written: a new session
                es.cut()
                await eventually(lambda: not server.fallback.streams[es.stream].tcp, what="the broker noticed")
                assert await es.open(last_event_id="00000000-1") == 200 and es.opening == "new"
                assert await es.post(["sub", 1, "md.>"]) == (204, b"")  # the old session's subscription went with it
            es.close()

    run(main())


def test_a_silent_client_is_found_by_the_ping_rule_and_a_lost_stream_is_not_held_long():
    async def main():
        async with serving(ping_interval_s=0.4, ping_timeout_s=0.4) as server:
            answering = EventStream(server.port)
            await answering.open()
            pings = 0

            async def answer():
                nonlocal pings
                while True:
                    kind, _, _ = await answering.event(3)
                    assert kind == "ping"
                    pings += 1
                    await answering.post(b"")  # the answer

            answerer = asyncio.ensure_future(answer())
            silent = EventStream(server.port)
            await silent.open()
            assert (await silent.event(3))[0] == "ping"  # not answered
            kind, data, _ = await silent.event(3)
            assert (kind, data) == ("close", "1001 peer has not replied to ping/heartbeat request within 0.4 second(s)")
            await eventually(lambda: pings >= 3 or answerer.done(), timeout=5, what="three pings answered")
            assert not answerer.done(), answerer.exception()
            answerer.cancel()
            assert answering.stream in server.fallback.streams
            answering.cut()  # not opened again: the session ends after ping_timeout_s
            await eventually(lambda: answering.stream not in server.fallback.streams, timeout=3, what="the detached session ended")
            assert not server.connections

    run(main())


def test_delete_ends_the_session():
    async def main():
        async with serving() as server:
            es = EventStream(server.port)
            await es.open()
            status, _, _ = await http(server.port, "DELETE", fallback_headers(es.stream))
            assert status == 204
            assert (await es.event())[:2] == ("close", "1000 client closed")
            assert not server.connections

    run(main())


class HashingBalancer:
    """A load balancer in front of several nodes that sends each request to the node its
    Broker-Stream header hashes to (nginx `hash $http_broker_stream`, HAProxy
    `balance hdr(Broker-Stream)`): one request per connection, then it pipes both ways."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.sent: list[int] = []

    def node_of(self, key: bytes) -> int:
        return self.ports[int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % len(self.ports)]

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _link(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()  # a connection that sent no request
            return
        key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"broker-stream:")), b"")
        port = self.node_of(key)
        self.sent.append(port)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        up_writer.write(head)

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        self.server.close()


def test_two_nodes_behind_a_balancer_keyed_by_broker_stream(redis_url, redis_prefix):
    """Each stream's GET and POSTs reach one node; what is published on the other node
    reaches it through the cluster; a POST sent to the other node is refused with 404
    naming the affinity it needs."""
    from redis_support import BrokerNode

    async def main(ports: list[int]):
        balancer = HashingBalancer(ports)
        port = await balancer.start()
        streams = []
        for i in range(4):  # two streams on each node
            stream = next(s for s in iter(new_stream_id, None) if balancer.node_of(s.encode()) == ports[i % 2])
            es = EventStream(port, stream)
            assert await es.open() == 200
            # POSTs go through the balancer too, one connection each
            status, _, _ = await http(
                port,
                "POST",
                fallback_headers(es.stream, **{"Content-Type": "application/msgpack"}),
                msgspec.msgpack.encode(["sub", 1, "md.>"]),
            )
            assert status == 204
            streams.append(es)
        assert len(set(balancer.sent)) == 2, balancer.sent
        for es in streams:
            await es.until(lambda m: m[0] == "ack")
        for node_port in ports:  # a publish on each node reaches every stream
            async with Client(f"ws://127.0.0.1:{node_port}/") as publisher:
                await publisher.publish_acked(f"md.{node_port}", b"x")
        for es in streams:
            seen: list = []
            while len(delivered(seen)) < 2:
                seen += await es.messages()
            assert sorted(delivered(seen)) == sorted(f"md.{p}" for p in ports)
        # without affinity: the other node does not know the stream
        es = streams[0]
        home = balancer.sent[0]
        other = next(p for p in ports if p != home)
        status, _, body = await http(
            other, "POST", fallback_headers(es.stream, **{"Content-Type": "application/msgpack"}), msgspec.msgpack.encode(["hb", 0, 0])
        )
        assert status == 404 and b"affinity" in body
        for es in streams:
            es.close()
        await balancer.close()

    with (
        BrokerNode("--redis-url", redis_url, "--redis-prefix", redis_prefix) as a,
        BrokerNode("--redis-url", redis_url, "--redis-prefix", redis_prefix) as b,
    ):
        run(main([a.port, b.port]))
