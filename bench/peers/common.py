"""What the ceiling probe and the naive broker share: the subscription table, topic ids, the
server-to-client encoding (one array of messages per frame) and the server."""

import msgspec
import uvloop
from picows import WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

decode = msgspec.msgpack.Decoder().decode
encode = msgspec.msgpack.encode
exact: dict[str, list] = {}
prefixes: dict[str, list] = {}  # "md." -> subscribers of "md.>"
cache: dict[str, list] = {}
topic_ids: dict[str, int] = {}  # one id space for every connection (each is still told every id it sees)
MSG = encode("msg")


def subscribe(conn, pattern: str) -> None:
    target = prefixes.setdefault(pattern[:-1], []) if pattern.endswith(">") else exact.setdefault(pattern, [])
    target.append(conn)
    cache.clear()


def subscribers(topic: str) -> list:
    subs = cache.get(topic)
    if subs is None:
        subs = cache[topic] = exact.get(topic, []) + [s for p, group in prefixes.items() if topic.startswith(p) for s in group]
    return subs


def topic_id(topic: str) -> int:
    tid = topic_ids.get(topic)
    if tid is None:
        tid = topic_ids[topic] = len(topic_ids)
    return tid


def announcement(tid: int, topic: str) -> bytes:
    """The encoded `["topic", id, name, epoch]` message (epoch 0: the peers never restart a topic)."""
    return encode(["topic", tid, topic, 0])


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def frame_body(announcements: list[bytes], batches: list[bytes]) -> bytes:
    """One server frame: `[topic..., ["msg", batch...]]` from already encoded parts."""
    return b"".join([array_header(len(announcements) + 1), *announcements, array_header(len(batches) + 1), MSG, *batches])


def messages(frame) -> list:
    """The protocol v1 messages of one client frame (one message or a batch)."""
    msg = decode(frame.get_payload_as_memoryview())
    return msg if isinstance(msg[0], list) else [msg]


def serve(listener_class, port: int) -> None:
    def accept(request):
        response = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": "broker.v1"})
        return WSUpgradeResponseWithListener(response, listener_class())

    async def main():
        server = await ws_create_server(accept, "127.0.0.1", port, use_aiofastnet=False, max_frame_size=16 << 20)
        await server.serve_forever()

    uvloop.run(main())
