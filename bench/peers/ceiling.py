"""Ceiling probe: a bare broker with only the two levers of the design, no protocol features.

One frame per topic per loop tick, encoded once; one write per connection per tick. It speaks
just enough of protocol v1 for the load generator (batched `pub`, `sub` of exact topics and of
`prefix.>` patterns) and skips everything else (sequence numbers, validation, acks, limits)."""

import asyncio
import sys

from common import encode, messages, serve, subscribe, subscribers
from picows import WSListener, WSMsgType

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
        body = encode(["msg", topic, 0, 0, payloads])
        frame = header(len(body)) + body  # encoded once, shared by every subscriber
        for conn in subscribers(topic):
            if not conn.out:
                touched.append(conn)
            conn.out.append(frame)
    pending.clear()
    for conn in touched:  # one write per connection per tick
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
        for m in messages(frame):
            if m[0] == "pub":
                if not pending:
                    asyncio.get_running_loop().call_soon(flush)
                pending.setdefault(m[2], []).append(m[3])
            elif m[0] == "sub":
                subscribe(self, m[2])


if __name__ == "__main__":
    serve(Conn, int(sys.argv[1]))
