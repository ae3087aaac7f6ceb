"""Ceiling probe: a bare broker with only the levers of the design, no protocol features.

Per loop tick, each topic's batch `[topic_id, seq, payload...]` is encoded once; connections with
the same subscriptions form a group, and each group's frame (`topic` announcements it has not
seen yet, then one `msg` with its batches) is assembled once and written to each of its
connections: one frame and one write per connection per tick. It speaks just enough of
protocol v1 for the load generator (batched `pub`, `sub` of exact topics and of `prefix.>`
patterns) and skips everything else (acks, validation, limits)."""

import asyncio
import sys

from common import announcement, encode, frame_body, messages, serve, subscribe, subscribers, topic_id
from picows import WSListener, WSMsgType

pending: dict[str, list] = {}
seqs: dict[str, int] = {}
groups: dict[tuple, "Group"] = {}
routes: dict[str, list] = {}  # topic -> the groups that receive it


class Group:
    def __init__(self):
        self.conns = []
        self.announced = {}  # topic id -> encoded announcement, for connections that join later
        self.fresh = []  # announcements to put in the next frame
        self.batches = []


def header(size):
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return b"\x82\x7e" + size.to_bytes(2, "big")
    return b"\x82\x7f" + size.to_bytes(8, "big")


def route(topic):
    found = routes.get(topic)
    if found is None:
        found = routes[topic] = list({id(c.group): c.group for c in subscribers(topic)}.values())
    return found


def flush():
    touched = []
    for topic, payloads in pending.items():
        tid = topic_id(topic)
        seq = seqs.get(topic, 1)
        seqs[topic] = seq + len(payloads)
        batch = encode([tid, seq, *payloads])  # encoded once for every group
        for group in route(topic):
            if not group.batches:
                touched.append(group)
            group.batches.append(batch)
            if tid not in group.announced:
                group.announced[tid] = announcement(tid, topic)
                group.fresh.append(group.announced[tid])
    pending.clear()
    for group in touched:
        body = frame_body(group.fresh, group.batches)
        frame = header(len(body)) + body  # assembled once, shared by the group's connections
        for conn in group.conns:
            conn.write(frame)
        group.fresh.clear()
        group.batches.clear()


class Conn(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport
        self.write = transport.underlying_transport.write
        self.patterns = ()
        self.group = None

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
                self.join(tuple(sorted({*self.patterns, m[2]})))

    def join(self, patterns):
        if self.group is not None:
            self.group.conns.remove(self)
        self.patterns = patterns
        self.group = groups.get(patterns)
        if self.group is None:
            self.group = groups[patterns] = Group()
        self.group.conns.append(self)
        routes.clear()
        if self.group.announced:  # topics this group was told about before this connection joined
            self.transport.send(
                WSMsgType.BINARY, b"".join([b"\xdd" + len(self.group.announced).to_bytes(4, "big"), *self.group.announced.values()])
            )


if __name__ == "__main__":
    serve(Conn, int(sys.argv[1]))
