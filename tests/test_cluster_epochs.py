"""broker.cluster.epochs: what a node makes of each shard's epoch and write count, with plain
calls (the Redis side is in test_cluster_rollback.py)."""

from __future__ import annotations

import subprocess
import sys

from broker.cluster.epochs import DELIVER, FORKED, NEW_EPOCH, REPEAT, SKIP, ShardEpochs


def started(epoch: int = 100, count: int = 7) -> ShardEpochs:
    epochs = ShardEpochs(2)
    epochs.move(0, epoch)
    epochs.know(0, epoch, count)
    return epochs


def test_write_counts_that_rise_are_delivered_and_known():
    epochs = started()
    assert [epochs.entry(0, 100, count) for count in (8, 9, 12)] == [DELIVER] * 3  # 10, 11 trimmed: fine
    assert epochs.read[0] == 12 and epochs.known[0] == (100, 12)
    assert epochs.entry(0, 100, 0) == DELIVER  # an entry without a count (an older broker's)
    assert not epochs.unchecked


def test_a_repeated_write_count_holds_back_the_rest_of_the_epoch_and_asks_for_a_check():
    epochs = started()
    assert epochs.entry(0, 100, 8) == DELIVER
    assert epochs.entry(0, 100, 9) == DELIVER
    assert epochs.entry(0, 100, 9) == REPEAT  # written again after Redis went back
    assert epochs.unchecked == {0} and epochs.known[0] == (100, FORKED)
    assert epochs.entry(0, 100, 10) == SKIP  # a count above what was read is no better now
    assert epochs.entry(1, 0, 1) == DELIVER  # other shards are not concerned
    # the check started epoch 200 (a check claims FORKED: above anything Redis holds)
    assert epochs.checked(0, 200, 1)
    epochs.move(0, 200)
    assert epochs.unchecked == set() and epochs.known[0] == (200, 1)
    assert epochs.entry(0, 100, 11) == SKIP  # the old epoch's entries still in the stream
    assert epochs.entry(0, 200, 2) == DELIVER


def test_an_entry_that_holds_the_count_of_a_write_of_this_node_but_is_another_is_a_repeat():
    """The node's write 50 was acknowledged; Redis lost it before the node read it back, and
    a node that did not know wrote its own entry 50: not this node's, so not delivered."""
    epochs = started(count=48)
    epochs.wrote(0, 100, 50, write=7)
    assert epochs.entry(0, 100, 49) == DELIVER  # another node's, before this node's write
    assert epochs.entry(0, 100, 50, write=0) == REPEAT
    assert epochs.unchecked == {0}


def test_this_nodes_writes_read_back_are_delivered_whenever_their_replies_came():
    epochs = started(count=10)
    epochs.wrote(0, 100, 11, write=1)
    epochs.wrote(0, 100, 13, write=3)
    assert epochs.entry(0, 100, 11, write=1) == DELIVER
    assert epochs.entry(0, 100, 12) == DELIVER  # another node's in between
    assert epochs.entry(0, 100, 13, write=3) == DELIVER
    assert epochs.entry(0, 100, 14, write=4) == DELIVER  # read back before its reply came
    epochs.wrote(0, 100, 14, write=4)
    assert epochs.entry(0, 100, 15) == DELIVER  # the late reply is passed, not compared
    assert not epochs.written[0] and not epochs.unchecked


def test_a_later_epoch_in_the_stream_moves_the_shard_and_an_earlier_one_is_skipped():
    epochs = started()
    assert epochs.entry(0, 300, 1) == NEW_EPOCH
    assert epochs.epochs[0] == 100  # the caller ends the old epoch, then moves
    epochs.move(0, 300)
    assert epochs.entry(0, 300, 1) == DELIVER
    assert epochs.entry(0, 100, 50) == SKIP
    assert epochs.read[0] == 1 and epochs.known[0] == (300, 1)


def test_what_a_write_or_a_check_reports_only_raises_what_is_known():
    epochs = started()
    epochs.know(0, 100, 20)
    epochs.know(0, 100, 15)  # an older reply
    assert epochs.known[0] == (100, 20)
    assert not epochs.checked(0, 100, 20)  # the same epoch: nothing ends
    assert epochs.checked(0, 150, 3)  # a later one: the caller ends the old epoch
    assert FORKED <= (1 << 53) and float(FORKED) == FORKED  # exact in Lua's doubles


def test_the_module_imports_no_io_library():
    code = (
        "import sys\n"
        "import broker.cluster.epochs\n"
        "bad = [m for m in ('asyncio', 'redis', 'picows', 'uvloop') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
