"""The benchmark scenarios: topics, subscriber connections and how they are published to."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

SEED = 20260101  # random subscriptions are the same in every run


@dataclass
class Scenario:
    key: str
    title: str
    topics: list[str]
    subscribers: list[list[str]]  # the patterns of each subscriber connection
    payload: int = 100
    batch: int = 256  # publishes per frame (closed loop)
    window: int = 0  # deliveries in flight, summed over subscribers; 0: 256 KiB of payload per subscriber
    rate: float = 0.0  # publishes/s; 0 = closed loop
    duration: float = 5.0
    skip: tuple[str, ...] = ()  # systems this scenario is not run against (the runner says so)
    warmup: float = 0.0  # at least this many seconds of warm-up, whatever --warmup says
    broker: dict = field(default_factory=dict)  # broker settings past a default limit the scenario needs

    def __post_init__(self) -> None:
        if not self.window:
            self.window = max(2000, len(self.subscribers) * (256 << 10) // (self.payload + 32))

    @property
    def latency(self) -> bool:
        return self.rate > 0


def random_subscribers(topics: list[str], count: int, each: int, rng: random.Random) -> list[list[str]]:
    return [[topics[i] for i in sorted(rng.sample(range(len(topics)), each))] for _ in range(count)]


def scenarios() -> dict[str, Scenario]:
    rng = random.Random(SEED)
    md1k = [f"md.x.{i}" for i in range(1000)]
    md5k = [f"md.x.{i}" for i in range(5000)]
    md10k = [f"md.x.{i}" for i in range(10000)]
    many = [f"bench.t{i}" for i in range(100)]
    out = [
        Scenario("a", "fan-out: 1 topic, 100 subscribers", ["bench.t0"], [["bench.t0"]] * 100, batch=200),
        # 1,000 subscriber connections and the publisher, all from 127.0.0.1: past the broker's
        # default max_connections_per_ip (1,000)
        Scenario(
            "b",
            "many topics: 100 topics x 10 subscribers (exact)",
            many,
            [[t] for t in many for _ in range(10)],
            batch=400,
            broker={"max_connections_per_ip": 1100},
        ),
        Scenario("w1k", "wildcard: 1,000 topics md.x.N, 100 subscribers on md.>", md1k, [["md.>"]] * 100),
        Scenario("w10k", "wildcard: 10,000 topics md.x.N, 100 subscribers on md.>", md10k, [["md.>"]] * 100),
        # the broker's default max_topics; each topic gets one message in 390 frames: a tick
        # touches 256 of 100,000 topics. Not with bun, whose subscribers would need 100,000
        # subscriptions each, nor naive, whose table of subscribers is rebuilt per topic
        # warm-up: the first cycle over the topics (each announced once to each subscriber, 10
        # million announcements) is not what the scenario measures. The publisher creates the
        # 100,000 topics in its first cycle (well under a second): past new_topic_burst (10,000)
        # and new_topic_rate (1,000 a second), per connection and per address, so the scenario
        # raises both bursts
        Scenario(
            "w100k",
            "wildcard: 100,000 topics md.x.N, 100 subscribers on md.>",
            [f"md.x.{i}" for i in range(100_000)],
            [["md.>"]] * 100,
            skip=("bun", "naive"),
            warmup=6.0,
            broker={"new_topic_burst": 100_000, "ip_new_topic_burst": 100_000},
        ),
        Scenario(
            "mixed",
            "mixed: 1,000 topics, 50 subscribers on md.>, 50 on 20 random topics each",
            md1k,
            [["md.>"]] * 50 + random_subscribers(md1k, 50, 20, rng),
        ),
        Scenario(
            "ticker",
            "ticker: 5,000 topics, 200,000 publishes/s, 100 subscribers on 50 random topics each",
            md5k,
            random_subscribers(md5k, 100, 50, rng),
            rate=200_000,
        ),
        # one subscriber process on md.> over 1,000 topics: what one client process takes (the
        # TypeScript client in Node or Bun, --clients client-node / client-bun / client-node-sse,
        # against fleet.js's own decoder, --clients real), and its latency at a fixed rate
        Scenario("c1k", "one client: 1,000 topics md.x.N, 1 subscriber on md.>", md1k, [["md.>"]]),
        Scenario("cd", "latency: one client on md.> over 1,000 topics, 20,000 publishes/s", md1k, [["md.>"]], rate=20000),
        Scenario("d5", "latency: 100 subscribers, 5,000 publishes/s", ["bench.t0"], [["bench.t0"]] * 100, rate=5000),
        # the cost of the Redis backplane at a low and at a high rate (commands per published
        # message): w1k's topics at a fixed rate (10 subscribers at 100,000/s: 1 M deliveries a second,
        # which one client process keeps up with)
        Scenario("r1k5", "rate: 1,000 topics md.x.N, 1,500 publishes/s, 100 subscribers on md.>", md1k, [["md.>"]] * 100, rate=1500),
        Scenario("r100k", "rate: 1,000 topics md.x.N, 100,000 publishes/s, 10 subscribers on md.>", md1k, [["md.>"]] * 10, rate=100_000),
        Scenario("d20", "latency: 100 subscribers, 20,000 publishes/s", ["bench.t0"], [["bench.t0"]] * 100, rate=20000),
        Scenario("e", "large payloads: 16 KiB, 10 subscribers", ["bench.t0"], [["bench.t0"]] * 10, payload=16384, batch=16),
    ]
    return {sc.key: sc for sc in out}


def prefixed(sc: Scenario, prefix: str) -> Scenario:
    """The scenario with every topic and pattern under `prefix` (`PREFIX.bench.t0`, `PREFIX.md.>`):
    a run on a shared broker stays apart from other traffic, and within a token's grants."""
    if not prefix:
        return sc
    return dataclasses.replace(
        sc, topics=[f"{prefix}.{t}" for t in sc.topics], subscribers=[[f"{prefix}.{p}" for p in patterns] for patterns in sc.subscribers]
    )


def bad_prefix(prefix: str) -> str:
    """Why `prefix` cannot go before the scenarios' topics ("" when it can)."""
    tokens = prefix.split(".")
    if any(not token for token in tokens):
        return "empty token (two dots, or a dot at either end)"
    if any(token in ("*", ">") for token in tokens):
        return "a wildcard token (* or >)"
    if any(c.isspace() for c in prefix):
        return "white space"
    return ""


def matches(pattern: str, topic: str) -> bool:
    """Subject matching of the broker, NATS and the peers: tokens split on ".", "*" matches one
    token, a final ">" one or more."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


def matching(patterns_of: list[list[str]], topics: list[str]) -> list[list[int]]:
    """For each connection, the indexes of the topics its patterns match (computed once per
    distinct pattern list)."""
    cache: dict[tuple[str, ...], list[int]] = {}
    out = []
    for patterns in patterns_of:
        key = tuple(patterns)
        if key not in cache:
            wanted = set(patterns)
            cache[key] = [i for i, t in enumerate(topics) if t in wanted or any(matches(p, t) for p in patterns if ">" in p or "*" in p)]
        out.append(cache[key])
    return out


def expand(patterns: list[str], topics: list[str], wildcards: bool) -> list[str]:
    """The subscriptions a system gets for `patterns`: as they are, or (a system without
    wildcards) every topic they match."""
    if wildcards:
        return patterns
    return [topics[i] for i in matching([patterns], topics)[0]]
