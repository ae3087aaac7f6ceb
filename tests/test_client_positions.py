import pytest

"""The client's position tracking against a model (Hypothesis, stateful): whatever mix of live
batches, overlapping replays, gap notices and epoch changes reaches a subscription, the
application sees each message at most once, in order per topic, and every message either
arrives or is covered by a Gap."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.client import Gap, Message, Subscription

TOPICS = ("t.a", "t.b")


class Positions(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.items: list = []
        self.sub = Subscription(None, "t.*", self.items.append, 10**9)
        self.epoch = {t: 1 for t in TOPICS}
        self.sent = {t: 0 for t in TOPICS}  # the last sequence number the broker sent or covered
        self.published: dict[tuple[str, int], int] = {}  # (topic, epoch) -> last seq published

    def _publish(self, topic: str, count: int) -> tuple[int, list[bytes]]:
        first = self.sent[topic] + 1
        self.sent[topic] += count
        self.published[(topic, self.epoch[topic])] = self.sent[topic]
        return first, [b"%s:%d:%d" % (topic.encode(), self.epoch[topic], first + i) for i in range(count)]

    @rule(topic=st.sampled_from(TOPICS), count=st.integers(1, 5))
    def live(self, topic, count):
        first, payloads = self._publish(topic, count)
        self.sub.receive(topic, self.epoch[topic], first, payloads)

    @rule(topic=st.sampled_from(TOPICS), back=st.integers(0, 6), count=st.integers(1, 8))
    def replay_overlapping(self, topic, back, count):
        """History sent again from `back` messages before the end, possibly with new ones."""
        start = max(1, self.sent[topic] - back + 1)
        new_first, new = self._publish(topic, max(0, count - back)) if count > back else (self.sent[topic] + 1, [])
        end = self.sent[topic]
        if start > end:
            return
        payloads = [b"%s:%d:%d" % (topic.encode(), self.epoch[topic], s) for s in range(start, end + 1)]
        self.sub.receive(topic, self.epoch[topic], start, payloads)

    @rule(topic=st.sampled_from(TOPICS), count=st.integers(1, 4), overlap=st.integers(0, 3))
    def lost(self, topic, count, overlap):
        """Messages the broker cannot send: a gap (which may overlap what was delivered)."""
        first = self.sent[topic] + 1
        self.sent[topic] += count
        self.published[(topic, self.epoch[topic])] = self.sent[topic]
        self.sub.gap(Gap(topic, self.epoch[topic], max(1, first - overlap), self.sent[topic], "lost"))

    @rule(topic=st.sampled_from(TOPICS))
    def new_epoch(self, topic):
        old = self.epoch[topic]
        self.sub.gap(Gap(topic, old, self.sent[topic] + 1, 0, "epoch ended"))
        self.epoch[topic] = old + 1
        self.sent[topic] = 0

    @invariant()
    def once_in_order_and_nothing_silent(self):
        delivered: dict[tuple[str, int], list[int]] = {}
        covered: dict[tuple[str, int], set[int]] = {}
        for item in self.items:
            key = (item.topic, item.epoch)
            if type(item) is Message:
                seqs = delivered.setdefault(key, [])
                assert not seqs or item.seq > seqs[-1], f"{key}: {item.seq} after {seqs[-1]}"
                assert item.data == b"%s:%d:%d" % (item.topic.encode(), item.epoch, item.seq)
                seqs.append(item.seq)
            else:
                assert item.first >= 1 and (item.last == 0 or item.last >= item.first)
                if item.last:
                    covered.setdefault(key, set()).update(range(item.first, item.last + 1))
                    assert not covered[key] & set(delivered.get(key, ())), "a gap over delivered messages"
        for key, last in self.published.items():
            seen = set(delivered.get(key, ())) | covered.get(key, set())
            ended = any(type(i) is Gap and (i.topic, i.epoch) == key and i.last == 0 for i in self.items)
            missing = set(range(1, last + 1)) - seen
            assert not missing or ended, f"{key}: {sorted(missing)[:5]} neither delivered nor covered by a gap"


Positions.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_client_positions = pytest.mark.slow(Positions.TestCase)
