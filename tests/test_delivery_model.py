"""Delivery under coalesced framing, checked against a model (Hypothesis, real server).

Connections hold random, overlapping subscriptions (exact topics and patterns), change them
between publishes, and a publisher sends batches that touch many topics in one loop
iteration. Every connection must receive exactly the messages of the topics its subscriptions
matched when each message was published: once each, in sequence order per topic, with every
topic announced before its first delivery and each frame an array of messages."""

from __future__ import annotations

import asyncio

import msgspec
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.messages import SUBPROTOCOL, Delivery, Err, Pub, Sub, Unsub, encode
from broker.topics import matches
from conftest import Harness, run, serving, url

TOPICS = ["md.a.x", "md.a.y", "md.b.x", "md.b", "fx.eur", "fx.usd", "x"]
PATTERNS = TOPICS + ["md.>", "md.*.x", "md.a.*", "*.eur", ">", "fx.*", "md.*", "*"]
SENTINEL = "zz.end"
N_CONNECTIONS = 4

subscribe = st.tuples(st.just("sub"), st.integers(0, N_CONNECTIONS - 1), st.sampled_from(PATTERNS))
unsubscribe = st.tuples(st.just("unsub"), st.integers(0, N_CONNECTIONS - 1), st.sampled_from(PATTERNS))
publish = st.tuples(st.just("pub"), st.lists(st.sampled_from(TOPICS), min_size=1, max_size=40))
steps = st.lists(st.one_of(subscribe, unsubscribe, publish, publish), min_size=1, max_size=25)


class Reader:
    """A subscriber as a client written from protocol.md reads: frames of messages, a topic
    table, deliveries resolved to (topic, seq, payload)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.topics: dict[int, str] = {}
        self.replies: dict[int, list] = {}
        self.deliveries: list[tuple[str, int, bytes]] = []
        self.announcements = 0

    async def read_frame(self) -> None:
        frame = msgspec.msgpack.decode(await asyncio.wait_for(self.ws.recv(), 5))
        assert isinstance(frame, list) and frame
        for message in frame:
            kind = message[0]
            if kind == "topic":
                # announced again only with the same name
                assert self.topics.setdefault(message[1], message[2]) == message[2]
                self.announcements += 1
            elif kind == "msg":
                for topic_id, seq, *payloads in message[1:]:
                    topic = self.topics[topic_id]  # KeyError: delivered before its announcement
                    self.deliveries += [(topic, seq + i, p) for i, p in enumerate(payloads)]
            else:
                assert kind in ("ack", "err"), message
                self.replies[message[1]] = message

    async def reply(self, request_id: int) -> list:
        while request_id not in self.replies:
            await self.read_frame()
        return self.replies.pop(request_id)

    async def until(self, topic: str) -> None:
        while not any(t == topic for t, _, _ in self.deliveries):
            await self.read_frame()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_every_connection_gets_exactly_what_its_subscriptions_matched(plan):
    async def main():
        async with serving() as server:
            readers = []
            for _ in range(N_CONNECTIONS):
                ws = await websockets.connect(url(server), subprotocols=[SUBPROTOCOL])
                readers.append(Reader(ws))
            publisher = Reader(await websockets.connect(url(server), subprotocols=[SUBPROTOCOL]))
            held: list[set[str]] = [set() for _ in readers]
            expected: list[list[tuple[str, int, bytes]]] = [[] for _ in readers]
            seqs: dict[str, int] = {}
            request = 0
            try:
                for step in plan:
                    request += 1
                    if step[0] in ("sub", "unsub"):
                        _, who, pattern = step
                        reader = readers[who]
                        await reader.ws.send(msgspec.msgpack.encode([step[0], request, pattern]))
                        reply = await reader.reply(request)
                        if step[0] == "sub" and pattern not in held[who]:
                            assert reply[0] == "ack"
                            held[who].add(pattern)
                        elif step[0] == "unsub" and pattern in held[who]:
                            assert reply[0] == "ack"
                            held[who].discard(pattern)
                        else:
                            assert reply[0] == "err"  # already held, or not held
                        continue
                    messages = []
                    for topic in step[1]:
                        seqs[topic] = seqs.get(topic, 0) + 1
                        payload = b"%s#%d" % (topic.encode(), seqs[topic])
                        messages.append(["pub", 0, topic, payload])
                        for who, patterns in enumerate(held):
                            if any(matches(p, topic) for p in patterns):
                                expected[who].append((topic, seqs[topic], payload))
                    messages[-1][1] = request  # the last one acked: the batch is applied
                    await publisher.ws.send(msgspec.msgpack.encode(messages))
                    await publisher.reply(request)
                for reader in readers:
                    await reader.ws.send(msgspec.msgpack.encode(["sub", 0, SENTINEL]))
                await publisher.ws.send(msgspec.msgpack.encode(["pub", 1, SENTINEL, b"end"]))
                await publisher.reply(1)
                for who, reader in enumerate(readers):
                    await reader.until(SENTINEL)
                    got = [d for d in reader.deliveries if d[0] != SENTINEL]
                    # once each, per topic in order (topics may interleave differently)
                    for topic in TOPICS:
                        assert [d for d in got if d[0] == topic] == [d for d in expected[who] if d[0] == topic], (who, topic)
                    assert len(got) == len(expected[who])
                    # each topic announced once, give or take one repeat (protocol.md 3.2)
                    assert reader.announcements <= 2 * len(reader.topics)
            finally:
                for reader in readers + [publisher]:
                    await reader.ws.close()

    run(main())


# The same property in the sans-I/O core, with subscription changes and publishes of several
# connections interleaved inside one loop iteration (where solo members join and leave nodes
# that already hold pieces of the iteration).

core_step = st.one_of(
    st.tuples(st.just("sub"), st.integers(0, N_CONNECTIONS - 1), st.sampled_from(PATTERNS)),
    st.tuples(st.just("unsub"), st.integers(0, N_CONNECTIONS - 1), st.sampled_from(PATTERNS)),
    st.tuples(st.just("pub"), st.integers(0, N_CONNECTIONS), st.lists(st.sampled_from(TOPICS), min_size=1, max_size=6)),
    st.tuples(st.just("tick")),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(core_step, max_size=60))
def test_within_one_iteration_a_subscription_starts_and_stops_at_its_exact_point(plan):
    h = Harness(max_topics=100)
    sessions = [h.session(i) for i in range(N_CONNECTIONS + 1)]  # the last one only publishes
    held: list[set[str]] = [set() for _ in sessions]
    expected: list[list] = [[] for _ in sessions]
    got: list[list] = [[] for _ in sessions]
    seqs: dict[str, int] = {}

    def tick():
        written, slow = h.tick()
        assert slow == []
        for who, messages in written.items():
            got[who] += [m for m in messages if isinstance(m, Delivery)]
            assert not [m for m in messages if isinstance(m, Err) and m.id != 0]

    for step in plan:
        if step[0] == "tick":
            tick()
        elif step[0] in ("sub", "unsub"):
            _, who, pattern = step
            sessions[who].receive(encode((Sub if step[0] == "sub" else Unsub)(0, pattern)))
            (held[who].add if step[0] == "sub" else held[who].discard)(pattern)
        else:
            _, who, topics = step
            sessions[who].receive(
                encode([Pub(0, t, b"%s#%d" % (t.encode(), seqs.get(t, 0) + 1 + topics[:i].count(t))) for i, t in enumerate(topics)])
            )
            for t in topics:
                seqs[t] = seqs.get(t, 0) + 1
                for other, patterns in enumerate(held):
                    if any(matches(p, t) for p in patterns):
                        expected[other].append((t, seqs[t], b"%s#%d" % (t.encode(), seqs[t])))
    tick()
    for who in range(len(sessions)):
        flat = [(d.topic, d.seq + i, p) for d in got[who] for i, p in enumerate(d.data)]
        for topic in TOPICS:
            assert [x for x in flat if x[0] == topic] == [x for x in expected[who] if x[0] == topic], (who, topic)
        assert len(flat) == len(expected[who])
