"""Naive picows broker: every message goes to every subscriber with its own transport.send.

The floor a plain Python broker reaches: no batching, no coalescing. Each message is encoded
once as the frame `[["msg", [topic_id, seq, payload]]]`; a connection that has not been told the
topic's id yet gets `[["topic", ...], ["msg", ...]]` instead. It speaks the same subset of
protocol v1 as the ceiling probe (batched `pub`, exact and `prefix.>` `sub`)."""

import sys

from common import announcement, encode, frame_body, messages, serve, subscribe, subscribers, topic_id
from picows import WSListener, WSMsgType

seqs: dict[str, int] = {}


class Conn(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport
        self.announced = set()

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.BINARY:
            return
        for m in messages(frame):
            if m[0] == "pub":
                topic = m[2]
                tid = topic_id(topic)
                seq = seqs[topic] = seqs.get(topic, 0) + 1
                batch = encode([tid, seq, m[3]])
                body = frame_body([], [batch])
                for conn in subscribers(topic):
                    if tid in conn.announced:
                        conn.transport.send(WSMsgType.BINARY, body)
                    else:
                        conn.announced.add(tid)
                        conn.transport.send(WSMsgType.BINARY, frame_body([announcement(tid, topic)], [batch]))
            elif m[0] == "sub":
                subscribe(self, m[2])


if __name__ == "__main__":
    serve(Conn, int(sys.argv[1]))
