"""The Python client's subscription index: which of its own few subscriptions a delivered
topic matches (`lookup`, cached per topic; a pattern change clears the cache).

Part of the client's sans-I/O core (broker.client.protocol routes each delivered batch through
it). The broker's index, built for many connections and for patterns no client can make
expensive for the others, is the compiled `fastpath.Index`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Literal, TypeVar, overload

from ..topics import is_pattern

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

    @overload
    def _walk(self, pattern: str, create: Literal[True]) -> dict: ...
    @overload
    def _walk(self, pattern: str, create: Literal[False]) -> dict | None: ...

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
