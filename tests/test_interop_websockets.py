"""Interoperability: a client written only from docs/protocol.md, with the `websockets` library
and plain MessagePack lists, talks to the real server.

This module must not import broker.client or broker.messages (a test below checks it): every
message is built with `msgspec.msgpack.encode([...])` or taken as bytes from the document, and
every reply is checked as a plain decoded list."""

from __future__ import annotations

import ast
import asyncio
import re
import time
from pathlib import Path

import msgspec
import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from conftest import ROOT, run, serving

SUBPROTOCOL = "broker.v1"  # docs/protocol.md, 1.1
TOPIC = "md.NASDAQ.AAPL"

encode = msgspec.msgpack.encode
decode = msgspec.msgpack.decode


def doc_examples() -> dict[str, tuple[bytes, object]]:
    """(bytes, decoded value) of every example of docs/protocol.md, by name (format: section 11)."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    pattern = r"^example: (\S+)\nencoding: msgpack\n```hex\n([0-9a-f \n]*?)\n```\nvalue: (.+)$"
    return {
        name: (bytes.fromhex("".join(hex_text.split())), ast.literal_eval(value))
        for name, hex_text, value in re.findall(pattern, text, re.MULTILINE)
    }


def endpoint(server, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def connect(server, **kwargs):
    ws = await websockets.connect(endpoint(server), subprotocols=[SUBPROTOCOL], **kwargs)
    assert ws.subprotocol == SUBPROTOCOL
    return ws


class Peer:
    """What a client written from the document keeps per connection (sections 2.2 and 3.2): its
    topic table from `topic` messages, and the messages of the frames read but not yet
    handled. Each delivery batch comes out as ["msg", topic, epoch, seq, [payload, ...]]."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.topics: dict[int, tuple[str, int]] = {}
        self.unread: list[list] = []
        self.frames = 0

    async def frame(self, timeout: float = 5.0) -> list:
        """The next frame, decoded: an array of one or more messages."""
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(data, bytes), "the server sends binary frames only"
        frame = decode(data)
        assert isinstance(frame, list) and frame, "a server frame is a non-empty array of messages"
        for message in frame:
            assert isinstance(message, list) and isinstance(message[0], str), message
        self.frames += 1
        return frame

    async def next(self, timeout: float = 5.0) -> list:
        while not self.unread:
            for message in await self.frame(timeout):
                if message[0] == "topic":
                    _, topic_id, name, epoch = message
                    self.topics[topic_id] = (name, epoch)
                elif message[0] == "msg":
                    for topic_id, seq, *payloads in message[1:]:
                        name, epoch = self.topics[topic_id]  # announced before its first delivery
                        self.unread.append(["msg", name, epoch, seq, payloads])
                else:
                    self.unread.append(message)
        return self.unread.pop(0)


PEERS: dict[int, Peer] = {}


async def receive(ws, timeout: float = 5.0) -> list:
    peer = PEERS.get(id(ws))
    if peer is None or peer.ws is not ws:
        peer = PEERS[id(ws)] = Peer(ws)
    return await peer.next(timeout)


async def replies_by_id(ws, count: int) -> dict[int, list]:
    """`count` ack/err replies, by request id (replies to a batch are matched by id)."""
    out: dict[int, list] = {}
    for _ in range(count):
        reply = await receive(ws)
        assert reply[0] in ("ack", "err"), reply
        assert reply[1] not in out
        out[reply[1]] = reply
    return out


async def nothing_more(ws, wait: float = 0.2) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.recv(), wait)


def plausible_epoch(epoch: int) -> bool:
    """An epoch (protocol section 5.1): milliseconds since 1970 times 2^20 plus 20 random
    bits, of a moment in the recent past."""
    now = int(time.time() * 1000)
    return type(epoch) is int and 0 <= epoch < 2**63 and now - 600_000 < epoch >> 20 <= now


def test_pub_sub_round_trip_from_plain_lists():
    async def main():
        async with serving() as server:
            sub = await connect(server)
            pub = await connect(server)

            await sub.send(encode(["sub", 1, TOPIC]))
            assert await receive(sub) == ["ack", 1, 0, 0]  # nothing published yet

            await pub.send(encode(["pub", 7, TOPIC, b"189.25"]))
            ack = await receive(pub)
            assert ack[:2] == ["ack", 7] and ack[3] == 1 and plausible_epoch(ack[2])
            epoch = ack[2]
            assert await receive(sub) == ["msg", TOPIC, epoch, 1, [b"189.25"]]

            # A batch frame of two publishes: an ack each, one msg with both payloads.
            await pub.send(encode([["pub", 8, TOPIC, b"a"], ["pub", 9, TOPIC, b"\x00\xff"]]))
            assert await replies_by_id(pub, 2) == {8: ["ack", 8, epoch, 2], 9: ["ack", 9, epoch, 3]}
            assert await receive(sub) == ["msg", TOPIC, epoch, 2, [b"a", b"\x00\xff"]]

            # A second subscriber of the exact topic learns the last sequence number.
            late = await connect(server)
            await late.send(encode(["sub", 2, TOPIC]))
            assert await receive(late) == ["ack", 2, epoch, 3]

            # id 0: no ack; the message is still delivered with the next sequence number.
            await pub.send(encode(["pub", 0, TOPIC, b"quiet"]))
            assert await receive(sub) == ["msg", TOPIC, epoch, 4, [b"quiet"]]
            assert await receive(late) == ["msg", TOPIC, epoch, 4, [b"quiet"]]
            await nothing_more(pub)

            # unsub: ack 0, 0, and no more deliveries.
            await sub.send(encode(["unsub", 3, TOPIC]))
            assert await receive(sub) == ["ack", 3, 0, 0]
            await pub.send(encode(["pub", 10, TOPIC, b"after"]))
            assert await receive(pub) == ["ack", 10, epoch, 5]
            assert await receive(late) == ["msg", TOPIC, epoch, 5, [b"after"]]
            await nothing_more(sub)

            for ws in (sub, pub, late):
                await ws.close()

    run(main())


def test_patterns_and_overlapping_subscriptions_deliver_once():
    async def main():
        async with serving() as server:
            ws = await connect(server)
            await ws.send(encode([["sub", 1, "md.>"], ["sub", 2, "md.*.AAPL"], ["sub", 3, TOPIC]]))
            replies = await replies_by_id(ws, 3)
            assert replies[3] == ["ack", 3, 0, 0]
            for rid in (1, 2):  # a pattern's ack carries the time it took effect, in ms
                assert replies[rid][:2] == ["ack", rid] and replies[rid][3] == 0 and abs(replies[rid][2] - time.time() * 1000) < 60_000
            await ws.send(encode(["pub", 0, TOPIC, b"x"]))
            message = await receive(ws)
            assert message[0:2] == ["msg", TOPIC] and message[3:] == [1, [b"x"]]
            await nothing_more(ws)  # once, although three subscriptions match
            await ws.close()

    run(main())


def test_errors_from_plain_lists():
    async def main():
        async with serving() as server:
            ws = await connect(server)

            async def reply_to(message) -> list:
                await ws.send(encode(message))
                reply = await receive(ws)
                assert reply[0] == "err" and isinstance(reply[3], str), reply
                return reply[:3]

            assert await reply_to(["pub", 5, "md.*", b"x"]) == ["err", 5, 4]
            assert await reply_to(["pub", 0, "md.>", b"x"]) == ["err", 0, 4]  # errors come even with id 0
            assert await reply_to(["pub", 6, "md..x", b"x"]) == ["err", 6, 3]
            assert await reply_to(["pub", 7, "md.x", "text, not bin"]) == ["err", 7, 1]
            assert await reply_to(["nope", 8]) == ["err", 8, 2]
            assert await reply_to(["unsub", 9, "md.x"]) == ["err", 9, 6]
            assert await reply_to([]) == ["err", 0, 1]
            await ws.send(encode(["sub", 10, "md.x"]))
            assert await receive(ws) == ["ack", 10, 0, 0]
            assert await reply_to(["sub", 11, "md.x"]) == ["err", 11, 5]

            # In a batch, the undecodable element's err may come first: match by id.
            await ws.send(encode([["pub", 12, "md.x", b"ok"], ["pub", 13, "md.x", "str"]]))
            replies = await replies_by_id(ws, 2)
            assert replies[13][:3] == ["err", 13, 1]
            assert replies[12][:2] == ["ack", 12] and replies[12][3] == 1
            assert (await receive(ws))[:2] == ["msg", "md.x"]  # our own subscription
            await ws.close()

    run(main())


def test_conversation_replayed_from_the_document_bytes():
    """The Examples section of docs/protocol.md, sent byte for byte."""
    doc = doc_examples()
    assert {"sub", "ack_sub", "pub", "ack_pub", "batch", "topic", "msg", "unsub"} <= set(doc)

    async def main():
        async with serving() as server:
            ws = await connect(server)
            await ws.send(doc["sub"][0])
            assert await ws.recv() == b"\x91" + doc["ack_sub"][0]  # a frame of one message
            await ws.send(doc["pub"][0])
            # one frame: the ack, the announcement of the topic, then the delivery
            ack, announce, delivery = decode(await ws.recv())
            epoch = ack[2]
            assert ack == ["ack", 4, epoch, 1] and plausible_epoch(epoch)
            expected_ack = doc["ack_pub"][1]
            assert ack == [expected_ack[0], expected_ack[1], epoch, expected_ack[3]]
            expected_topic = doc["topic"][1]
            topic_id = announce[1]  # the server's own (the document shows 0): the first topics' ids are below 64
            assert announce == [expected_topic[0], topic_id, expected_topic[2], epoch] and 0 <= topic_id < 64
            assert delivery == ["msg", [topic_id, 1, doc["pub"][1][3]]]
            await ws.send(doc["batch"][0])
            ack5, ack6, delivery = decode(await ws.recv())
            assert (ack5, ack6) == (["ack", 5, epoch, 2], ["ack", 6, epoch, 3])
            first_batch = doc["msg"][1][1]
            assert delivery == ["msg", [topic_id, 2, *first_batch[2:]]]
            await ws.send(doc["unsub"][0])
            assert decode(await ws.recv()) == [["ack", 3, 0, 0]]
            await ws.close()

    run(main())


def test_everything_of_one_server_iteration_arrives_in_one_frame():
    """Section 2.2: the replies and the deliveries of every topic of one iteration share a frame,
    each topic announced before its first delivery."""

    async def main():
        async with serving() as server:
            ws = await connect(server)
            await ws.send(encode([["sub", 1, "md.>"], ["pub", 2, "md.a", b"1"], ["pub", 3, "md.b", b"2"], ["pub", 0, "md.a", b"3"]]))
            frame = decode(await ws.recv())
            assert [m[0] for m in frame[:3]] == ["ack", "ack", "ack"], frame
            announced: dict[int, str] = {}
            delivered = []
            for message in frame[3:]:
                if message[0] == "topic":
                    announced[message[1]] = message[2]
                else:
                    assert message[0] == "msg"
                    delivered += [(announced[batch[0]], batch[1], batch[2:]) for batch in message[1:]]
            assert sorted(delivered) == [("md.a", 1, [b"1", b"3"]), ("md.b", 1, [b"2"])]
            await nothing_more(ws)
            # later deliveries of known topics need no announcement
            await ws.send(encode([["pub", 0, "md.b", b"4"], ["pub", 0, "md.a", b"5"]]))
            frame = decode(await ws.recv())
            ids = {name: topic_id for topic_id, name in announced.items()}
            assert frame == [["msg", [ids["md.b"], 2, b"4"], [ids["md.a"], 3, b"5"]]]
            await ws.close()

    run(main())


def test_handshake_without_the_subprotocol_is_refused_with_400():
    async def main():
        async with serving() as server:
            for offered in (None, ["broker.v0"]):
                with pytest.raises(InvalidStatus) as info:
                    await websockets.connect(endpoint(server), subprotocols=offered)
                response = info.value.response
                assert response.status_code == 400
                assert response.headers["Content-Type"].startswith("text/plain")
                assert b"broker.v1" in response.body

            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(endpoint(server, "/elsewhere"), subprotocols=[SUBPROTOCOL])
            assert info.value.response.status_code == 404

            # Several offered: the server picks the one it speaks.
            ws = await websockets.connect(endpoint(server), subprotocols=["broker.v9", SUBPROTOCOL])
            assert ws.subprotocol == SUBPROTOCOL
            await ws.close()

    run(main())


def test_text_frame_and_oversized_frame_close_the_connection():
    async def main():
        async with serving(max_frame_bytes=4096, max_payload_bytes=1024) as server:
            ws = await connect(server)
            await ws.send("a text frame")
            with pytest.raises(ConnectionClosedError) as info:
                await receive(ws)
            assert info.value.rcvd.code == 1003

            ws = await connect(server, max_size=None)
            await ws.send(encode(["pub", 1, "md.x", b"x" * 2000]))
            reply = await receive(ws)
            assert reply[:3] == ["err", 1, 7]  # payload too large: the connection stays open
            await ws.send(encode(["pub", 2, "md.x", b"x" * 5000]))
            with pytest.raises(ConnectionClosedError) as info:
                await receive(ws)
            assert info.value.rcvd.code == 1009

    run(main())


def test_this_module_does_not_use_the_broker_protocol_code():
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {name for name in imported if name.startswith(("broker.client", "broker.messages"))}
    assert "broker" not in imported
