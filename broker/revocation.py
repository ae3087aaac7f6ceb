"""Revoked tokens: by token id (`jti`), all of a user's, or all issued before a time.

The rules come from the denylist file (`auth_denylist_file`), one per line, and from the admin
API (`POST /api/revocations`, which adds them to that file when there is one):

    t-123                       the token whose jti is t-123 (as before)
    jti:t-123                   the same, for an id that starts like another rule
    user:mallory                every token of the user mallory (auth_user_claim)
    user:alice before:1767225600  alice's tokens issued (iat) before that Unix time
    before:1767225600           every token issued before that time

A time rule also revokes tokens that carry no `iat` (nothing shows they were issued after it).
Blank lines and lines starting with `#` are ignored. Sans-I/O: parsing and matching only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import BrokerError

JTI, USER, BEFORE = "jti:", "user:", "before:"
_USER_BEFORE = " " + BEFORE


class RuleError(BrokerError, ValueError):
    """A line that is no rule: the text says which and why."""


def _time(text: str, line: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RuleError(f"{line!r}: {BEFORE} takes a Unix time in seconds, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise RuleError(f"{line!r}: {BEFORE} takes a Unix time in seconds, not {text!r}")
    return value


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(float(value))


def rule_line(jti: str | None = None, user: str | None = None, before: float | None = None) -> str:
    """The denylist line of a rule (what the admin API appends); ValueError for no rule, or
    a jti with a user or a time."""
    if jti is not None:
        if user is not None or before is not None:
            raise ValueError("a jti rule names the token alone: give jti, or user and/or issued_before")
        line = JTI + jti
    elif user is not None:
        line = USER + user + (_USER_BEFORE + _seconds(before) if before is not None else "")
    elif before is not None:
        line = BEFORE + _seconds(before)
    else:
        raise ValueError("give jti, user, or issued_before")
    if "\n" in line or "\r" in line or not line.strip() or line.lstrip().startswith("#"):
        raise ValueError("a rule is one line")
    Denylist().add(line)  # checks it
    return line


class Denylist:
    """The rules in force; `revoked(jti, user, issued)` is O(1)."""

    __slots__ = ("jtis", "users", "before")

    def __init__(self) -> None:
        self.jtis: set[str] = set()
        self.users: dict[str, float] = {}  # user -> tokens issued before this time are revoked (inf: all)
        self.before = 0.0  # every token issued before this time is revoked

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Denylist:
        """The rules of a file's lines; RuleError (naming the line number) for a bad one."""
        out = cls()
        for number, line in enumerate(lines, 1):
            try:
                out.add(line)
            except RuleError as exc:
                raise RuleError(f"line {number}: {exc}") from None
        return out

    def add(self, line: str) -> None:
        text = line.strip()
        if not text or text.startswith("#"):
            return
        if text.startswith(JTI):
            self.jtis.add(text[len(JTI) :])
        elif text.startswith(USER):
            user, sep, when = text[len(USER) :].rpartition(_USER_BEFORE)
            if not sep:
                user, cutoff = text[len(USER) :], math.inf
            else:
                cutoff = _time(when, text)
            if not user:
                raise RuleError(f"{text!r}: {USER} names a user")
            self.users[user] = max(self.users.get(user, 0.0), cutoff)
        elif text.startswith(BEFORE):
            self.before = max(self.before, _time(text[len(BEFORE) :], text))
        else:
            self.jtis.add(text)

    def merge(self, other: Denylist) -> Denylist:
        out = Denylist()
        out.jtis = self.jtis | other.jtis
        out.users = dict(self.users)
        for user, cutoff in other.users.items():
            out.users[user] = max(out.users.get(user, 0.0), cutoff)
        out.before = max(self.before, other.before)
        return out

    def revoked(self, jti: str | None, user: str | None, issued: float | None) -> bool:
        """Whether a token with this id, user and issue time (None: no iat) is revoked."""
        if jti is not None and jti in self.jtis:
            return True
        cutoff = self.before
        if user is not None:
            cutoff = max(cutoff, self.users.get(user, 0.0))
        return cutoff > 0.0 and (issued is None or issued < cutoff)

    def __bool__(self) -> bool:
        return bool(self.jtis or self.users or self.before)
