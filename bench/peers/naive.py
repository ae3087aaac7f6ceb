"""Naive picows broker: every message goes to every subscriber with its own transport.send.

The floor a plain Python broker reaches: no batching, no shared frames. It speaks the same
subset of protocol v1 as the ceiling probe (batched `pub`, exact and `prefix.>` `sub`)."""

import sys

from common import encode, messages, serve, subscribe, subscribers
from picows import WSListener, WSMsgType

seqs: dict[str, int] = {}


class Conn(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.BINARY:
            return
        for m in messages(frame):
            if m[0] == "pub":
                topic = m[2]
                seq = seqs[topic] = seqs.get(topic, 0) + 1
                body = encode(["msg", topic, 0, seq, [m[3]]])
                for conn in subscribers(topic):
                    conn.transport.send(WSMsgType.BINARY, body)
            elif m[0] == "sub":
                subscribe(self, m[2])


if __name__ == "__main__":
    serve(Conn, int(sys.argv[1]))
