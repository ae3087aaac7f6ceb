"""Fuzzing: random and mutated client frames, from valid encodings of every client message.

- The decoder layer (`decode_client_frame`, `measure_frame`, `read_frame`, `frame_needs` and
  `fast_publish` of both fast-path twins) never raises, and the twins agree on every input.
- A live server, over raw sockets, answers every mutated frame with what the protocol allows
  (a reply of a documented kind, an `err` with a documented code) or closes the connection
  with a documented close code, and never fails internally; meanwhile an honest subscriber
  receives a steady stream with every sequence number.

About 10,500 cases in all, under half a minute on this project's two-core machine.
"""

from __future__ import annotations

import asyncio
import copy
import random
import socket
import threading
import time

import msgspec
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker._fastpath_py as pure
from broker import _fastpath as compiled
from broker.client import Client
from broker.errors import CloseCode, ErrorCode
from broker.messages import (
    MAX_MESSAGE_FIELDS,
    MAX_NESTING,
    MAX_SINCE_TOPICS,
    SUBPROTOCOL,
    Ack,
    BadMessage,
    Err,
    GapNotice,
    Msg,
    Pub,
    Reply,
    Req,
    Request,
    Sub,
    Topic,
    Unsub,
    decode_client_frame,
    decode_server_frame,
    max_frame_values,
    read_client_frame,
)
from conftest import MAX_FRAME, client_frame, serving, split_frame, upgrade_request, url

pack = msgspec.msgpack.encode
MAX_ID = 2**63 - 1
KNOWN = ["fz.a", "fz.b", "md.NASDAQ.AAPL"]  # topics the fast path knows
EPOCH = 1853070350745970085

# Valid encodings of every client message type, the starting points of the mutations.
TEMPLATES = [
    ["sub", 1, "fz.a"],
    ["sub", 2, "fz.>"],
    ["sub", 3, "fz.a", [EPOCH, 0]],
    ["sub", 4, "fz.*", [1767225600000, {"fz.a": [EPOCH, 3], "fz.b": [0, 0]}], False],
    ["sub", 5, "fz.b", None, True],
    ["sub", 6, "svc.q", None, False, True],
    ["sub", 7, "fz.>", None, False, False, "conflate"],
    ["unsub", 8, "fz.a"],
    ["pub", 0, "fz.a", b"x"],
    ["pub", 0, "md.NASDAQ.AAPL", b"189.25", ""],
    ["pub", 9, "fz.b", bytes(300)],
    ["pub", 10, "fz.new", b"y", "pub-1"],
    ["req", 11, "svc.q", b"q", 500],
    ["req", 12, "svc.q", b"q"],
    ["reply", 13, b"r"],
    [["pub", 0, "fz.a", b"1"], ["pub", 0, "fz.b", b"2"]],
    [["pub", 14, "fz.a", b"1"], ["sub", 15, "fz.b"], ["unsub", 16, "fz.b"]],
]

TEXT = "abcfz.>*-_ AZ09\x00\x7féü€😀"
SPECIAL_STRINGS = ["sub", "unsub", "pub", "req", "reply", "fz.a", "fz.>", "*", ">", "", "conflate", "drop", "md..x", "a" * 300]
SPECIAL_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, MAX_ID, MAX_ID + 1, 2**64 - 1, -1, -33, -(2**63)]


def random_value(rng, depth: int = 0):
    """A random MessagePack-able value: scalars of every type, sometimes lists and maps."""
    r = rng.random()
    if depth < 3 and r < 0.12:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if depth < 3 and r < 0.18:
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    kind = rng.randrange(9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(SPECIAL_INTS)
    if kind == 3:
        return rng.randrange(-(2**63), 2**64)
    if kind == 4:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), rng.random()])
    if kind == 5:
        return rng.choice(SPECIAL_STRINGS)
    if kind == 6:
        return random_text(rng)
    return rng.randbytes(rng.randrange(40))


def random_text(rng) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randrange(12)))


def _lists(value, found: list) -> list:
    """Every list inside `value` (itself included), in a fixed order (the big tuples the
    mutations make are not looked into)."""
    if isinstance(value, list):
        found.append(value)
        for item in value:
            if isinstance(item, (list, dict)):
                _lists(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, (list, dict)):
                _lists(item, found)
    return found


def _nest(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


VALUE_OPS = ["replace", "replace", "replace", "append", "append", "drop", "wrap", "big-array", "big-map", "type", "deep", "batch"]
BYTE_OPS = ["flip", "flip", "set", "set", "insert", "delete", "truncate", "junk", "length", "deep-prefix", "twice"]
HEADS = [0x90, 0x9F, 0xDC, 0xDD, 0x80, 0xDE, 0xDF, 0xA0, 0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6, 0xC1, 0xC7, 0xD4, 0xCF, 0xD3, 0xC0]
LONG = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdc\xff\xff",
    b"\xdf\x00\x01\x00\x00",
    b"\xc6\xff\xff\xff\xff",
    b"\xdb\x7f\xff\xff\xff",
    b"\xdd\x00\x0f\x42\x40",
]


def mutated(seed: int, big: bool = True) -> bytes:
    """A client frame's payload: a template, mutated as values (elements replaced, appended,
    dropped, wrapped, made huge or deep, the type changed, batched), encoded, then mutated as
    bytes (flipped, set to a MessagePack head, inserted, deleted, cut, junk appended, a length
    made huge, nested in arrays, repeated). Every choice comes from `seed`, so a failing case
    is replayed from the seed Hypothesis reports."""
    rng = random.Random(seed)
    value = copy.deepcopy(rng.choice(TEMPLATES))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        op = rng.choice(VALUE_OPS)
        lists = _lists(value, [])
        target = rng.choice(lists)
        i = rng.randrange(len(target)) if target else 0
        if op == "batch":
            value = [value, copy.deepcopy(rng.choice(TEMPLATES))]
        elif op == "append" or not target:
            target.append(random_value(rng))
        elif op == "replace":
            target[i] = random_value(rng)
        elif op == "drop":
            del target[i]
        elif op == "wrap":
            target[i] = [target[i]]
        elif op == "big-array":
            target[i] = (1,) * rng.choice([15, 16, 17, 300] + ([5000, 70000] if big else []))
        elif op == "big-map":
            size = rng.choice([1, 2, 20, 20] + ([MAX_SINCE_TOPICS, MAX_SINCE_TOPICS + 1] if big else []))
            target[i] = {f"fz.{j}": (EPOCH, j) for j in range(size)}
        elif op == "type":
            target[0] = rng.choice(["sub", "unsub", "pub", "req", "reply", "pubx", "ack", "msg", 5, None, b"pub", ["pub"]])
        else:  # deep
            target[i] = _nest(rng.choice([2, 3, 4, 6, 40]))
    data = bytearray(pack(value))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        op = rng.choice(BYTE_OPS)
        i = rng.randrange(len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= rng.randrange(1, 256)
        elif op == "set" and i < len(data):
            data[i] = rng.choice(HEADS)
        elif op == "insert":
            data[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == "delete":
            del data[i : i + rng.randrange(1, 9)]
        elif op == "truncate":
            del data[i:]
        elif op == "junk":
            data += rng.randbytes(rng.randrange(1, 9))
        elif op == "length":
            data[i : i + 1] = rng.choice(LONG)
        elif op == "deep-prefix":
            data[0:0] = b"\x91" * rng.choice([1, 2, 5, 1000] + ([100_000] if big else []))
        elif op == "twice":
            data += bytes(data)
    return bytes(data)


seeds = st.integers(0, 2**64 - 1)
random_payloads = st.one_of(st.builds(mutated, seeds), st.builds(mutated, seeds, st.just(False)), st.binary(max_size=64))


# 1. the decoder layer


def _states(impl):
    states = [impl.TopicState(i, name, EPOCH) for i, name in enumerate(KNOWN)]
    return states, {s.key: s for s in states}


CLIENT_MESSAGES = (Sub, Unsub, Pub, Req, Reply)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    random_payloads,
    st.sampled_from([1, 2, 10_000]),
    st.sampled_from([0, 16, 512 << 10]),
)
@pytest.mark.slow
def test_decoders_never_raise_and_the_twins_agree(data, max_batch, max_payload):
    # the shape walk: the same answer from both twins, with the server's bounds and tighter ones
    for bounds in [
        (max_batch, MAX_MESSAGE_FIELDS, MAX_SINCE_TOPICS, MAX_NESTING, max_frame_values(max_batch)),
        (2, 3, 1, 1, 20),
        (10_000, 1, 2, 2, 5),
    ]:
        assert compiled.measure_frame(data, *bounds) == pure.measure_frame(data, *bounds)
        assert compiled.measure_frame(bytearray(data), *bounds) == compiled.measure_frame(data, *bounds)

    # the general decoder: lists of messages and errors, never an exception
    messages, bad, counted = read_client_frame(data, max_batch)
    again, bad_again = decode_client_frame(data, max_batch)
    assert pack(again) == pack(messages)  # (compared encoded: a `since` may hold a NaN)
    assert [(b.request_id, b.code, b.text) for b in bad_again] == [(b.request_id, b.code, b.text) for b in bad]
    assert counted >= 0 and (messages or bad)
    assert all(type(m) in CLIENT_MESSAGES for m in messages)
    for problem in bad:
        assert isinstance(problem, BadMessage) and 0 <= problem.request_id <= MAX_ID
        assert problem.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE) and problem.text
    assert len(bad) <= 101 and len(messages) <= max_batch

    # the fast path: both twins publish the same or both leave the frame to the general path
    results = []
    for impl in (compiled, pure):
        states, by_key = _states(impl)
        dirty: list = []
        count = impl.fast_publish(data, by_key, max_payload, max_batch, dirty)
        results.append((count, [(s.seq, list(s.pending), s.dirty) for s in states], [s.name for s in dirty]))
    assert results[0] == results[1]
    count = results[0][0]
    if count >= 0:  # a frame the fast path takes means the same to the general decoder
        assert bad == [] and len(messages) == count
        assert all(type(m) is Pub and m.id == 0 and m.topic in KNOWN and m.msg_id == "" for m in messages)


@st.composite
def websocket_streams(draw) -> tuple[bytes, int]:
    """Bytes that start (at some offset) with a client frame, valid or broken in any header field."""
    payload = draw(st.one_of(st.binary(max_size=300), st.builds(mutated, seeds, st.just(False))))
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x2, 0x3, 0x7, 0x8, 0x9, 0xA, 0xB, 0xF]))
    first = (0x80 if draw(st.booleans()) else 0) | draw(st.sampled_from([0, 0, 0x10, 0x20, 0x40])) | opcode
    masked = draw(st.sampled_from([True, True, True, False]))
    size = len(payload) if draw(st.booleans()) else draw(st.sampled_from([0, 125, 126, 65535, 65536, 2**63, 2**64 - 1]))
    encoding = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
    mask_bit = 0x80 if masked else 0
    if encoding == "minimal" and size < 126:
        head = bytes((first, mask_bit | size))
    elif encoding != "64" and size < 65536:
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    key = draw(st.binary(min_size=4, max_size=4)) if masked else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
    prefix = draw(st.binary(max_size=3))
    data = prefix + head + key + body
    cut = draw(st.integers(0, len(data)))
    return (data if draw(st.booleans()) else data[:cut]), len(prefix)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(websocket_streams(), st.sampled_from([0, 125, 300, 1 << 20]))
@pytest.mark.slow
def test_read_frame_twins_agree_on_any_bytes(stream, max_size):
    data, pos = stream
    for source in (data, bytearray(data)):
        got = compiled.read_frame(source, pos, max_size)
        assert got == pure.read_frame(source, pos, max_size)
        assert compiled.frame_needs(source, pos) == pure.frame_needs(source, pos)
    if type(got) is tuple:
        opcode, fin, payload, end = got
        assert opcode in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA) and fin in (0, 1) and pos < end <= len(data)
        assert end == pos + compiled.frame_needs(data, pos) and type(payload) is bytes
    else:
        assert got in (None, compiled.ERR_PROTOCOL, compiled.ERR_TOO_BIG)


# 2. a live server


FEED = "fuzz.honest.feed"
PROBE = "fuzz.probe"
SERVER_MESSAGES = (Ack, Err, Topic, GapNotice, Request, Reply, Msg)
# close codes a fuzzing connection may get: broken framing, text or fragments, a frame too big;
# and the answers to its own close frames (1000, 1001 echoed; a bad reason 1007)
ALLOWED_CLOSES = {1000, 1001, int(CloseCode.PROTOCOL_ERROR), int(CloseCode.UNSUPPORTED_DATA), 1007, int(CloseCode.MESSAGE_TOO_BIG)}


class LiveServer:
    """A broker on its own uvloop loop in a thread, with an honest publisher publishing to
    FEED every two milliseconds and an honest subscriber reading it, until `stop()`."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.loop_errors: list = []
        self.received: list = []
        self.published = 0
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        assert self.ready.wait(10), "the server did not start"
        return self

    def stop(self) -> dict:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.result

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serving(max_pending_bytes=64 << 20, max_total_pending_bytes=1 << 30) as server:
            self.server = server
            self.port = server.port
            errors: list = []
            sub_client = await Client.connect(url(server), on_error=errors.append)
            pub_client = await Client.connect(url(server), on_error=errors.append)
            sub = await sub_client.subscribe(FEED)

            async def read():
                while True:
                    self.received.append(await sub.next(60))

            reader = asyncio.get_running_loop().create_task(read())
            self.ready.set()
            while not self._stop.is_set():
                self.published += 1
                pub_client.publish(FEED, b"%d" % self.published)
                await asyncio.sleep(0.002)
            ack = await pub_client.publish_acked(FEED, b"last")
            deadline = time.monotonic() + 20
            while (not self.received or self.received[-1].seq < ack.seq) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            reader.cancel()
            self.result = {
                "last": ack.seq,
                "seqs": [m.seq for m in self.received],
                "data": [m.data for m in self.received],
                "client_errors": errors,
                "closed": sub_client.closed or pub_client.closed,
                "closes": dict(server.router.stats.closes),
            }
            await sub_client.close()
            await pub_client.close()


def _read_some(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except ConnectionResetError:
        return b""


def exchange(port: int, frames: list[bytes], probe_id: int) -> str:
    """Send `frames` and a probe publish (with an ack) on a new connection, then read until
    the probe's ack or a close frame; check everything the server sent on the way. Returns
    "ack", "close" or "reset" (the connection ended without a close frame being read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(upgrade_request("/", [SUBPROTOCOL]))
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(4096)
            assert chunk, "no handshake response"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        probe = client_frame(0x2, pack(["pub", probe_id, PROBE, b""]))
        try:
            sock.sendall(b"".join(frames) + probe)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it read everything: what it sent is still checked below
        while True:
            split = split_frame(buffer)
            if split is None:
                chunk = _read_some(sock)
                if not chunk:
                    return "reset"
                buffer += chunk
                continue
            opcode, payload, buffer = split
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
                assert code in ALLOWED_CLOSES, f"closed with {code}: {payload[2:]!r}"
                return "close"
            if opcode in (0x9, 0xA):
                continue  # a ping, or the pong of a fuzzed ping
            assert opcode == 0x2, f"opcode {opcode:#x}"
            for message in decode_server_frame(payload):  # raises if the server sent nonsense
                assert type(message) in SERVER_MESSAGES, message
                if type(message) is Err:
                    assert message.code in ErrorCode._value2member_map_, message
                    assert 0 <= message.id <= MAX_ID and message.text
                if type(message) is Ack and message.id == probe_id:
                    return "ack"
    finally:
        sock.close()


def broken_frame(seed: int) -> bytes:
    """A client frame broken (or not) at the WebSocket level: any opcode, reserved bits, no
    FIN, no mask, a non-minimal length, an over-long control frame, a header over
    max_frame_bytes, a close frame. Lengths otherwise match the bytes sent."""
    rng = random.Random(seed)
    kind = rng.choice(["opcode", "rsv", "no-fin", "unmasked", "long-length", "control", "too-big", "close"])
    payload = mutated(rng.randrange(2**64), big=False)
    if kind == "opcode":
        return client_frame(rng.choice([0x0, 0x1, 0x3, 0x7, 0x9, 0xA, 0xB, 0xF]), payload[:125])
    if kind == "rsv":
        frame = bytearray(client_frame(0x2, payload))
        frame[0] |= rng.choice([0x10, 0x20, 0x40])
        return bytes(frame)
    if kind == "no-fin":
        return client_frame(0x2, payload, fin=False)
    if kind == "unmasked":
        return client_frame(0x2, payload, masked=False)
    if kind == "long-length":  # the 64-bit length for a short payload
        return bytes((0x82, 0xFF)) + len(payload).to_bytes(8, "big") + b"\x00\x00\x00\x00" + payload
    if kind == "control":
        return client_frame(rng.choice([0x8, 0x9, 0xA]), bytes(rng.choice([126, 200])))
    if kind == "too-big":
        return client_frame(0x2, b"", length=(1 << 20) + 1)[:10]  # the header says more than max_frame_bytes
    return client_frame(0x8, rng.randbytes(rng.randrange(21)))


# per connection: 1 to 5 mutated frames, and one time in four a frame broken at the WebSocket level
live_cases = st.tuples(
    st.lists(seeds, min_size=1, max_size=5),
    st.one_of(st.none(), st.none(), st.none(), seeds),
)


@pytest.mark.slow
def test_live_server_answers_mutated_frames_as_documented_while_a_stream_flows():
    live = LiveServer().start()
    outcomes: dict[str, int] = {}
    probes = iter(range(1 << 40, 1 << 41))

    @settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(live_cases)
    def one_connection(case):
        payload_seeds, broken = case
        payloads = [mutated(seed) for seed in payload_seeds]
        frames = [client_frame(0x2, payload) for payload in payloads]
        if broken is not None:
            frames.insert(len(frames) // 2, broken_frame(broken))
        outcome = exchange(live.port, frames, next(probes))
        if broken is None and all(len(p) <= MAX_FRAME for p in payloads):
            assert outcome == "ack", "only a broken WebSocket frame may end the connection"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    try:
        one_connection()
    finally:
        result = live.stop()
    assert live.loop_errors == []
    assert outcomes.get("ack", 0) > 1000 and outcomes.get("close", 0) > 50, outcomes
    # nothing made the broker fail: no internal error, and only documented close codes
    assert set(result["closes"]) <= ALLOWED_CLOSES - {1000, 1001, 1007}, result["closes"]
    # the honest subscriber got every message of the stream, in order
    assert result["client_errors"] == [] and not result["closed"]
    assert result["seqs"] == list(range(1, result["last"] + 1))
    assert result["data"] == [b"%d" % i for i in range(1, result["last"])] + [b"last"]
    assert result["last"] > 500
