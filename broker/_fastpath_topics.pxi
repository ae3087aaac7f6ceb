# TopicState and stamp: a topic's sequence numbers, this tick's batch, its list of nodes. Part
# of the compiled fast path: included by _fastpath.pyx, which with its includes is one extension
# module (see its docstring). Twin: broker/_fastpath_py/topics.py.


cdef class TopicState:
    """One concrete topic: its id, epoch, last sequence number, this tick's pending batch and
    the subscription nodes that match it."""

    def __init__(self, Py_ssize_t topic_id, str name not None, epoch):
        if topic_id < 0:
            raise ValueError("topic id must not be negative")
        self.id = topic_id
        self.name = name
        self.key = name.encode()
        self.epoch = epoch
        self.seq = 0
        self.pending = []
        self.first = 0
        self.dirty = False
        self.nodes = _untracked_list([])
        self.compacted = 0
        self.announce = encode_topic(topic_id, name, epoch)
        self.history = None  # its HistoryLog, once a HistoryStore kept some of its messages


cdef inline void _stamp(TopicState state, bytes payload, list dirty) except *:
    state.seq += 1
    if not state.dirty:
        state.dirty = True
        state.first = state.seq
        dirty.append(state)
    state.pending.append(payload)


def stamp(TopicState state not None, bytes payload not None, list dirty not None):
    """Give `payload` the topic's next sequence number and add it to this tick's batch."""
    _stamp(state, payload, dirty)


def fanout_steps(list dirty not None, Py_ssize_t start):
    """The subscription nodes of the topics dirty[start:]: what their fan-out will visit."""
    cdef Py_ssize_t i, steps = 0
    for i in range(max(start, 0), len(dirty)):
        steps += len((<TopicState>dirty[i]).nodes)
    return steps


cdef void _compact(TopicState state) except *:
    cdef list live = _untracked_list([])
    cdef Node node
    for node in state.nodes:
        if not node.dead:
            live.append(node)
    state.nodes = live
    state.compacted = PyList_GET_SIZE(live)


cdef void _add_node(TopicState state, Node node) except *:
    if PyList_GET_SIZE(state.nodes) >= 2 * state.compacted + 16:
        _compact(state)
    state.nodes.append(node)
