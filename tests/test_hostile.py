"""Hostile input, checked with real sockets against a real server while honest clients work.

- Close frames with codes RFC 6455 forbids on the wire are answered with 1002; reserved bits
  without a negotiated extension fail the connection with 1002 (protocol.md 1.2, 1.4).
- The handshake's own refusals (400) are plain text ending in a newline (1.1).
- Frames are measured before they are decoded: a frame beyond the protocol's shape gets one
  `err` (code 1, id 0) and is not decoded; its decoding counts in the loop iteration's budget,
  and a frame that cost more than an iteration's share makes its connection sit out turns
  (2.2, 7).
- Slowloris: a frame left incomplete for frame_timeout_s closes the connection with 1008 and
  frees its bytes; a handshake dribbled in is dropped at handshake_timeout_s. Honest clients
  keep publishing and receiving every message meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import pytest

from broker.client import Client
from broker.errors import CloseCode, ErrorCode
from broker.fastpath import measure_frame
from broker.messages import (
    MAX_MESSAGE_FIELDS,
    MAX_NESTING,
    MAX_SINCE_TOPICS,
    SUBPROTOCOL,
    Ack,
    Err,
    ServerReader,
    max_frame_values,
    read_client_frame,
)
from broker.router import RECOVERY_WORK, TICK_BUDGET_S, TICK_INPUT_BYTES, TICK_VALUE_BYTES, TICK_WORK_BYTES
from broker.session import Session
from conftest import (
    Attacker,
    Harness,
    RawSocketClient,
    client_frame,
    eventually,
    raw_upgrade,
    round_trips,
    run,
    send_upgrade,
    serving,
    split_frame,
    upgrade_request,
    url,
)
from redis_support import BrokerNode

pack = msgspec.msgpack.encode
FEED = "honest.feed"


class Stream:
    """An honest publisher and subscriber of FEED around the hostile input: the publisher
    publishes every couple of milliseconds in the background; `finish()` stops it and checks
    that the subscriber got every message, in order, with consecutive sequence numbers."""

    def __init__(self, server) -> None:
        self.server = server
        self.payloads: list[bytes] = []
        self.received: list = []
        self.errors: list[Exception] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Stream:
        self.sub_client = await Client.connect(url(self.server), on_error=self.errors.append)
        self.pub_client = await Client.connect(url(self.server), on_error=self.errors.append)
        self.sub = await self.sub_client.subscribe(FEED)
        loop = asyncio.get_running_loop()
        self._pump_task = loop.create_task(self._pump())
        self._read_task = loop.create_task(self._read())
        await eventually(lambda: len(self.received) >= 3, 5.0, "the first honest deliveries")
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        for task in (self._pump_task, self._read_task):
            task.cancel()
        await self.sub_client.close()
        await self.pub_client.close()

    async def _pump(self) -> None:
        while not self._stop.is_set():
            payload = b"h%d" % (len(self.payloads) + 1)
            self.payloads.append(payload)
            self.pub_client.publish(FEED, payload)
            await asyncio.sleep(0.002)

    async def _read(self) -> None:
        while True:
            self.received.append(await self.sub.next(30))

    async def flowing(self, what: str) -> None:
        """New deliveries keep arriving (now, during the hostile input)."""
        seen = len(self.received)
        await eventually(lambda: len(self.received) >= seen + 5, 5.0, f"honest deliveries {what}")

    async def finish(self) -> None:
        self._stop.set()
        await self._pump_task
        ack = await self.pub_client.publish_acked(FEED, b"last")
        self.payloads.append(b"last")
        await eventually(lambda: self.received and self.received[-1].seq >= ack.seq, 10.0, "every honest message")
        assert [m.seq for m in self.received] == list(range(1, ack.seq + 1))
        assert [m.data for m in self.received] == self.payloads
        assert self.errors == [] and not self.sub_client.closed and not self.pub_client.closed


async def read_close(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, str]:
    """Skip data frames until the server's close frame; return its code and reason, after
    checking that the server then ends the TCP connection."""
    data = b""
    while True:
        split = split_frame(data)
        if split is None:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            assert chunk, "the connection ended without a close frame"
            data += chunk
            continue
        opcode, payload, data = split
        if opcode == 0x8:
            assert await asyncio.wait_for(reader.read(), timeout) == b""
            return int.from_bytes(payload[:2], "big"), payload[2:].decode()


# 1. close codes a client may not send (RFC 6455 7.4)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_frame_with_a_code_not_allowed_on_the_wire_fails_with_1002(code):
    async def main():
        async with serving() as server:
            async with Stream(server) as stream:
                reader, writer = await raw_upgrade(server.port)
                try:
                    writer.write(client_frame(0x8, code.to_bytes(2, "big") + b"bye"))
                    assert (await read_close(reader))[0] == CloseCode.PROTOCOL_ERROR
                finally:
                    writer.close()
                await stream.finish()

    run(main())


@pytest.mark.parametrize(
    "payload, answer",
    [
        ((1000).to_bytes(2, "big"), 1000),
        ((1001).to_bytes(2, "big"), 1001),
        ((3000).to_bytes(2, "big") + b"app", 1000),
        ((4999).to_bytes(2, "big"), 1000),
        ((1000).to_bytes(2, "big") + b"\xff\xfe", 1007),  # a reason that is not UTF-8
        (b"\x03", 1002),  # one byte: no room for a code
        (b"", 1000),
    ],
    ids=["1000", "1001", "3000", "4999", "bad-utf8", "one-byte", "empty"],
)
def test_close_frame_answers(payload, answer):
    """protocol.md 1.4: 1000 and 1001 are echoed, other allowed codes answered with 1000."""

    async def main():
        async with serving() as server:
            reader, writer = await raw_upgrade(server.port)
            try:
                writer.write(client_frame(0x8, payload))
                assert (await read_close(reader))[0] == answer
            finally:
                writer.close()
            await eventually(lambda: not server.connections, 3.0, "the connection to go")

    run(main())


# 2. reserved bits: no extension is ever negotiated


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
@pytest.mark.parametrize("opcode", [0x2, 0x9, 0x8], ids=["binary", "ping", "close"])
def test_reserved_bits_fail_the_connection_with_1002(rsv, opcode):
    payload = pack(["pub", 1, "rsv.t", b"x"]) if opcode == 0x2 else (1000).to_bytes(2, "big") if opcode == 0x8 else b"p"
    frame = bytearray(client_frame(opcode, payload))
    frame[0] |= rsv

    async def main():
        async with serving() as server:
            async with Stream(server) as stream:
                reader, writer = await raw_upgrade(server.port)
                try:
                    writer.write(bytes(frame))
                    assert (await read_close(reader))[0] == CloseCode.PROTOCOL_ERROR
                finally:
                    writer.close()
                assert "rsv.t" not in server.router.topics
                await stream.finish()

    run(main())


def test_compressed_frame_after_offering_permessage_deflate_fails_with_1002():
    """A client that offers permessage-deflate is not granted it (no extension header in the
    101), so a frame it sends compressed (RSV1) breaks the framing."""
    request = upgrade_request("/", [SUBPROTOCOL]).replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n")

    async def main():
        async with serving() as server:
            status, headers, reader, writer = await send_upgrade(server.port, request)
            try:
                assert status == 101 and "sec-websocket-extensions" not in headers
                frame = bytearray(client_frame(0x2, pack(["pub", 1, "rsv.t", b"x"])))
                frame[0] |= 0x40
                writer.write(bytes(frame))
                assert (await read_close(reader))[0] == CloseCode.PROTOCOL_ERROR
            finally:
                writer.close()

    run(main())


# 3. the handshake's own 400 responses


def _without(request: bytes, name: bytes) -> bytes:
    return b"\r\n".join(line for line in request.split(b"\r\n") if not line.startswith(name))


@pytest.mark.parametrize(
    "header",
    [b"Upgrade:", b"Connection:", b"Sec-WebSocket-Key:", b"Sec-WebSocket-Version:"],
    ids=["upgrade", "connection", "key", "version"],
)
def test_refusal_for_a_missing_header_is_plain_text_with_a_newline(header):
    async def main():
        async with serving() as server:
            status, headers, reader, writer = await send_upgrade(server.port, _without(upgrade_request("/", [SUBPROTOCOL]), header))
            try:
                body = await asyncio.wait_for(reader.read(), 3)  # the server closes after it
            finally:
                writer.close()
            assert status == 400
            assert headers["content-type"] == ["text/plain; charset=utf-8"]
            assert headers["connection"] == ["close"]
            assert headers["content-length"] == [str(len(body))]
            text = body.decode("utf-8")
            assert text.endswith("\n") and text.count("\n") == 1 and len(text) > 1
            assert header[:-1].decode().lower() in text.lower()  # it names what is missing
            assert server.handshakes_refused == 1 and not server.connections

    run(main())


# 4. frames measured before they are decoded


async def send_raw(client: RawSocketClient, data: bytes) -> None:
    await client.loop.sock_sendall(client.sock, client_frame(0x2, data))


def since_map(count: int, prefix: str = "other") -> dict:
    return {f"{prefix}.{i}": [1, 1] for i in range(count)}


def _array32(count: int) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big")


MILLION = 1_000_000
FIELDS = MAX_MESSAGE_FIELDS
REFUSED = {
    # a valid fire-and-forget publish followed by a million elements
    "million-trailing": _array32(5 + MILLION) + pack(["pub", 0, "bound.t", b"x", ""])[1:] + b"\x01" * MILLION,
    # a publish whose data is a million integers
    "million-int-data": b"\x94" + pack("pub") + b"\x07" + pack("bound.t") + _array32(MILLION) + b"\x01" * MILLION,
    # an invalid sub followed by a million elements (its error would look at every one)
    "million-after-bad-sub": _array32(4 + MILLION) + pack(["sub", 7, "bound.t", 1])[1:] + b"\x01" * MILLION,
    "fields+1": pack(["pub", 7, "bound.t", b"x", ""] + [1] * (FIELDS - 4)),
    "array-in-message": pack(["sub", 7, "bound.>", [1] * (FIELDS + 1)]),
    "map-entries+1": pack(["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS + 1)]]),
    "nesting+1": pack(["sub", 7, "bound.>", [1, {"other.0": [[1], 1]}]]),
    "nesting+1-in-batch": pack([["sub", 7, "bound.>", [1, {"other.0": [[1], 1]}]]]),
    "values+1": pack([["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]] * 5),  # 200,036 values
}


def test_the_bounds_are_those_the_protocol_documents():
    assert (MAX_MESSAGE_FIELDS, MAX_NESTING, MAX_SINCE_TOPICS, max_frame_values(10_000)) == (16, 4, 10_000, 200_000)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_frame_beyond_the_bounds_gets_one_err_and_is_not_decoded(kind, fastpath_impl):
    data = REFUSED[kind]
    assert fastpath_impl.measure_frame(data, 10_000, MAX_MESSAGE_FIELDS, MAX_SINCE_TOPICS, MAX_NESTING, max_frame_values()) < 0
    messages, bad, values = read_client_frame(data)
    assert messages == [] and values == 0
    assert [(b.request_id, b.code) for b in bad] == [(0, ErrorCode.BAD_MESSAGE)]
    assert "not decoded" in bad[0].text

    async def main():
        async with serving() as server:
            async with Stream(server) as stream:
                raw = await RawSocketClient.connect(server.port)
                try:
                    started = time.monotonic()
                    for _ in range(3):
                        await send_raw(raw, data)
                    for _ in range(3):
                        reply = await raw.recv()
                        assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                    elapsed = time.monotonic() - started
                    await raw.send(["pub", 9, "bound.ok", b"ok"])
                    assert await raw.recv() == Ack(9, server.router.epoch, 1)  # still open, nothing else queued
                finally:
                    raw.close()
                assert "bound.t" not in server.router.topics
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 3}
                assert server.router.stats.closes == {}
                assert elapsed < 5.0
                await stream.finish()

    run(main())


WITHIN = {
    # (frame, the reply it gets): each reaches the session, which answers it
    "fields": (pack(["pub", 7, "bound.t", b"x", ""] + [1] * (FIELDS - 5)), "ack"),
    "array-in-message": (pack(["sub", 7, "bound.>", [1] * FIELDS]), ErrorCode.BAD_MESSAGE),  # not a since shape
    "map-entries": (pack(["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]), ErrorCode.BAD_POSITION),
    "nesting": (pack(["sub", 7, "bound.>", [1, {"other.0": [1, 1]}]]), ErrorCode.BAD_POSITION),
    "nesting-in-batch": (pack([["sub", 7, "bound.>", [1, {"other.0": [1, 1]}]]]), ErrorCode.BAD_POSITION),
    "values": (pack([["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]] * 4), ErrorCode.BAD_POSITION),
    "batch-of-10000": (pack([["pub", 7, "bound.t", b"x", ""]] * 10_000), "ack"),
}


@pytest.mark.parametrize("kind", sorted(WITHIN))
def test_frame_at_the_bounds_is_decoded_and_answered(kind):
    data, expected = WITHIN[kind]
    values = measure_frame(data, 10_000, MAX_MESSAGE_FIELDS, MAX_SINCE_TOPICS, MAX_NESTING, max_frame_values())
    assert values > 0
    assert read_client_frame(data)[2] == values
    count = 10_000 if kind == "batch-of-10000" else 4 if kind == "values" else 1

    async def main():
        async with serving() as server:
            raw = await RawSocketClient.connect(server.port)
            try:
                await send_raw(raw, data)
                replies = [await raw.recv() for _ in range(count)]
                for reply in replies:
                    if expected == "ack":
                        assert isinstance(reply, Ack) and reply.id == 7, reply
                    else:
                        assert isinstance(reply, Err) and (reply.id, reply.code) == (7, expected), reply
            finally:
                raw.close()

    run(main())


def test_smaller_max_batch_messages_lowers_the_bound_on_values():
    """With max_batch_messages 10 a frame may hold 16 x 10 + 40,000 values: one full since map,
    not two."""
    one = pack([["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]])
    two = pack([["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]] * 2)
    assert max_frame_values(10) == 40_160

    async def main():
        async with serving(max_batch_messages=10) as server:
            raw = await RawSocketClient.connect(server.port)
            try:
                await send_raw(raw, one)
                reply = await raw.recv()
                assert (reply.id, reply.code) == (7, ErrorCode.BAD_POSITION)
                await send_raw(raw, two)
                reply = await raw.recv()
                assert (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE) and "40160" in reply.text
            finally:
                raw.close()

    run(main())


@pytest.mark.parametrize("request_number", [-1, -(2**63), 2**63, 2**64 - 1])
def test_reply_with_an_id_out_of_range_is_refused_and_never_echoed(request_number):
    """A `reply` names a request number the server gave, always in the id range: one out of
    it is a bad message (code 1, id 0), not an UNKNOWN_REQUEST echoing an id no `err` may
    carry (found by the fuzz test)."""

    async def main():
        async with serving() as server:
            raw = await RawSocketClient.connect(server.port)
            try:
                await raw.send(["reply", request_number, b"r"])
                reply = await raw.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                await raw.send(["reply", 5, b"r"])  # in range: not waiting, so UNKNOWN_REQUEST
                reply = await raw.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (5, ErrorCode.UNKNOWN_REQUEST), reply
            finally:
                raw.close()

    run(main())


# 5. decoding counts in the iteration's budget


def test_decoding_counts_in_the_budget_of_the_iteration():
    """A general-path frame costs its bytes plus TICK_VALUE_BYTES per MessagePack value; a
    fast-path frame (fire-and-forget publishes to known topics) only its bytes."""
    h = Harness()
    s = Session(h.router, h.limits, owner="s")  # as the server's connection drives it
    heavy = pack([["sub", 7, "bound.>", [1, since_map(MAX_SINCE_TOPICS)]]] * 4)
    values = read_client_frame(heavy)[2]
    assert values == 4 * (MAX_SINCE_TOPICS * 4 + 7) + 1
    h.router.new_tick()
    assert not s.receive(heavy)  # the budget is spent: the rest of the frame waits
    assert h.router.input_bytes == values * TICK_VALUE_BYTES and h.router.busy
    h.router.new_tick()
    assert s.resume()
    h.router.new_tick()
    s.receive(pack(["pub", 0, "bound.t", b"x"]))  # a new topic: the general path
    assert h.router.input_bytes == 5 * TICK_VALUE_BYTES
    h.router.new_tick()
    s.receive(pack(["pub", 0, "bound.t", b"x"]))  # now known: the compiled fast path
    assert h.router.input_bytes == 0


def test_a_frame_dearer_than_an_iteration_makes_its_connection_sit_out():
    """A connection whose frame cost more than an iteration's budget (its bytes, its decoding,
    the positions it had checked) owes the difference: before its next frame is read it sits
    out TICK_BUDGET_S per budget owed, unread, while the honest clients go on."""
    names = {f"other.{i:0200d}": [1, 1] for i in range(MAX_SINCE_TOPICS)}  # long names: a 2 MiB message
    heavy = pack(["sub", 7, "bound.>", [1, names]])
    values = read_client_frame(heavy)[2]
    cost = len(heavy) + values * TICK_VALUE_BYTES + RECOVERY_WORK * TICK_WORK_BYTES  # one position checked: refused
    assert cost > 2 * TICK_INPUT_BYTES
    sits_out = (cost - TICK_INPUT_BYTES) / TICK_INPUT_BYTES * TICK_BUDGET_S

    async def main():
        async with serving(max_frame_bytes=4 << 20) as server:
            async with Stream(server) as stream:
                raw = await RawSocketClient.connect(server.port)
                try:
                    await eventually(lambda: len(server.connections) == 3, 3.0, "the raw connection")
                    conn = max(server.connections.values(), key=lambda c: c.id)
                    await send_raw(raw, heavy)
                    reply = await raw.recv()
                    assert (reply.id, reply.code) == (7, ErrorCode.BAD_POSITION)
                    assert conn.debt == cost - TICK_INPUT_BYTES
                    await stream.flowing("while the heavy connection owes its debt")
                    started = time.monotonic()
                    await raw.send(["pub", 8, "bound.ok", b"ok"])
                    assert await raw.recv() == Ack(8, server.router.epoch, 1)
                    assert time.monotonic() - started >= sits_out * 0.9 and conn.debt == 0
                finally:
                    raw.close()
                await stream.finish()

    run(main())


def test_since_positions_and_recovered_topics_count_in_the_budget():
    """Each position of a since map costs RECOVERY_WORK index steps to check, and each topic a
    recovery looks up (a named one, or one a pattern's since time or `last` walks) as many
    again: a sub with 10,000 positions costs some 15 iterations' budgets, so its connection
    yields; a refused map costs the positions checked up to the refusal."""
    h = Harness(max_topics=20_000)
    publisher = h.session("publisher")
    publisher.receive(pack([["pub", 0, f"bound.t{i}", b"x"] for i in range(1000)]))
    h.tick()
    client = h.session("client")
    for frame, steps in [
        (["sub", 1, "bound.>", [1, {f"bound.n{i}": [1, 1] for i in range(MAX_SINCE_TOPICS)}]], 2 * MAX_SINCE_TOPICS + 1000),
        (["sub", 2, "bound.t1.>", [1, {f"bound.t1.{i}": [1, 1] for i in range(5)} | {"other.x": [1, 1]}]], 6),
        (["sub", 3, "bound.*", None, True], 1000),
    ]:
        work = h.router.index.work
        client.receive(pack(frame))
        assert h.router.index.work - work >= steps * RECOVERY_WORK, frame[:3]
        h.tick()
    assert (2 * MAX_SINCE_TOPICS + 1000) * RECOVERY_WORK * TICK_WORK_BYTES > 15 * TICK_INPUT_BYTES


def test_since_positions_outside_the_grants_count_as_much_to_check():
    """A position of a topic outside the connection's grants is checked for its form (its name,
    the pattern, the position) as any other, then passed over: it counts RECOVERY_WORK steps
    like the others, so a map of 10,000 of them costs its connection as many budgets as one of
    granted topics would to check (before, such a map counted one position in all)."""
    from broker.auth import Identity
    from broker.grants import Grants

    h = Harness()
    narrow = Session(h.router, h.limits, owner="narrow", identity=Identity("bob", grants=Grants(("md.NASDAQ.*",), ())))
    positions = {f"md.NYSE.t{i}": [1, 1] for i in range(MAX_SINCE_TOPICS)}
    work = h.router.index.work
    h.router.new_tick()
    done = narrow.receive(pack(["sub", 1, "md.>", [1, positions]]))
    while not done:
        h.router.new_tick()
        done = narrow.resume()
    assert h.router.index.work - work >= MAX_SINCE_TOPICS * RECOVERY_WORK
    h.readers["narrow"] = ServerReader()
    assert [type(m) for m in h.tick()[0]["narrow"]] == [Ack]  # passed over: no gap, no replay


@pytest.mark.slow
def test_since_maps_cannot_slow_an_honest_pair():
    """One client sends, without pause, frames of four subscriptions with since maps of 10,000
    positions each (the most a map may hold), and unsubscribes them: an honest pair's round
    trips on the same broker keep a p50 of a few milliseconds (before the positions counted in
    the budget, its p50 was 100 to 200 ms)."""
    patterns = [f"a{i}.x.>" for i in range(4)]
    subs = pack([["sub", 0, p, [1, {f"{p[:-1]}t{k}": [1, 1] for k in range(MAX_SINCE_TOPICS)}]] for p in patterns])
    unsubs = pack([["unsub", 0, p] for p in patterns])
    with BrokerNode() as node, Attacker(node.port, [], [subs, unsubs]):
        latencies = run(round_trips(node.url, 2.0))
    p50 = sorted(latencies)[len(latencies) // 2]
    assert p50 < 0.02, f"honest p50 {p50 * 1000:.1f} ms"


# 6. slowloris: incomplete frames and dribbled handshakes


def test_incomplete_frames_are_closed_after_frame_timeout_and_their_memory_freed():
    """Many connections each hold a large frame they never finish, feeding it one byte at a
    time slower than the limit: each is closed with 1008 within frame_timeout_s plus a sweep,
    its buffer dropped, while an honest client keeps publishing and receiving."""
    timeout = 1.0
    count, claimed, sent = 40, 256 << 10, 32 << 10
    payload = os.urandom(claimed)

    async def slowloris(server, started: dict, results: list) -> None:
        reader, writer = await raw_upgrade(server.port)
        frame = client_frame(0x2, payload)
        writer.write(frame[: 14 + sent])  # the header (10 + 4) and the first 32 KiB
        started[id(writer)] = time.monotonic()
        position = 14 + sent

        async def dribble():
            # one byte every 0.2 s, far slower than the frame needs; it stops shortly before
            # the timeout only so that no byte reaches the server after it closed the socket
            # (the kernel would answer with a reset, which can discard the close frame unread)
            nonlocal position
            while True:
                await asyncio.sleep(0.2)
                if time.monotonic() - started[id(writer)] > timeout - 0.15:
                    break
                writer.write(frame[position : position + 1])
                position += 1

        task = asyncio.get_running_loop().create_task(dribble())
        try:
            peer = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
            await eventually(lambda: any(c.peer == peer for c in server.connections.values()), 3.0, "the connection")
            conn = next(c for c in server.connections.values() if c.peer == peer)
            await eventually(lambda: len(conn.unhandled or b"") >= sent, 3.0, "its partial frame")  # held by the server
            code, reason = await read_close(reader, 10.0)
            results.append((code, reason, time.monotonic() - started[id(writer)]))
            await eventually(lambda: conn.id not in server.connections, 3.0, "the connection to go")
            assert conn.unhandled is None  # its bytes are freed
        finally:
            task.cancel()
            writer.close()

    async def main():
        async with serving(frame_timeout_s=timeout, ping_interval_s=1.0, ping_timeout_s=0.5) as server:
            async with Stream(server) as stream:
                started: dict = {}
                results: list = []
                tasks = [asyncio.get_running_loop().create_task(slowloris(server, started, results)) for _ in range(count)]
                await eventually(lambda: len(server.connections) >= count // 2 + 2, 5.0, "the slow connections")
                await stream.flowing("while the partial frames are held")
                await asyncio.gather(*tasks)
                assert len(results) == count
                for code, reason, elapsed in results:
                    assert code == CloseCode.POLICY_VIOLATION
                    assert reason == "frame not completed within 1 s"
                    assert timeout <= elapsed < timeout + 2.0, elapsed
                await eventually(lambda: len(server.connections) == 2, 3.0, "the slow connections to go")
                assert server.router.stats.closes == {CloseCode.POLICY_VIOLATION: count}
                await stream.finish()

    run(main(), timeout=60)


@pytest.mark.slow
def test_frames_finished_within_the_timeout_are_not_closed():
    """The limit is per frame: a client that finishes every frame within frame_timeout_s stays
    connected however long it takes over all, and so does one whose frames wait in the
    server's queue (its turn, not its fault)."""
    timeout = 0.8

    async def main():
        async with serving(frame_timeout_s=timeout, ping_interval_s=1.0, ping_timeout_s=0.5) as server:
            reader, writer = await raw_upgrade(server.port)
            try:
                for request_id in (1, 2, 3):
                    frame = client_frame(0x2, pack(["pub", request_id, "slow.t", bytes(1000)]))
                    for start in range(0, len(frame), len(frame) // 3 + 1):
                        writer.write(frame[start : start + len(frame) // 3 + 1])
                        await asyncio.sleep(0.2)  # each frame takes about 0.6 s, 1.8 s in all
                await eventually(
                    lambda: "slow.t" in server.router.topics and server.router.topics["slow.t"].seq == 3, 3.0, "the slow frames"
                )
                # 6 MB of frames at once: they wait in the server's queue (a megabyte a loop
                # iteration), the rest unread, longer than the timeout in all
                writer.write(b"".join(client_frame(0x2, pack([["pub", 0, "slow.t", bytes(100_000)]] * 5)) for _ in range(12)))
                await eventually(lambda: server.router.topics["slow.t"].seq == 63, 10.0, "every publish")
                await asyncio.sleep(timeout + 0.5)
                assert len(server.connections) == 1 and server.router.stats.closes == {}
            finally:
                writer.close()

    run(main())


def test_dribbled_handshakes_are_dropped_at_the_handshake_timeout():
    """Connections that send their upgrade request a byte at a time are dropped, without a
    response, handshake_timeout_s after they connected; an honest client connects and works
    meanwhile."""
    timeout = 1.0
    count = 40
    request = upgrade_request("/", [SUBPROTOCOL])

    async def dribbler(port: int, results: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()

        async def dribble():
            for i in range(len(request)):
                writer.write(request[i : i + 1])
                await asyncio.sleep(0.1)

        task = asyncio.get_running_loop().create_task(dribble())
        try:
            try:
                data = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:  # dropped while a byte was on its way: a reset
                data = b""
            results.append((data, time.monotonic() - started))
        finally:
            task.cancel()
            writer.close()

    async def main():
        async with serving(handshake_timeout_s=timeout) as server:
            async with Stream(server) as stream:
                results: list = []
                tasks = [asyncio.get_running_loop().create_task(dribbler(server.port, results)) for _ in range(count)]
                await asyncio.sleep(0.3)
                began = time.monotonic()
                async with Client(url(server)) as late:  # a new honest client, during the dribble
                    connect_time = time.monotonic() - began
                    sub = await late.subscribe("late.t")
                    ack = await late.publish_acked("late.t", b"hello")
                    assert (await sub.next(3)).seq == ack.seq
                await stream.flowing("during the dribbled handshakes")
                await asyncio.gather(*tasks)
                assert connect_time < timeout
                assert len(results) == count
                for data, elapsed in results:
                    assert data == b""  # dropped without a response
                    assert timeout - 0.05 <= elapsed < timeout + 1.5, elapsed
                assert len(server.connections) == 2  # the stream's two clients
                await stream.finish()

    run(main(), timeout=60)


def test_a_connection_has_no_instance_dict():
    """An idle connection costs its slots only: no class of Connection's family (its parts, the
    fields they share, asyncio.Protocol) gives it a __dict__."""
    from broker.server.connection import Connection

    assert Connection.__dictoffset__ == 0
    assert all("__slots__" in vars(cls) for cls in Connection.__mro__[:-1])
