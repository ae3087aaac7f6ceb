"""The `since` of a `sub`: its form checked, and the positions in it checked against the
topics' numbers, before the subscription takes effect (broker.recovery replays from them).

A topic's since is [epoch, seq]; a pattern's is [time_ms, {topic: [epoch, seq], ...}], at most
MAX_SINCE_TOPICS topics, each one the pattern matches. Every position checked counts in the
router's budget (`Router.recovering`), so a long map cannot hold the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ErrorCode, RequestError
from .messages import MAX_SINCE_TOPICS
from .topics import is_pattern, key_matches, matches, validate_topic

if TYPE_CHECKING:
    from .router import Router

MAX_ID = 2**63 - 1  # the largest epoch, sequence number or time a position may hold


def position(value: object, what: str) -> tuple[int, int]:
    """`value` as (epoch, seq), or RequestError(BAD_MESSAGE) naming it `what`."""
    if not (type(value) is list and len(value) == 2 and all(type(x) is int and 0 <= x <= MAX_ID for x in value)):
        raise RequestError(ErrorCode.BAD_MESSAGE, f"{what} is [epoch, seq], two integers from 0 to 2^63-1")
    return value[0], value[1]


def check_since(pattern: str, since: list, router: Router, within: list[str] | None = None) -> tuple:
    """Check a `sub`'s since and return it as (epoch, seq) for a topic or (time_ms,
    {topic: (epoch, seq)}) for a pattern.

    `within`: the patterns the subscription holds when grants narrowed it. A topic of the map
    outside them is checked for its form only and left out: nothing about it (whether it
    exists, its sequence) is looked at, so the answer is the same for a topic the connection
    may not see and for one that does not exist."""
    if not is_pattern(pattern):
        epoch, seq = position(since, "since")
        state = router.topics.get(pattern)
        if state is not None and epoch == state.epoch and seq > state.seq and router.sequencer is None:
            raise RequestError(
                ErrorCode.BAD_POSITION, f"since [{epoch}, {seq}] is ahead of the topic: its last sequence number is {state.seq}"
            )
        if not epoch and seq:
            raise RequestError(ErrorCode.BAD_POSITION, "since [0, seq] needs seq 0 (from the start of the current epoch)")
        return epoch, seq
    if not (type(since) is list and len(since) == 2 and type(since[0]) is int and 0 <= since[0] <= MAX_ID and type(since[1]) is dict):
        raise RequestError(ErrorCode.BAD_MESSAGE, "since for a pattern is [time_ms, {topic: [epoch, seq], ...}]")
    if len(since[1]) > MAX_SINCE_TOPICS:
        raise RequestError(ErrorCode.BAD_MESSAGE, f"since names {len(since[1])} topics; the limit is {MAX_SINCE_TOPICS}")
    positions: dict[str, tuple[int, int]] = {}
    checked = 0
    try:
        for name, value in since[1].items():
            checked += 1
            if type(name) is not str:
                raise RequestError(ErrorCode.BAD_MESSAGE, "since for a pattern maps topic names to [epoch, seq]")
            validate_topic(name, router.max_topic_length, need="a since map key")
            if not matches(pattern, name):
                raise RequestError(ErrorCode.BAD_POSITION, f"since names topic {name!r}, which {pattern!r} does not match")
            epoch, seq = position(value, f"since of {name!r}")
            if within is not None and not any(key_matches(held, name) for held in within):
                continue
            state = router.topics.get(name)
            if state is not None and epoch == state.epoch and seq > state.seq and router.sequencer is None:
                raise RequestError(
                    ErrorCode.BAD_POSITION,
                    f"since of {name!r} [{epoch}, {seq}] is ahead of the topic: its last sequence number is {state.seq}",
                )
            positions[name] = (epoch, seq)
    finally:
        # every position checked, refused, passed over (outside the grants) or kept: each
        # costs the same checks (the recovery counts the kept ones' topics again)
        router.recovering(checked)
    return since[0], positions
