"""Topic names and wildcard patterns: validation, matching, and the algebra grants use.

A topic is one or more dot-separated tokens (`md.NASDAQ.AAPL`). A pattern may also use `*` for
exactly one token and `>` for one or more trailing tokens (`md.*.AAPL`, `md.>`). Tokens are
non-empty and made of printable ASCII other than `.`, `*`, `>` and space.

The broker's subscription index, built for many connections and patterns no client can make
expensive for the others, is the compiled `fastpath.Index`; the Python client's own is
`broker.client.index`.
"""

from __future__ import annotations

import re

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
    out: list[str] = []
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
