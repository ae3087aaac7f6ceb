"""Topic ids: small numbers, unique in one server run, in an order that tells a client little.

Deliveries name their topic by an id (protocol.md 3.2, `topic`), announced to each connection,
and shared by every connection (frames are encoded once for all of them). Numbered 0, 1, 2, ...
as topics appear, the first id a new connection saw would tell how many topics the broker had
ever created, and two ids seen some time apart how many were created in between. So ids are
handed out by blocks that double: the first FIRST_BLOCK topics get the ids below FIRST_BLOCK,
then topic n gets an id in [2^k, 2^(k+1)) for the k with 2^k <= n < 2^(k+1), each block's ids in
an order drawn from a keyed permutation (a Feistel network with a random key of this process,
BLAKE2b rounds). An id then tells only the power of two below which the number of topics ever
created lies, and ids stay below twice that number: a client may still keep its table in an
array indexed by id.
"""

from __future__ import annotations

import hashlib
import os

FIRST_BLOCK = 64  # ids of the first topics, in one block (a power of two, with an even exponent)
_ROUNDS = 4


class TopicIds:
    """The ids of a server run's topics, one per call of `next()`; never the same twice."""

    __slots__ = ("count", "_keyed")

    def __init__(self, key: bytes | None = None) -> None:
        self.count = 0  # ids handed out
        self._keyed = hashlib.blake2b(key=key if key is not None else os.urandom(16), digest_size=8)

    def next(self) -> int:
        n = self.count
        self.count = n + 1
        if n < FIRST_BLOCK:
            start = 0
            size = FIRST_BLOCK
        else:
            start = size = 1 << (n.bit_length() - 1)
        return start + self._permute(n - start, start, size)

    def _permute(self, index: int, start: int, size: int) -> int:
        """The place of `index` in the permutation of range(size) (`size` a power of two): a
        Feistel network over the smallest even number of bits that holds it, walked again while
        the result falls outside (at most a few times, on average under two)."""
        bits = size.bit_length() - 1
        bits += bits & 1
        tweak = start.to_bytes(8, "little")  # each block its own permutation
        value = self._feistel(index, bits, tweak)
        while value >= size:
            value = self._feistel(value, bits, tweak)
        return value

    def _feistel(self, value: int, bits: int, tweak: bytes) -> int:
        half = bits >> 1
        mask = (1 << half) - 1
        left, right = value >> half, value & mask
        for round_ in range(_ROUNDS):
            h = self._keyed.copy()
            h.update(tweak + bytes((round_,)) + right.to_bytes(8, "little"))
            left, right = right, left ^ (int.from_bytes(h.digest(), "little") & mask)
        return (left << half) | right
