"""Naive picows broker: every message goes to every subscriber with its own transport.send.

The floor a plain Python broker reaches: no batching, no shared frames. It speaks the same
subset of protocol v1 as the ceiling probe (batched `pub`, exact and `prefix.>` `sub`)."""

import sys

import msgspec
import uvloop
from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

decode = msgspec.msgpack.Decoder().decode
encode = msgspec.msgpack.encode
exact: dict[str, list] = {}
prefixes: dict[str, list] = {}
cache: dict[str, list] = {}
seqs: dict[str, int] = {}


class Conn(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.BINARY:
            return
        msg = decode(frame.get_payload_as_memoryview())
        for m in msg if isinstance(msg[0], list) else [msg]:
            if m[0] == "pub":
                topic = m[2]
                subs = cache.get(topic)
                if subs is None:
                    subs = cache[topic] = exact.get(topic, []) + [s for p, l in prefixes.items() if topic.startswith(p) for s in l]
                seq = seqs[topic] = seqs.get(topic, 0) + 1
                body = encode(["msg", topic, 0, seq, [m[3]]])
                for conn in subs:
                    conn.transport.send(WSMsgType.BINARY, body)
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
