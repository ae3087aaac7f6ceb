"""What a node knows of each shard's epoch and write count, and what follows from it (sans-I/O).

Every entry of a shard's stream carries its epoch and its write count `c`, the number of
entries appended to the shard in that epoch up to it (broker.cluster.scripts). In one epoch
the stream's order is the order of those counts, so a node reading the stream sees them rise.
A node knows, per shard, the latest (epoch, count) it has seen: in an entry it read, in the
reply to a write, or in a check. The scripts compare Redis with it on every write and check;
the reader compares every entry with the last one it read, and with the writes the node made
and has not read back yet. An entry of the epoch being read whose count is not above the last
one's, or that holds the count of one of this node's writes without being that write, was
written after Redis went back in time by a node that did not know: its numbers are ones the
node may have delivered or acknowledged already with other messages. Nothing more of that epoch is delivered; the shard is checked, which starts a new
epoch unless one was started already, and the old epoch ends for every receiver.
"""

from __future__ import annotations

from collections import deque

# The write count a node claims to know of after it read a repeated one: above anything Redis
# can hold, so that the next check starts a new epoch if Redis is still in the old one (and
# within Lua's exact integers).
FORKED = 1 << 53

# This node's writes remembered per shard until it reads them back (they are read within
# milliseconds; past this many, the oldest are forgotten).
MAX_WRITTEN = 1024

# What to do with an entry read (`ShardEpochs.entry`).
DELIVER = 0  # hand its batches to the router
SKIP = 1  # of an epoch that ended here: drop it
NEW_EPOCH = 2  # the shard continues in the entry's epoch: end the old one, then deliver it
REPEAT = 3  # Redis went back in time: drop it, and check the shard (its epoch ends)


class ShardEpochs:
    """Per shard: the epoch this node delivers in, the latest (epoch, write count) it knows,
    the write count of the last entry it read, its writes not read back yet, whether the
    epoch was found repeated, and the shards to check."""

    __slots__ = ("epochs", "known", "read", "written", "repeated", "unchecked")

    def __init__(self, shards: int) -> None:
        self.epochs = [0] * shards
        self.known: list[tuple[int, int]] = [(0, 0)] * shards
        self.read = [0] * shards
        self.written: list[deque[tuple[int, int, int]]] = [deque(maxlen=MAX_WRITTEN) for _ in range(shards)]
        self.repeated = [False] * shards
        self.unchecked: set[int] = set()

    def know(self, shard: int, epoch: int, count: int) -> None:
        """Redis held (epoch, count) of the shard at some point (a write's or a check's reply)."""
        if (epoch, count) > self.known[shard]:
            self.known[shard] = (epoch, count)

    def wrote(self, shard: int, epoch: int, count: int, write: int) -> None:
        """This node's write number `write` was appended as (epoch, count)."""
        self.know(shard, epoch, count)
        self.written[shard].append((epoch, count, write))

    def entry(self, shard: int, epoch: int, count: int, write: int = 0) -> int:
        """What to do with an entry read of (epoch, count); `write`: its write number if this
        node wrote it, else 0. Count 0: an entry without one (written by an older broker),
        taken as it comes. After NEW_EPOCH the caller ends the old epoch, calls `move`, and
        asks again."""
        current = self.epochs[shard]
        if epoch != current:
            return SKIP if epoch < current else NEW_EPOCH
        if self.repeated[shard]:
            return SKIP
        if count:
            if count <= self.read[shard] or self._not_mine(shard, epoch, count, write):
                self.repeated[shard] = True
                self.known[shard] = (epoch, FORKED)
                self.unchecked.add(shard)
                return REPEAT
            self.read[shard] = count
            self.know(shard, epoch, count)
        return DELIVER

    def _not_mine(self, shard: int, epoch: int, count: int, write: int) -> bool:
        """True when (epoch, count) is one of this node's writes and the entry is another."""
        written = self.written[shard]
        while written and written[0][:2] < (epoch, count):
            written.popleft()  # read back before the reply came, or of an epoch that ended
        if written and written[0][0] == epoch and written[0][1] == count:
            if written.popleft()[2] != write:
                return True
        return False

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
