"""What the dashboard shows, kept so that watching costs the delivery path a bounded slice.

A snapshot is built once a second for each open dashboard from counters the broker keeps
anyway (O(1)); the hottest topics come from `HotTopics`, which looks at a bounded slice of the
topics at a time (SLICE_TOPICS every SLICE_INTERVAL_S, only while a dashboard is open) and
measures each topic's rate between two of its visits. With 100,000 topics a pass over all of
them takes 10 s, in slices of well under a millisecond, instead of a pass over all of them
every second for every dashboard, which held the event loop for 20 to 50 ms each time.

Sans-I/O: the admin server calls `scan` from its timer, and gives the clock.
"""

from __future__ import annotations

import heapq
from array import array

SLICE_TOPICS = 1000  # topics looked at per slice
SLICE_INTERVAL_S = 0.1  # between two slices: at most 10,000 topics a second
MIN_WINDOW_S = 1.0  # a topic's rate is measured over at least this long
CANDIDATES = 100  # topics with a rate kept, the fastest


class HotTopics:
    """The topics with the highest message rates, measured a slice at a time: each topic's
    rate is (its sequence number now - at its previous measure) / the time between them,
    measured when a slice visits it at least MIN_WINDOW_S after its previous measure."""

    def __init__(self) -> None:
        self._cursor = 0  # the next topic id a slice looks at
        self._seq = array("q")  # by topic id: its sequence number at its last measure (-1: none)
        self._at = array("d")  # and when
        self._rates: dict[int, tuple[float, str, int]] = {}  # topic id -> (rate, name, seq)
        self.visited = 0  # topics looked at, in all

    def scan(self, states: list, now: float, budget: int = SLICE_TOPICS) -> None:
        """Look at the next `budget` topics of `states` (the index's list by topic id, None
        for a retired one), going round them over successive calls."""
        count = len(states)
        if not count:
            return
        if len(self._seq) < count:
            grow = count - len(self._seq)
            self._seq.extend([-1] * grow)
            self._at.extend([0.0] * grow)
        rates, seqs, ats = self._rates, self._seq, self._at
        cursor = self._cursor
        steps = min(budget, count)
        for _ in range(steps):
            if cursor >= count:
                cursor = 0
            state = states[cursor]
            i = cursor
            cursor += 1
            if state is None:
                rates.pop(i, None)
                continue
            seq = state.seq
            previous = seqs[i]
            if previous < 0 or seq < previous:  # first seen, or a new epoch numbered from 1
                seqs[i] = seq
                ats[i] = now
                rates.pop(i, None)
                continue
            elapsed = now - ats[i]
            if elapsed < MIN_WINDOW_S:
                continue
            seqs[i] = seq
            ats[i] = now
            if seq > previous:
                rates[i] = ((seq - previous) / elapsed, state.name, seq)
            else:
                rates.pop(i, None)
        self._cursor = cursor
        self.visited += steps
        if len(rates) > 2 * CANDIDATES:
            kept = heapq.nlargest(CANDIDATES, rates.items(), key=lambda item: item[1][0])
            self._rates = dict(kept)

    def hottest(self, n: int) -> list[dict]:
        """The `n` topics with the highest rates, fastest first: `topic`, `rate` (messages a
        second), `seq` (at its last measure)."""
        top = heapq.nlargest(n, self._rates.values())
        return [{"topic": name, "rate": round(rate, 1), "seq": seq} for rate, name, seq in top]
