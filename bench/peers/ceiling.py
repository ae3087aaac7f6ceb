"""Ceiling probe: a bare broker with only the two levers of the design, no protocol features.

One frame per topic per loop tick, encoded once; one write per connection per tick. It speaks
just enough of protocol v1 for the load generator (batched `pub`, `sub` of exact topics and of
`prefix.>` patterns) and skips everything else (sequence numbers, validation, acks, limits)."""

import asyncio
import sys

import msgspec
import uvloop
from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

decode = msgspec.msgpack.Decoder().decode
encode = msgspec.msgpack.encode
exact: dict[str, list] = {}
prefixes: dict[str, list] = {}  # "md." -> subscribers of "md.>"
cache: dict[str, list] = {}
pending: dict[str, list] = {}
touched: list = []


def header(size):
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return b"\x82\x7e" + size.to_bytes(2, "big")
    return b"\x82\x7f" + size.to_bytes(8, "big")


def flush():
    for topic, payloads in pending.items():
        subs = cache.get(topic)
        if subs is None:
            subs = cache[topic] = exact.get(topic, []) + [s for p, l in prefixes.items() if topic.startswith(p) for s in l]
        body = encode(["msg", topic, 0, 0, payloads])
        frame = header(len(body)) + body
        for conn in subs:
            if not conn.out:
                touched.append(conn)
            conn.out.append(frame)
    pending.clear()
    for conn in touched:
        conn.write(b"".join(conn.out))
        conn.out.clear()
    touched.clear()


class Conn(WSListener):
    def on_ws_connected(self, transport):
        self.write = transport.underlying_transport.write
        self.out = []

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.BINARY:
            return
        msg = decode(frame.get_payload_as_memoryview())
        for m in msg if isinstance(msg[0], list) else [msg]:
            if m[0] == "pub":
                if not pending:
                    asyncio.get_running_loop().call_soon(flush)
                pending.setdefault(m[2], []).append(m[3])
            elif m[0] == "sub":
                target = prefixes.setdefault(m[2][:-1], []) if m[2].endswith(">") else exact.setdefault(m[2], [])
                target.append(self)
                cache.clear()


def accept(request):
    response = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": "broker.v1"})
    return WSUpgradeResponseWithListener(response, Conn())


async def main(port):
    server = await ws_create_server(accept, "127.0.0.1", port, use_aiofastnet=False, max_frame_size=16 << 20)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
