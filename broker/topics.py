"""Topic names, wildcard patterns and the subscription index.

A topic is one or more dot-separated tokens (`md.NASDAQ.AAPL`). A pattern may also use `*` for
exactly one token and `>` for one or more trailing tokens (`md.*.AAPL`, `md.>`). Tokens are
non-empty and made of printable ASCII other than `.`, `*`, `>` and space.

`SubscriptionIndex` is the client's: which of its own few subscriptions a delivered topic
matches (`lookup`, cached per topic; a pattern change clears the cache). The broker's index,
built for many connections and patterns no client can make expensive for the others, is the
compiled `fastpath.Index`.
"""

from __future__ import annotations

import re
from typing import Generic, Hashable, TypeVar

from .errors import TopicError

DEFAULT_MAX_TOPIC_LENGTH = 255
MAX_TOKENS = 32

_TOKEN = re.compile(r"[!-)+-\-/-=?-~]+")  # 0x21-0x7e without '*' (0x2a), '.' (0x2e), '>' (0x3e)


def validate_topic(topic: str, max_length: int = DEFAULT_MAX_TOPIC_LENGTH, need: str = "publish") -> None:
    """Raise TopicError unless `topic` is a concrete topic name (no wildcards); `need` says
    what needs one, for the error's text ("publish", "a request", ...)."""
    _check(topic, max_length, wildcards=False, need=need)


def validate_pattern(pattern: str, max_length: int = DEFAULT_MAX_TOPIC_LENGTH) -> None:
    """Raise TopicError unless `pattern` is a topic or a valid wildcard pattern."""
    _check(pattern, max_length, wildcards=True, need="")


def is_pattern(name: str) -> bool:
    return "*" in name or ">" in name


def _check(name: str, max_length: int, wildcards: bool, need: str) -> None:
    if not isinstance(name, str):
        raise TopicError("topic must be a string")
    if not name:
        raise TopicError("topic is empty")
    if len(name) > max_length:
        raise TopicError(f"topic is {len(name)} characters long; the limit is {max_length}")
    tokens = name.split(".")
    if len(tokens) > MAX_TOKENS:
        raise TopicError(f"topic has {len(tokens)} tokens; the limit is {MAX_TOKENS}")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if not token:
            raise TopicError(f"topic {name!r} has an empty token at position {i}")
        if token == "*" or token == ">":
            if not wildcards:
                raise TopicError(f"{name!r} is a pattern; {need} needs a concrete topic")
            if token == ">" and i != last:
                raise TopicError(f"pattern {name!r}: '>' must be the last token")
            continue
        if _TOKEN.fullmatch(token) is None:
            raise TopicError(
                f"topic {name!r}: token {token!r} may only hold printable ASCII other than"
                " space, '.', '*' and '>' (wildcards stand alone as a whole token)"
            )


def matches(pattern: str, topic: str) -> bool:
    """True when the concrete `topic` matches `pattern` (which may be a plain topic)."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if token != "*" and token != t[i]:
            return False
    return len(p) == len(t)


def intersect(a: str, b: str) -> str | None:
    """The pattern matching exactly the topics both `a` and `b` match (either may be a plain
    topic), or None when no topic matches both. Patterns are products of per-token sets (`*`
    one token, `>` one or more), so their intersection is one pattern or nothing."""
    x = a.split(".")
    y = b.split(".")
    out = []
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == ">":
            return ".".join(out + y[i:]) if q is not None else None
        if q == ">":
            return ".".join(out + x[i:]) if p is not None else None
        if p is None or q is None:
            return None
        if p == "*":
            out.append(q)
        elif q == "*" or p == q:
            out.append(p)
        else:
            return None
    return ".".join(out)


def covers(outer: str, inner: str) -> bool:
    """True when `outer` matches every topic `inner` matches (either may be a plain topic)."""
    x = outer.split(".")
    y = inner.split(".")
    for i, p in enumerate(x):
        if p == ">":
            return i < len(y)  # one or more tokens left in inner, whatever they are
        if i >= len(y):
            return False
        q = y[i]
        if q == ">" or (p != "*" and (q == "*" or p != q)):
            return False
    return len(x) == len(y)


# A subscription string with exclusions: a pattern, then ` !` and a pattern for each part cut
# out of it (`md.> !md.INTERNAL.>`), what a grant with deny entries narrows a subscription to.
# Patterns hold no space, so the string is read back without doubt.
EXCLUDED = " !"


def excluding(pattern: str, excluded: list[str]) -> str:
    """The subscription string of `pattern` less the topics of `excluded` (in a fixed order)."""
    return pattern + "".join(EXCLUDED + part for part in sorted(set(excluded))) if excluded else pattern


def parts_of(key: str) -> tuple[str, list[str]]:
    """A subscription string's pattern and the patterns cut out of it."""
    pattern, *excluded = key.split(EXCLUDED)
    return pattern, excluded


def key_matches(key: str, topic: str) -> bool:
    """True when the concrete `topic` is among those of the subscription string `key`."""
    if EXCLUDED not in key:
        return matches(key, topic)
    pattern, excluded = parts_of(key)
    return matches(pattern, topic) and not any(matches(part, topic) for part in excluded)


S = TypeVar("S", bound=Hashable)


class _Node:
    __slots__ = ("children", "star", "rest", "here")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None  # child for '*'
        self.rest: dict = {}  # subscribers of a pattern ending in '>' at this depth
        self.here: dict = {}  # subscribers of a pattern ending exactly here (with a '*')

    def empty(self) -> bool:
        return not (self.children or self.star or self.rest or self.here)


class SubscriptionIndex(Generic[S]):
    """Which subscribers receive which topic. Subscribers are any hashable objects.

    Matched subscribers come back as a tuple, each subscriber once even when several of its
    subscriptions match: exact subscribers first in the order they subscribed, then pattern ones."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[S, None]] = {}
        self._root = _Node()
        self._patterns = 0
        self._cache: dict[str, tuple[S, ...]] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self._exact.values()) + self._count(self._root)

    @property
    def cached_topics(self) -> int:
        return len(self._cache)

    def add(self, pattern: str, subscriber: S) -> bool:
        """Add a subscription; False when this subscriber already holds exactly this one."""
        if not is_pattern(pattern):
            subs = self._exact.setdefault(pattern, {})
            if subscriber in subs:
                return False
            subs[subscriber] = None
            self._cache.pop(pattern, None)
            return True
        bucket = self._walk(pattern, create=True)
        if subscriber in bucket:
            return False
        bucket[subscriber] = None
        self._patterns += 1
        self._invalidate(pattern)
        return True

    def remove(self, pattern: str, subscriber: S) -> bool:
        """Drop a subscription; False when it was not there."""
        if not is_pattern(pattern):
            subs = self._exact.get(pattern)
            if subs is None or subscriber not in subs:
                return False
            del subs[subscriber]
            if not subs:
                del self._exact[pattern]
            self._cache.pop(pattern, None)
            return True
        bucket = self._walk(pattern, create=False)
        if bucket is None or subscriber not in bucket:
            return False
        del bucket[subscriber]
        self._patterns -= 1
        self._prune(pattern)
        self._invalidate(pattern)
        return True

    def lookup(self, topic: str) -> tuple[S, ...]:
        """Subscribers of the concrete `topic`, from the cache when possible."""
        hit = self._cache.get(topic)
        if hit is None:
            hit = self._cache[topic] = self._match(topic)
        return hit

    def forget(self, topic: str) -> None:
        """Drop the cached answer for `topic` (for callers that retire topics)."""
        self._cache.pop(topic, None)

    def _match(self, topic: str) -> tuple[S, ...]:
        found: dict[S, None] = dict(self._exact.get(topic, ()))
        if self._patterns:
            self._collect(self._root, topic.split("."), 0, found)
        return tuple(found)

    def _collect(self, node: _Node, tokens: list[str], i: int, found: dict) -> None:
        if node.rest and i < len(tokens):
            found.update(node.rest)
        if i == len(tokens):
            found.update(node.here)
            return
        child = node.children.get(tokens[i])
        if child is not None:
            self._collect(child, tokens, i + 1, found)
        if node.star is not None:
            self._collect(node.star, tokens, i + 1, found)

    def _walk(self, pattern: str, create: bool) -> dict | None:
        """The subscriber dict of `pattern`'s trie position (created when `create`), or None."""
        node = self._root
        for token in pattern.split("."):
            if token == ">":
                return node.rest
            if token == "*":
                if node.star is None:
                    if not create:
                        return None
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(token)
                if nxt is None:
                    if not create:
                        return None
                    nxt = node.children[token] = _Node()
                node = nxt
        return node.here

    def _prune(self, pattern: str) -> None:
        """Remove trie nodes left empty by a removal, so the trie does not grow forever."""
        tokens = pattern.split(".")
        if tokens[-1] == ">":
            tokens = tokens[:-1]
        chain = [self._root]
        for token in tokens:
            node = chain[-1]
            nxt = node.star if token == "*" else node.children.get(token)
            if nxt is None:
                return
            chain.append(nxt)
        for depth in range(len(tokens), 0, -1):
            node = chain[depth]
            if not node.empty():
                return
            parent, token = chain[depth - 1], tokens[depth - 1]
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]

    def _invalidate(self, pattern: str) -> None:
        # Scanning the cache for the topics a pattern matches would cost O(cached topics) per
        # pattern change; clearing is O(1) and the cache refills lazily, one lookup per topic
        # published afterwards.
        self._cache.clear()

    def _count(self, node: _Node) -> int:
        total = len(node.rest) + len(node.here)
        for child in node.children.values():
            total += self._count(child)
        if node.star is not None:
            total += self._count(node.star)
        return total
