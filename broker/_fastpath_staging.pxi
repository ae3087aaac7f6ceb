# Cluster staging: stage and arrive, the backplane's per-topic work. Part of the compiled fast
# path: included by _fastpath.pyx, which with its includes is one extension module (see its
# docstring). Twin: broker/_fastpath_py/staging.py.

# The cluster backplane's per-topic work (broker.cluster.streams): staging a tick's pending
# batches into one block per shard for its next write, and taking numbered batches back into
# the topics' pending batches. Both run for every topic a tick or a stream entry touches.

cdef object _crc32 = __import__("zlib").crc32


cdef class Block:
    """What one shard gets in one write: per topic its payloads in order (`topics`), and the
    acks waiting for their numbers (`waiters`: topic, index in its payloads, ok, fail, msg_id)."""

    def __init__(self, Py_ssize_t shard, double staged):
        self.shard = shard
        self.topics = {}
        self.size = 0
        self.count = 0
        self.waiters = []
        self.staged = staged
        self.write = 0
        self.sent = False
        self.epoch = 0
        self.answered = False


def stage(list states not None, list filling not None, list full_of not None, dict waiting not None, Py_ssize_t shards, double now, Py_ssize_t block_bytes):
    """Take the topics' pending batches into the block each one's shard is filling
    (`filling[shard]`, made when there is none), and give each topic back the sequence number
    it had. The acks waiting for a topic's messages (`waiting[state]`: provisional seq, ok,
    fail, msg_id) move to the block with their index in its payloads. A block that reaches
    `block_bytes` goes to `full_of[shard]`. Returns (messages taken, their bytes, blocks made)."""
    cdef TopicState state
    cdef Block block
    cdef Py_ssize_t taken = 0, size_all = 0, made = 0, shard, count, size, base, i
    cdef list pending, payloads, mine
    cdef object item
    for item in states:
        state = <TopicState>item
        pending = state.pending
        state.dirty = False
        count = PyList_GET_SIZE(pending)
        if not count:
            continue
        shard = _crc32(state.key) % shards
        item = filling[shard]
        if item is None:
            block = Block(shard, now)
            filling[shard] = block
            made += 1
        else:
            block = <Block>item
        item = block.topics.get(state.name)
        if item is None:
            payloads = []
            block.topics[state.name] = payloads
        else:
            payloads = <list>item
        base = PyList_GET_SIZE(payloads) - state.first
        payloads.extend(pending)
        size = 0
        for i in range(count):
            size += PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(pending, i))
        block.size += size
        block.count += count
        size_all += size
        if waiting:
            item = waiting.pop(state, None)
            if item is not None:
                mine = <list>item
                for seq, ok, fail, msg_id in mine:
                    block.waiters.append((state.name, base + seq, ok, fail, msg_id))
        state.seq -= count
        state.pending = []
        taken += count
        if block.size >= block_bytes:
            (<list>full_of[shard]).append(block)
            filling[shard] = None
    return taken, size_all, made


def arrive(list entries not None, dict topics not None, list arrived not None, object other):
    """Numbered batches from a backplane's log, in its order (`entries`: (epoch, [(topic,
    payloads), ...], [first seq, ...])), into the topics' pending batches: a batch that
    follows its topic's last number in its epoch is added (the topic joins `arrived` when it
    was not dirty); any other (a topic unknown here, another epoch, a repeat, numbers skipped)
    goes to `other(topic, epoch, payloads, first)`, which returns the messages it took.
    Returns the messages taken."""
    cdef Py_ssize_t taken = 0, count, i, n
    cdef TopicState state
    cdef long long first
    cdef list batches, firsts, payloads
    cdef object item
    for entry in entries:
        epoch, batches, firsts = entry
        n = PyList_GET_SIZE(batches)
        for i in range(n):
            name, payloads = <tuple>PyList_GET_ITEM(batches, i)
            first = <object>PyList_GET_ITEM(firsts, i)
            item = topics.get(name)
            if item is None:
                taken += other(name, epoch, payloads, first)
                continue
            state = <TopicState>item
            if first != state.seq + 1 or state.epoch != epoch:
                taken += other(name, epoch, payloads, first)
                continue
            count = PyList_GET_SIZE(payloads)
            if state.dirty:
                state.pending.extend(payloads)
            else:
                state.dirty = True
                state.first = first
                state.pending = payloads
                arrived.append(state)
            state.seq = first + count - 1
            taken += count
    return taken
