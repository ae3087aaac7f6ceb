"""Bad input from one client never hurts anyone else.

Every test runs a real server with three kinds of peers:

- a well-behaved subscriber (broker.client.Client) on FEED,
- a well-behaved publisher (another Client) that publishes to FEED before the bad input, keeps
  publishing in the background while it happens, and publishes again afterwards,
- an offending connection (a raw `websockets` client) that sends the bad input.

The offending connection must get an `err` with the right id and ErrorCode (or be closed with
the documented close code), the broker must count it in its stats, and the subscriber must
receive every message of the publisher with exact, gap-free sequence numbers.

The last sections (error amplification, batch limits, deeply nested MessagePack) check the
offending connection alone: the number of errs its input earns and that it keeps working.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import websockets

from broker.client import Client
from broker.errors import CloseCode, ErrorCode
from broker.messages import Ack, Delivery, Err, Pub, encode
from conftest import (
    MAX_FRAME,
    Harness,
    client_frame,
    decode_frames,
    eventually,
    raw_upgrade,
    recv_message,
    replies,
    run,
    serving,
    url,
    ws_raw,
)

pack = msgspec.msgpack.encode

FEED = "feed.quotes"


class Traffic:
    """A well-behaved publisher and subscriber on FEED, running around the bad input."""

    def __init__(self, server, before: int = 5, after: int = 5) -> None:
        self.server = server
        self.n_before = before
        self.n_after = after
        self.payloads: list[bytes] = []
        self.client_errors: list[Exception] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.during = 0

    async def __aenter__(self) -> Traffic:
        self.sub_client = await Client.connect(url(self.server), on_error=self.client_errors.append)
        self.pub_client = await Client.connect(url(self.server), on_error=self.client_errors.append)
        self.sub = await self.sub_client.subscribe(FEED)
        assert (self.sub.epoch, self.sub.seq) == (0, 0)
        # before: publish and see every message arrive
        for _ in range(self.n_before - 1):
            self._publish()
        ack = await self._publish_acked()
        assert ack.seq == self.n_before
        self.received = [await self.sub.next(3) for _ in range(self.n_before)]
        self._task = asyncio.get_running_loop().create_task(self._pump())
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if exc_type is None:
            return
        await self.sub_client.close()
        await self.pub_client.close()

    def _next_payload(self) -> bytes:
        payload = b"m%d" % (len(self.payloads) + 1)
        self.payloads.append(payload)
        return payload

    def _publish(self) -> None:
        self.pub_client.publish(FEED, self._next_payload())

    async def _publish_acked(self):
        expected = len(self.payloads) + 1
        ack = await self.pub_client.publish_acked(FEED, self._next_payload())
        assert ack.seq == expected and ack.epoch == self.server.router.epoch
        return ack

    async def _pump(self) -> None:
        # during: one publish every millisecond or so, two per tick now and then
        while not self._stop.is_set():
            self._publish()
            if self.during % 3 == 0:
                self._publish()
            self.during += 1
            await asyncio.sleep(0.001)

    async def finish(self) -> None:
        """Stop the background publisher, publish once more and check every delivery."""
        # make sure some traffic really ran while the bad input was handled
        await eventually(lambda: self.during >= 3, 3.0, "background publishes")
        self._stop.set()
        await self._task
        for _ in range(self.n_after - 1):
            self._publish()
        await self._publish_acked()
        total = len(self.payloads)
        while len(self.received) < total:
            self.received.append(await self.sub.next(3))
        assert [m.seq for m in self.received] == list(range(1, total + 1))
        assert [m.data for m in self.received] == self.payloads
        assert {(m.topic, m.epoch) for m in self.received} == {(FEED, self.server.router.epoch)}
        with pytest.raises(asyncio.TimeoutError):
            await self.sub.next(0.05)  # nothing extra, nothing twice
        assert self.client_errors == []
        assert not self.sub_client.closed and not self.pub_client.closed
        assert self.server.router.topics[FEED].seq == total
        await self.sub_client.close()
        await self.pub_client.close()


async def reply(ws, timeout: float = 3.0):
    """The next non-delivery message on a raw connection."""
    while True:
        message = await recv_message(ws, timeout)
        if not isinstance(message, Delivery):
            return message


async def expect_err(ws, request_id: int, code: int) -> Err:
    message = await reply(ws)
    assert isinstance(message, Err), message
    assert (message.id, message.code) == (request_id, int(code)), message
    assert message.text
    return message


async def expect_ack(ws, request_id: int) -> Ack:
    message = await reply(ws)
    assert isinstance(message, Ack), message
    assert message.id == request_id
    return message


async def expect_close(ws, code: int, timeout: float = 3.0) -> None:
    """Read until the broker closes the connection; it must close with `code`."""

    async def drain():
        while True:
            message = await recv_message(ws, timeout)
            assert isinstance(message, Delivery), f"unexpected reply before close: {message}"

    with pytest.raises(websockets.ConnectionClosed) as info:
        await asyncio.wait_for(drain(), timeout)
    assert info.value.rcvd is not None, "the broker sent no close frame"
    assert info.value.rcvd.code == code
    assert info.value.rcvd.reason
    assert ws.close_code == code


async def still_works(ws, request_id: int, topic: str = "probe.ok", seq: int = 1) -> None:
    """The offending connection can still publish after its bad input."""
    await ws.send(pack(["pub", request_id, topic, b"ok"]))
    ack = await expect_ack(ws, request_id)
    assert ack.seq == seq


def errors(server) -> dict[int, int]:
    return dict(server.router.stats.errors)


async def probe(ws, request_id: int, topic: str = "probe.ok") -> Ack:
    """Publish with an ack: the next reply must be that ack (nothing else was queued before it)."""
    await ws.send(pack(["pub", request_id, topic, b"ok"]))
    message = await recv_message(ws)
    assert isinstance(message, Ack) and message.id == request_id, f"expected the probe's ack, got {message}"
    return message


# 1. malformed MessagePack


def test_malformed_msgpack_gets_bad_message_and_connection_survives():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                frames = [
                    b"\xc1",  # a byte MessagePack never uses
                    pack(["pub", 1, FEED, b"abcdef"])[:-3],  # truncated single message
                    pack([["pub", 2, FEED, b"abcdef"], ["sub", 3, FEED]])[:-2],  # truncated batch
                    pack(["sub", 4, "x"]) + b"\xc1",  # trailing garbage
                    b"",  # empty frame
                    b"\xdd\xff\xff\xff\xff",  # array32 header claiming 4 G elements
                ]
                for frame in frames:
                    await ws.send(frame)
                    await expect_err(ws, 0, ErrorCode.BAD_MESSAGE)
                await still_works(ws, 9)
                assert errors(server) == {ErrorCode.BAD_MESSAGE: len(frames)}
                assert server.router.stats.closes == {}
                await ws.close()
                await traffic.finish()
                # none of the truncated publishes reached the feed
                assert server.router.topics[FEED].seq == len(traffic.payloads)

    run(main())


# 2. unknown message type


def test_unknown_type_gets_unknown_type_with_id():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["nope", 7]))
                await expect_err(ws, 7, ErrorCode.UNKNOWN_TYPE)
                await ws.send(pack(["PUB", 8, FEED, b"x"]))  # type names are case-sensitive
                await expect_err(ws, 8, ErrorCode.UNKNOWN_TYPE)
                await ws.send(pack(["ack", 9, 0, 0]))  # a server message type
                await expect_err(ws, 9, ErrorCode.UNKNOWN_TYPE)
                await ws.send(pack([5, ["pub", 1, FEED, b"x"]]))  # first element not an array: not a batch
                await expect_err(ws, 0, ErrorCode.UNKNOWN_TYPE)
                await ws.send(pack([[["pub", 1, FEED, b"x"]]]))  # a batch inside a batch
                await expect_err(ws, 0, ErrorCode.UNKNOWN_TYPE)
                await still_works(ws, 10)
                assert errors(server) == {ErrorCode.UNKNOWN_TYPE: 5}
                await ws.close()
                await traffic.finish()

    run(main())


# 3. wrong field types, missing fields, bad ids


def test_wrong_fields_get_bad_message_with_readable_id():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                cases = [
                    (["pub", 3, "t"], 3),  # missing payload
                    (["pub", 4, "t", "str-not-bytes"], 4),  # payload is a str
                    (["sub", 5], 5),  # missing topic
                    (["sub", 6, 42], 6),  # topic is an int
                    (["unsub", 7, None], 7),
                    (["pub", 8, ["t"], b"x"], 8),
                    (["pub", -1, "t", b"x"], 0),  # negative id: unreadable
                    (["pub", 2**64 - 1, "t", b"x"], 0),  # id out of range
                    (["pub", "11", "t", b"x"], 0),  # id is a str
                    (["pub", 1.5, "t", b"x"], 0),  # id is a float
                    (["pub"], 0),
                    ({"type": "pub", "id": 12}, 0),  # a map, not an array
                    ([], 0),
                    (42, 0),
                ]
                for message, request_id in cases:
                    await ws.send(pack(message))
                    await expect_err(ws, request_id, ErrorCode.BAD_MESSAGE)
                # trailing fields a newer client might add are ignored, not refused
                await ws.send(pack(["pub", 14, "probe.ok", b"x", "future-field"]))
                assert (await expect_ack(ws, 14)).seq == 1
                await still_works(ws, 15, seq=2)
                assert errors(server) == {ErrorCode.BAD_MESSAGE: len(cases)}
                assert "t" not in server.router.topics
                await ws.close()
                await traffic.finish()

    run(main())


def test_invalid_utf8_topic_gets_bad_message_with_its_id():
    """protocol.md 2.3: an undecodable message whose second element is an id gets that id."""

    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                # ["pub", 13, <str with bytes ff fe>, b"x"]: well-formed MessagePack, bad UTF-8
                bad_pub = b"\x94\xa3pub\x0d\xa2\xff\xfe\xc4\x01x"
                await ws.send(bad_pub)
                await expect_err(ws, 13, ErrorCode.BAD_MESSAGE)
                # the same inside a batch, next to a good message
                await ws.send(b"\x92" + bad_pub + pack(["pub", 14, "probe.ok", b"x"]))
                replies = {m.id: m for m in [await reply(ws), await reply(ws)]}
                assert replies[14] == Ack(14, server.router.epoch, 1)
                assert isinstance(replies.get(13), Err) and replies[13].code == ErrorCode.BAD_MESSAGE, replies
                assert errors(server) == {ErrorCode.BAD_MESSAGE: 2}
                await ws.close()
                await traffic.finish()

    run(main())


# 4. text frame


def test_text_frame_closes_with_1003():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, FEED]))  # the offender is a subscriber too
                await expect_ack(ws, 1)
                await ws.send('["pub", 2, "feed.quotes", "x"]')
                await expect_close(ws, CloseCode.UNSUPPORTED_DATA)
                await eventually(lambda: len(server.connections) == 2, 3.0, "the offender to go away")
                assert server.router.stats.closes == {CloseCode.UNSUPPORTED_DATA: 1}
                assert errors(server) == {}
                await traffic.finish()

    run(main())


# 5. fragmented message


def test_fragmented_message_closes_with_1003():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, FEED]))
                await expect_ack(ws, 1)
                frame = pack(["pub", 2, "probe.frag", b"x" * 64])
                chunks = [frame[:10], frame[10:40], frame[40:]]
                try:
                    await ws.send(iter(chunks))  # one message in three fragments
                except websockets.ConnectionClosed:
                    pass  # the broker may close before the last fragment leaves
                await expect_close(ws, CloseCode.UNSUPPORTED_DATA)
                await eventually(lambda: len(server.connections) == 2, 3.0, "the offender to go away")
                assert server.router.stats.closes == {CloseCode.UNSUPPORTED_DATA: 1}
                assert "probe.frag" not in server.router.topics  # nothing of it was applied
                assert errors(server) == {}
                await traffic.finish()

    run(main())


# 6. oversized frame


OVERSIZED = {
    # one publish whose frame passes max_frame_bytes
    "one-payload": ["pub", 3, "probe.big", b"x" * 5000],
    # a batch of publishes, each payload within max_payload_bytes, the frame over max_frame_bytes
    "batch": [["pub", 3 + i, "probe.big", b"y" * 600] for i in range(10)],
}


@pytest.mark.parametrize("kind", sorted(OVERSIZED))
def test_oversized_frame_closes_with_1009(kind):
    async def main():
        async with serving(max_frame_bytes=4096, max_payload_bytes=1024) as server:
            async with Traffic(server) as traffic:
                watcher = await Client.connect(url(server))
                watched = await watcher.subscribe("probe.>")
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, FEED]))
                await expect_ack(ws, 1)
                # a frame at the limit is read (its payload is too large: an err)
                # protocol.md 1.2: a payload of exactly max_frame_bytes is accepted
                within = pack(["pub", 2, "probe.big", b"x" * (4096 - 19)])
                assert len(within) == 4096
                await ws.send(within)
                await expect_err(ws, 2, ErrorCode.PAYLOAD_TOO_LARGE)
                oversized = pack(OVERSIZED[kind])
                assert len(oversized) > 4096
                await ws.send(oversized)
                await expect_close(ws, CloseCode.MESSAGE_TOO_BIG)
                await eventually(lambda: len(server.connections) == 3, 3.0, "the offender to go away")
                # nothing of the refused frame was applied: no topic, no delivery, no reply
                assert "probe.big" not in server.router.topics
                with pytest.raises(asyncio.TimeoutError):
                    await watched.next(0.1)
                assert errors(server) == {ErrorCode.PAYLOAD_TOO_LARGE: 1}
                await eventually(lambda: CloseCode.MESSAGE_TOO_BIG in server.router.stats.closes, 1.0, "the 1009 count")
                assert server.router.stats.closes == {CloseCode.MESSAGE_TOO_BIG: 1}
                await watcher.close()
                await traffic.finish()

    run(main())


# 6b. broken WebSocket framing (picows closes with 1002)


@pytest.mark.parametrize(
    "bad_frame",
    [client_frame(0x2, pack(["pub", 1, "probe.x", b"x"]), masked=False), client_frame(0x3, b"reserved opcode")],
    ids=["unmasked", "reserved-opcode"],
)
def test_broken_framing_closes_with_1002(bad_frame):
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                reader, writer = await raw_upgrade(server.port)
                try:
                    writer.write(bad_frame)
                    head = await asyncio.wait_for(reader.readexactly(2), 3)
                    assert head[0] == 0x88, head  # a close frame, unmasked
                    body = await asyncio.wait_for(reader.readexactly(head[1] & 0x7F), 3)
                    assert int.from_bytes(body[:2], "big") == CloseCode.PROTOCOL_ERROR
                    writer.write(client_frame(0x8, body[:2]))  # answer the close, as RFC 6455 asks
                    rest = await asyncio.wait_for(reader.read(), 3)
                    assert rest == b""  # nothing after the close frame, not a second close
                finally:
                    writer.close()
                await eventually(lambda: len(server.connections) == 2, 3.0, "the offender to go away")
                await eventually(lambda: CloseCode.PROTOCOL_ERROR in server.router.stats.closes, 1.0, "the 1002 count")
                assert server.router.stats.closes == {CloseCode.PROTOCOL_ERROR: 1}
                assert "probe.x" not in server.router.topics
                await traffic.finish()

    run(main())


# 7. payload too large, frame within limits


def test_payload_over_limit_gets_payload_too_large():
    async def main():
        async with serving(max_frame_bytes=4096, max_payload_bytes=1024) as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["pub", 5, "probe.big", b"x" * 1025]))
                await expect_err(ws, 5, ErrorCode.PAYLOAD_TOO_LARGE)
                await ws.send(pack(["pub", 0, "probe.big", b"x" * 2000]))  # no ack wanted: err anyway
                await expect_err(ws, 0, ErrorCode.PAYLOAD_TOO_LARGE)
                assert "probe.big" not in server.router.topics
                await ws.send(pack(["pub", 6, "probe.big", b"x" * 1024]))  # exactly the limit
                assert (await expect_ack(ws, 6)).seq == 1
                assert errors(server) == {ErrorCode.PAYLOAD_TOO_LARGE: 2}
                assert server.router.stats.closes == {}
                await ws.close()
                await traffic.finish()

    run(main())


# 8. invalid topics


INVALID_TOPICS = [
    "",
    "a..b",
    ".a",
    "a.",
    "a b",
    "a\x00",
    "a\tb",
    "caf\u00e9",
    "t" * 101,  # max_topic_length is 100 in this test
    ".".join(["a"] * 33),  # 33 tokens: one more than allowed
    "a.>.b",
    ">.a",
    "a*",
    "*a.b",
    "a.b>",
]


def test_invalid_topics_get_invalid_topic_for_pub_and_sub():
    async def main():
        async with serving(max_topic_length=100) as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                request_id = 100
                for topic in INVALID_TOPICS:
                    for kind in ("pub", "sub"):
                        request_id += 1
                        message = ["pub", request_id, topic, b"x"] if kind == "pub" else ["sub", request_id, topic]
                        await ws.send(pack(message))
                        err = await expect_err(ws, request_id, ErrorCode.INVALID_TOPIC)
                        assert err.text
                n = 2 * len(INVALID_TOPICS)
                assert errors(server) == {ErrorCode.INVALID_TOPIC: n}
                assert set(server.router.topics) == {FEED}
                assert len(server.router.index) == 1  # only the good subscriber's subscription
                # the longest allowed topic works for both
                longest = "t" * 100
                await ws.send(pack(["sub", 1, longest]))
                await expect_ack(ws, 1)
                await ws.send(pack(["pub", 2, longest, b"x"]))
                assert (await expect_ack(ws, 2)).seq == 1
                delivery = await recv_message(ws)
                assert isinstance(delivery, Delivery) and (delivery.topic, delivery.seq, delivery.data) == (longest, 1, [b"x"])
                assert errors(server) == {ErrorCode.INVALID_TOPIC: n}
                await ws.close()
                await traffic.finish()

    run(main())


# 9. duplicate subscription, unsub of something not subscribed


def test_duplicate_sub_and_unknown_unsub():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, "dup.>"]))
                await expect_ack(ws, 1)
                await ws.send(pack(["sub", 2, "dup.>"]))
                await expect_err(ws, 2, ErrorCode.ALREADY_SUBSCRIBED)
                await ws.send(pack(["sub", 3, FEED]))
                await expect_ack(ws, 3)
                await ws.send(pack(["sub", 4, FEED]))
                await expect_err(ws, 4, ErrorCode.ALREADY_SUBSCRIBED)
                await ws.send(pack(["unsub", 5, "never.subscribed"]))
                await expect_err(ws, 5, ErrorCode.NOT_SUBSCRIBED)
                await ws.send(pack(["unsub", 6, "dup.*"]))  # a different pattern
                await expect_err(ws, 6, ErrorCode.NOT_SUBSCRIBED)
                await ws.send(pack(["unsub", 7, "dup.>"]))
                await expect_ack(ws, 7)
                await ws.send(pack(["unsub", 8, "dup.>"]))  # twice
                await expect_err(ws, 8, ErrorCode.NOT_SUBSCRIBED)
                await ws.send(pack(["unsub", 9, FEED]))
                await expect_ack(ws, 9)
                # the duplicate did not double anything: one subscription left, the good one's
                assert len(server.router.index) == 1
                assert errors(server) == {ErrorCode.ALREADY_SUBSCRIBED: 2, ErrorCode.NOT_SUBSCRIBED: 3}
                await ws.close()
                await traffic.finish()

    run(main())


def test_unsub_of_an_invalid_name_gets_invalid_topic():
    """protocol.md 3.1: unsub validates the name first (code 3), then looks it up (code 6)."""

    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                for request_id, name in enumerate(["a..b", "", "a b", "a.>.b"], 1):
                    await ws.send(pack(["unsub", request_id, name]))
                    await expect_err(ws, request_id, ErrorCode.INVALID_TOPIC)
                await ws.send(pack(["unsub", 5, "valid.but.unknown"]))
                await expect_err(ws, 5, ErrorCode.NOT_SUBSCRIBED)
                assert errors(server) == {ErrorCode.INVALID_TOPIC: 4, ErrorCode.NOT_SUBSCRIBED: 1}
                await ws.close()
                await traffic.finish()

    run(main())


# 10. publishing to a pattern


def test_publish_to_pattern_gets_pattern_not_allowed():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                for request_id, pattern in enumerate(["md.*", "md.>", "*", ">", "feed.*", "*.quotes", "md.*.x.>"], 1):
                    await ws.send(pack(["pub", request_id, pattern, b"x"]))
                    await expect_err(ws, request_id, ErrorCode.PATTERN_NOT_ALLOWED)
                assert set(server.router.topics) == {FEED}
                assert errors(server) == {ErrorCode.PATTERN_NOT_ALLOWED: 7}
                await still_works(ws, 50)
                await ws.close()
                await traffic.finish()

    run(main())


# 11. a batch mixing good and bad messages


def test_batch_with_good_and_bad_messages():
    async def main():
        async with serving() as server:
            async with Traffic(server) as traffic:
                other = await Client.connect(url(server))
                other_sub = await other.subscribe("mix.>")
                ws = await ws_raw(server)
                batch = [
                    ["sub", 1, "mix.a"],
                    ["pub", 2, "mix.a", b"one"],
                    ["nope", 3],
                    ["pub", 4, "a..b", b"x"],
                    ["pub", 5, "mix.a", "not-bytes"],
                    ["pub", 0, "mix.a", b"two"],
                    ["pub", 6, "mix.*", b"x"],
                    ["sub", 7, "mix.a"],
                    ["unsub", 8, "zzz"],
                    ["pub", 9, "mix.a", b"three"],
                    ["pub", 10],
                    ["pub", 11, "mix.b", b"four"],
                ]
                await ws.send(pack(batch))
                replies = {}
                deliveries = []
                while len(replies) < 11:
                    message = await recv_message(ws)
                    if isinstance(message, Delivery):
                        deliveries.append(message)
                        continue
                    assert message.id not in replies, f"two replies for id {message.id}"
                    replies[message.id] = message
                epoch = server.router.epoch
                assert replies[1] == Ack(1, 0, 0)
                assert replies[2] == Ack(2, epoch, 1)
                assert replies[9] == Ack(9, epoch, 3)
                assert replies[11] == Ack(11, epoch, 1)
                expected_errs = {
                    3: ErrorCode.UNKNOWN_TYPE,
                    4: ErrorCode.INVALID_TOPIC,
                    5: ErrorCode.BAD_MESSAGE,
                    6: ErrorCode.PATTERN_NOT_ALLOWED,
                    7: ErrorCode.ALREADY_SUBSCRIBED,
                    8: ErrorCode.NOT_SUBSCRIBED,
                    10: ErrorCode.BAD_MESSAGE,
                }
                for request_id, code in expected_errs.items():
                    message = replies[request_id]
                    assert isinstance(message, Err) and message.code == code, message
                # the offender receives what it subscribed to in the same batch
                while sum(len(m.data) for m in deliveries) < 3:
                    deliveries.append(await recv_message(ws))
                got = [(m.topic, m.seq + i, data) for m in deliveries for i, data in enumerate(m.data)]
                assert got == [("mix.a", 1, b"one"), ("mix.a", 2, b"two"), ("mix.a", 3, b"three")]
                # another client subscribed to the pattern receives every good publish
                seen = [await other_sub.next(3) for _ in range(4)]
                by_topic = {}
                for m in seen:
                    by_topic.setdefault(m.topic, []).append((m.seq, m.data))
                assert by_topic == {"mix.a": [(1, b"one"), (2, b"two"), (3, b"three")], "mix.b": [(1, b"four")]}
                assert errors(server) == {
                    ErrorCode.UNKNOWN_TYPE: 1,
                    ErrorCode.INVALID_TOPIC: 1,
                    ErrorCode.BAD_MESSAGE: 2,
                    ErrorCode.PATTERN_NOT_ALLOWED: 1,
                    ErrorCode.ALREADY_SUBSCRIBED: 1,
                    ErrorCode.NOT_SUBSCRIBED: 1,
                }
                await ws.close()
                await other.close()
                await traffic.finish()

    run(main())


# 12. limits: subscriptions per connection, topics per broker


def test_too_many_subscriptions():
    async def main():
        async with serving(max_subscriptions=2) as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, "lim.a"]))
                await expect_ack(ws, 1)
                await ws.send(pack(["sub", 2, "lim.>"]))
                await expect_ack(ws, 2)
                await ws.send(pack(["sub", 3, "lim.c"]))
                await expect_err(ws, 3, ErrorCode.TOO_MANY_SUBSCRIPTIONS)
                await ws.send(pack(["sub", 4, FEED]))
                await expect_err(ws, 4, ErrorCode.TOO_MANY_SUBSCRIPTIONS)
                # freeing one makes room again
                await ws.send(pack(["unsub", 5, "lim.a"]))
                await expect_ack(ws, 5)
                await ws.send(pack(["sub", 6, "lim.c"]))
                await expect_ack(ws, 6)
                # the limit is per connection: another client can still subscribe
                async with Client(url(server)) as other:
                    await other.subscribe("lim.a")
                    await other.subscribe("lim.b")
                assert errors(server) == {ErrorCode.TOO_MANY_SUBSCRIPTIONS: 2}
                await ws.close()
                await traffic.finish()

    run(main())


def test_sub_refusals_are_checked_in_the_documented_order():
    """protocol.md 3.1: sub refusals are checked in the order 1 (does not decode), 3, 5, 8,
    then a since map entry by entry."""

    async def main():
        async with serving(max_subscriptions=1) as server:
            async with Traffic(server) as traffic:
                ws = await ws_raw(server)
                await ws.send(pack(["sub", 1, "lim.a"]))
                await expect_ack(ws, 1)
                await ws.send(pack(["sub", 2, "lim.a"]))  # duplicate and over the limit: 5
                await expect_err(ws, 2, ErrorCode.ALREADY_SUBSCRIBED)
                await ws.send(pack(["sub", 3, "a..b"]))  # over the limit and invalid: 3
                await expect_err(ws, 3, ErrorCode.INVALID_TOPIC)
                await ws.send(pack(["sub", 4, "lim.b"]))  # valid, over the limit: 8
                await expect_err(ws, 4, ErrorCode.TOO_MANY_SUBSCRIPTIONS)
                await ws.send(pack(["sub", 5, "a..b", "not a since"]))  # since of the wrong type and invalid: 1
                await expect_err(ws, 5, ErrorCode.BAD_MESSAGE)
                await ws.send(pack(["unsub", 6, "lim.a"]))
                await expect_ack(ws, 6)
                # a since map's entries are checked one after the other, each: its key (3), the
                # pattern matches it (10), its position's form (1), the position itself (10)
                await ws.send(pack(["sub", 7, "lim.>", [0, {"x.a": "bad"}]]))
                await expect_err(ws, 7, ErrorCode.BAD_POSITION)
                await ws.send(pack(["sub", 8, "lim.>", [0, {"lim.a": "bad", "lim..b": [1, 1]}]]))
                await expect_err(ws, 8, ErrorCode.BAD_MESSAGE)
                await ws.send(pack(["sub", 9, "lim.>", [0, {"lim..b": [1, 1], "lim.a": "bad"}]]))
                await expect_err(ws, 9, ErrorCode.INVALID_TOPIC)
                assert errors(server) == {
                    ErrorCode.BAD_MESSAGE: 2,
                    ErrorCode.ALREADY_SUBSCRIBED: 1,
                    ErrorCode.INVALID_TOPIC: 2,
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS: 1,
                    ErrorCode.BAD_POSITION: 1,
                }
                await ws.close()
                await traffic.finish()

    run(main())


def test_too_many_topics():
    async def main():
        async with serving(max_topics=2) as server:
            async with Traffic(server) as traffic:  # FEED is topic 1
                ws = await ws_raw(server)
                await ws.send(pack(["pub", 1, "lim.one", b"x"]))
                assert (await expect_ack(ws, 1)).seq == 1
                await ws.send(pack(["pub", 2, "lim.two", b"x"]))
                await expect_err(ws, 2, ErrorCode.TOO_MANY_TOPICS)
                await ws.send(pack(["pub", 0, "lim.three", b"x"]))
                await expect_err(ws, 0, ErrorCode.TOO_MANY_TOPICS)
                # existing topics keep working, for the offender too
                await ws.send(pack(["pub", 3, "lim.one", b"y"]))
                assert (await expect_ack(ws, 3)).seq == 2
                # subscribing to a topic that does not exist yet creates no topic state
                await ws.send(pack(["sub", 4, "lim.four"]))
                assert await expect_ack(ws, 4) == Ack(4, 0, 0)
                assert set(server.router.topics) == {FEED, "lim.one"}
                assert errors(server) == {ErrorCode.TOO_MANY_TOPICS: 2}
                await ws.close()
                await traffic.finish()

    run(main())


# 13. error amplification and the batch limit


def empty_array_batch(size: int) -> bytes:
    """A batch frame of exactly `size` bytes: an array32 header and size - 5 empty arrays."""
    count = size - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def test_huge_batch_of_empty_arrays_gets_a_single_err():
    """A 1 MiB frame holding about a million empty arrays is a batch far over
    max_batch_messages: it gets one err (code 1, id 0), not one per element."""
    frame = empty_array_batch(MAX_FRAME)
    assert len(frame) == MAX_FRAME

    # in the core: exactly one frame is queued, however many elements the batch holds
    h = Harness()
    s = h.session("s")
    s.receive(frame)
    assert len(s.box.pieces) == 1 and not s.box.over
    ((err,),) = decode_frames(s.box.take(MAX_FRAME))
    assert isinstance(err, Err) and (err.id, err.code) == (0, ErrorCode.BAD_MESSAGE)
    assert str(MAX_FRAME - 5) in err.text and "10000" in err.text
    assert s.errors == 1

    async def main():
        async with serving(max_frame_bytes=MAX_FRAME) as server:
            ws = await ws_raw(server)
            try:
                await ws.send(frame)
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE)
                await probe(ws, 5)
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
                assert server.router.stats.closes == {}
            finally:
                await ws.close()

    run(main())


def test_errors_per_frame_stop_after_one_hundred():
    """A batch within max_batch_messages whose 200 elements are all bad gets 100 errs (each
    with its element's id) and one more err (code 1, id 0) saying the rest was ignored. Good
    elements before the cut-off apply; those after it do not."""
    bad = [["pub", i, 5] for i in range(2, 202)]  # data is not bin: code 1 with the element's id
    batch = [["pub", 1, "cap.before", b"a"], *bad, ["pub", 999, "cap.after", b"b"]]

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(pack(batch))
                got = await replies(ws, 102)
                errs, last = got[:101], got[101]
                assert all(isinstance(e, Err) and e.code == ErrorCode.BAD_MESSAGE for e in errs), errs
                assert [e.id for e in errs[:100]] == list(range(2, 102))
                assert errs[100].id == 0 and "ignored" in errs[100].text
                assert last == Ack(1, server.router.epoch, 1)
                await probe(ws, 7)  # nothing else was queued
                assert "cap.after" not in server.router.topics
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 101}
                assert server.router.stats.closes == {}
            finally:
                await ws.close()

    run(main())


def test_valid_batch_over_max_batch_messages_is_refused_whole():
    """With max_batch_messages=10, a well-formed batch of 11 acked publishes gets one err
    (code 1, id 0) and nothing in it is applied; a batch of exactly 10 is accepted."""

    async def main():
        async with serving(max_batch_messages=10) as server:
            ws = await ws_raw(server)
            try:
                await ws.send(encode([Pub(i, "mb.t", b"%d" % i) for i in range(1, 12)]))
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                assert "11" in reply.text and "10" in reply.text
                await probe(ws, 50)  # no acks followed the err
                assert "mb.t" not in server.router.topics
                assert server.router.stats.published == 1  # the probe only

                await ws.send(encode([Pub(i, "mb.t", b"%d" % i) for i in range(1, 11)]))
                epoch = server.router.epoch
                assert await replies(ws, 10) == [Ack(i, epoch, i) for i in range(1, 11)]
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
            finally:
                await ws.close()

    run(main())


# 14. deeply nested MessagePack


NESTED = {
    "batch": b"\x91" * 100_000,
    "single": b"\x92\xa3pub" + b"\x91" * 100_000,
    "in-batch-element": b"\x92" + pack(["pub", 1, "t", b""]) + b"\x91" * 100_000,
    "payload": b"\x94\xa3pub\x01\xa1t" + b"\x91" * 100_000,
    "maps": b"\x91" + b"\x81\xa1a" * 50_000 + b"\xc0",
}


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_deeply_nested_msgpack_gets_an_err_and_the_connection_stays_open(kind):
    """Nesting deeper than the decoder's recursion limit is an invalid message (err code 1,
    id 0), not an internal error that closes the connection with 1011."""

    async def main():
        async with serving() as server:
            ws = await ws_raw(server)
            try:
                await ws.send(NESTED[kind])
                reply = await recv_message(ws)
                assert isinstance(reply, Err) and (reply.id, reply.code) == (0, ErrorCode.BAD_MESSAGE), reply
                await probe(ws, 3)
                assert server.router.stats.closes == {}
                assert server.router.stats.errors == {ErrorCode.BAD_MESSAGE: 1}
                assert len(server.connections) == 1
            finally:
                await ws.close()

    run(main())
