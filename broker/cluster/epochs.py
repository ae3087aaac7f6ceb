"""What a node knows of each shard's epoch and write count, and what follows from it (sans-I/O).

Every entry of a shard's stream carries its epoch and its write count `c`, the number of
entries appended to the shard in that epoch up to it (broker.cluster.scripts). In one epoch
the stream's order is the order of those counts, so a node reading the stream sees them rise.
A node knows, per shard, the latest (epoch, count) it has seen: in an entry it read, in the
reply to a write, or in a check. The scripts compare Redis with it on every write and check;
the reader compares every entry with the last one it read. An entry of the epoch being read
whose count is not above the last one's was written after Redis went back in time by a node
that did not know: its numbers are ones the node may have delivered already with other
messages. Nothing more of that epoch is delivered; the shard is checked, which starts a new
epoch unless one was started already, and the old epoch ends for every receiver.
"""

from __future__ import annotations

# The write count a node claims to know of after it read a repeated one: above anything Redis
# can hold, so that the next check starts a new epoch if Redis is still in the old one (and
# within Lua's exact integers).
FORKED = 1 << 53

# What to do with an entry read (`ShardEpochs.entry`).
DELIVER = 0  # hand its batches to the router
SKIP = 1  # of an epoch that ended here: drop it
NEW_EPOCH = 2  # the shard continues in the entry's epoch: end the old one, then deliver it
REPEAT = 3  # Redis went back in time: drop it, and check the shard (its epoch ends)


class ShardEpochs:
    """Per shard: the epoch this node delivers in, the latest (epoch, write count) it knows,
    the write count of the last entry it read, whether the epoch was found repeated, and the
    shards to check."""

    __slots__ = ("epochs", "known", "read", "repeated", "unchecked")

    def __init__(self, shards: int) -> None:
        self.epochs = [0] * shards
        self.known: list[tuple[int, int]] = [(0, 0)] * shards
        self.read = [0] * shards
        self.repeated = [False] * shards
        self.unchecked: set[int] = set()

    def know(self, shard: int, epoch: int, count: int) -> None:
        """Redis held (epoch, count) of the shard at some point (a write's or a check's reply)."""
        if (epoch, count) > self.known[shard]:
            self.known[shard] = (epoch, count)

    def entry(self, shard: int, epoch: int, count: int) -> int:
        """What to do with an entry read of (epoch, count); count 0: an entry without one
        (written by an older broker), taken as it comes. After NEW_EPOCH the caller ends the
        old epoch, calls `move`, and asks again."""
        current = self.epochs[shard]
        if epoch != current:
            return SKIP if epoch < current else NEW_EPOCH
        if self.repeated[shard]:
            return SKIP
        if count:
            if count <= self.read[shard]:
                self.repeated[shard] = True
                self.known[shard] = (epoch, FORKED)
                self.unchecked.add(shard)
                return REPEAT
            self.read[shard] = count
            self.know(shard, epoch, count)
        return DELIVER

    def move(self, shard: int, epoch: int) -> None:
        """The shard continues in `epoch` (later than the one delivered in)."""
        self.epochs[shard] = epoch
        self.read[shard] = 0
        self.repeated[shard] = False
        self.know(shard, epoch, 0)

    def checked(self, shard: int, epoch: int, count: int) -> bool:
        """A check's reply: the shard is in (epoch, count). True when that is a later epoch
        than the one delivered in: the caller ends the old one (after `move`)."""
        self.unchecked.discard(shard)
        self.know(shard, epoch, count)
        return epoch > self.epochs[shard]
