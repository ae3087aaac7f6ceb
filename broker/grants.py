"""What a connection may do with topics: its grants (sans-I/O).

Four rights, each a set of topics given as patterns allowed less patterns denied:

- `subscribe`: receive a topic's messages (`sub`);
- `history`: recover them from history (`sub` with `since` or `last`); by default the same
  as subscribe;
- `respond`: answer a topic's requests (`sub` with `respond`); by default the same as subscribe
  (a server may make it none instead: `auth_respond_follows_subscribe`);
- `publish`: `pub` and `req`.

A token's claim for a right is a list of patterns (all allowed), or `{"allow": [...], "deny":
[...]}`: a topic is granted when an allowed pattern matches it and no denied one does, in
whatever order they are listed.

A subscription wider than the grants is narrowed to what they grant: a client allowed
`md.NASDAQ.*` that subscribes to `md.>` holds `md.NASDAQ.*` in the broker; one allowed `md.>`
less `md.INTERNAL.>` holds `md.> !md.INTERNAL.>` (a subscription string with exclusions, see
broker.topics), and so never receives md.INTERNAL.X.
"""

from __future__ import annotations

from typing import Any

from .errors import BrokerError
from .topics import covers, excluding, intersect, matches, parts_of, validate_pattern

_CACHE_LIMIT = 4096  # topics whose publish permission a connection remembers


class ClaimError(BrokerError, ValueError):
    """A claim that is not a list of patterns or an allow/deny object: says which and why,
    never quoting more than a pattern's first 64 characters."""


class Rights:
    """Topics given as patterns `allow`ed less patterns `deny`ed."""

    __slots__ = ("allow", "deny")

    def __init__(self, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> None:
        self.allow = tuple(dict.fromkeys(allow))
        self.deny = tuple(dict.fromkeys(deny))

    def allows(self, topic: str) -> bool:
        return any(matches(p, topic) for p in self.allow) and not any(matches(p, topic) for p in self.deny)

    def narrow(self, pattern: str) -> list[str]:
        """What a subscription to `pattern` holds in the broker: for each allowed pattern it
        overlaps, the intersection less every denied pattern that cuts into it (none when a
        denied pattern covers it all); without repeats. Empty: it may receive nothing."""
        out: dict[str, None] = {}
        for grant in self.allow:
            both = intersect(pattern, grant)
            if both is None:
                continue
            cut = []
            for denied in self.deny:
                part = intersect(both, denied)
                if part is None:
                    continue
                if covers(denied, both):
                    break
                cut.append(part)
            else:
                out[excluding(both, cut)] = None
        return list(out)

    def covers(self, key: str) -> bool:
        """True when every topic of the subscription string `key` is granted: one allowed
        pattern covers its pattern, and each denied pattern that cuts into it is cut out of it
        already (a sound test: it may say no to a key that several allowed patterns cover
        together)."""
        pattern, excluded = parts_of(key)
        if not any(covers(grant, pattern) for grant in self.allow):
            return False
        for denied in self.deny:
            part = intersect(pattern, denied)
            if part is not None and not any(covers(cut, part) for cut in excluded):
                return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rights) and (set(self.allow), set(self.deny)) == (set(other.allow), set(other.deny))

    def __repr__(self) -> str:
        return f"Rights(allow={list(self.allow)}, deny={list(self.deny)})" if self.deny else repr(list(self.allow))


NOTHING = Rights()


def _shape(claim: str) -> str:
    return f'the {claim} claim must be a list of topic patterns, or {{"allow": [...], "deny": [...]}}'


def _list(value: Any, claim: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ClaimError(_shape(claim))
    for pattern in value:
        try:
            validate_pattern(pattern)
        except Exception:
            raise ClaimError(f"the {claim} claim holds an invalid pattern {pattern[:64]!r}") from None
    return tuple(value)


def rights_of(value: Any, claim: str) -> Rights | None:
    """The rights a claim's value grants (None: the claim is absent)."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) - {"allow", "deny"}:
            raise ClaimError(_shape(claim))
        return Rights(_list(value.get("allow", []), claim), _list(value.get("deny", []), claim))
    return Rights(_list(value, claim))


def split_patterns(text: str) -> tuple[str, ...]:
    """A comma-separated list of patterns from a setting, each validated."""
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    for pattern in out:
        validate_pattern(pattern)
    return out


def _rights(value: Rights | tuple[str, ...]) -> Rights:
    return value if isinstance(value, Rights) else Rights(tuple(value))


def _optional_rights(value: Rights | tuple[str, ...] | None) -> Rights | None:
    return None if value is None else _rights(value)


class Grants:
    """A connection's four rights (see the module). `history` and `respond` None: the same as
    `subscribe`."""

    __slots__ = ("subscribe", "publish", "history", "respond", "_published")

    def __init__(
        self,
        subscribe: Rights | tuple[str, ...],
        publish: Rights | tuple[str, ...],
        history: Rights | tuple[str, ...] | None = None,
        respond: Rights | tuple[str, ...] | None = None,
    ) -> None:
        self.subscribe = _rights(subscribe)
        self.publish = _rights(publish)
        self.history = _optional_rights(history)
        self.respond = _optional_rights(respond)
        self._published: dict[str, bool] = {}

    def subscriptions_for(self, pattern: str) -> list[str]:
        """What a subscription to `pattern` holds in the broker (Rights.narrow of subscribe)."""
        return self.subscribe.narrow(pattern)

    def may_recover(self, held: list[str]) -> bool:
        """Whether the history right covers every topic of a subscription holding `held`."""
        history = self.history
        return history is None or all(history.covers(key) for key in held)

    def may_respond(self, topic: str) -> bool:
        return (self.subscribe if self.respond is None else self.respond).allows(topic)

    def may_publish(self, topic: str) -> bool:
        known = self._published.get(topic)
        if known is None:
            if len(self._published) >= _CACHE_LIMIT:
                self._published.clear()
            known = self._published[topic] = self.publish.allows(topic)
        return known

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grants) and (self.subscribe, self.publish, self.history, self.respond) == (
            other.subscribe,
            other.publish,
            other.history,
            other.respond,
        )

    def __repr__(self) -> str:
        return f"Grants(subscribe={self.subscribe!r}, publish={self.publish!r}, history={self.history!r}, respond={self.respond!r})"
