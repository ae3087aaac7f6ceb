"""Token buckets: the one a rate is enforced with, and the ones an address's or a user's
connections share.

- `TokenBucket`: `rate` tokens a second, at most `burst` of them, refilled from a monotonic
  clock whenever it is read: O(1), no timers.
- `AddressBuckets`, `UserBuckets`: the connections of one IP address or one user, counted,
  and the buckets all of them are charged to (broker.limits.Guard holds them while they have
  connections, and after until their buckets are full again).
- `amount` and `plural`: rates and counts as the texts of refusals write them.

Part of the sans-I/O core: it reads a clock it is given and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import Config


def amount(value: float) -> str:
    """A rate or burst as people write it: 1,000 or 2.5."""
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def plural(value: float, noun: str) -> str:
    """`value` `noun`s: 1 message, 1,000 messages."""
    return f"{amount(value)} {noun}" if value == 1 else f"{amount(value)} {noun}s"


class TokenBucket:
    """`rate` tokens a second, at most `burst` of them; full when made. Reading the level
    refills it from `clock`; nothing runs in between. `name` is the setting it enforces and
    `text` what a client whose message it refuses is told."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock", "name", "text")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic, name: str = "", text: str = "") -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()
        self.name = name
        self.text = text

    def level(self, now: float | None = None) -> float:
        """The tokens there are now (the bucket is refilled for the time since it was read)."""
        if now is None:
            now = self.clock()
        tokens = self.tokens
        if now > self.stamp:  # (a bucket made after `now` was read is not refilled for it)
            tokens += (now - self.stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.tokens = tokens
            self.stamp = now
        return tokens

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        """Take `n` tokens if there are that many; False (and nothing taken) otherwise."""
        if self.level(now) >= n:
            self.tokens -= n
            return True
        return False

    def full(self, now: float) -> bool:
        """True when the bucket is full at `now` (without reading it)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class AddressBuckets:
    """The connections from one IP address and the new-topic bucket they share."""

    __slots__ = ("connections", "new_topic")

    def __init__(self, ip: str, cfg: Config, clock: Callable[[], float]) -> None:
        self.connections = 0
        self.new_topic = None
        if cfg.ip_new_topic_rate:
            self.new_topic = TokenBucket(
                cfg.ip_new_topic_rate,
                cfg.ip_new_topic_burst,
                clock,
                "ip_new_topic_rate",
                f"rate limited: the connections from {ip} may create {plural(cfg.ip_new_topic_rate, 'new topic')} a second "
                f"together (ip_new_topic_rate, burst {amount(cfg.ip_new_topic_burst)})",
            )

    def full(self, now: float) -> bool:
        """True when forgetting the address loses nothing: its bucket is full again."""
        return self.new_topic is None or self.new_topic.full(now)


class UserBuckets:
    """A user's connections and the buckets all of them share."""

    __slots__ = ("connections", "publish", "new_topic")

    def __init__(self, name: str, cfg: Config, clock: Callable[[], float]) -> None:
        self.connections = 0
        self.publish = self.new_topic = None
        if cfg.user_publish_rate:
            self.publish = TokenBucket(
                cfg.user_publish_rate,
                cfg.user_publish_burst,
                clock,
                "user_publish_rate",
                f"rate limited: user {name!r} may publish {plural(cfg.user_publish_rate, 'message')} a second over all "
                f"its connections (user_publish_rate, burst {amount(cfg.user_publish_burst)})",
            )
        if cfg.user_new_topic_rate:
            self.new_topic = TokenBucket(
                cfg.user_new_topic_rate,
                cfg.user_new_topic_burst,
                clock,
                "user_new_topic_rate",
                f"rate limited: user {name!r} may create {plural(cfg.user_new_topic_rate, 'new topic')} a second over all "
                f"its connections (user_new_topic_rate, burst {amount(cfg.user_new_topic_burst)})",
            )

    def full(self, now: float) -> bool:
        """True when forgetting the user loses nothing: its buckets are full again."""
        return all(bucket is None or bucket.full(now) for bucket in (self.publish, self.new_topic))
