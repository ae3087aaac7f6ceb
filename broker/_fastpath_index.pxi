# Who receives which topic: Node, the tries and Index. Part of the compiled fast path: included
# by _fastpath.pyx, which with its includes is one extension module (see its docstring). Twin:
# broker/_fastpath_py/index.py.


cdef class Node:
    """One distinct subscription string (a topic or a pattern), the outboxes holding it (solo
    members apart), this tick's pieces for the solo members and the topics every solo member
    was announced (see the twin); dead once the last one left."""

    def __init__(self, str pattern not None):
        self.pattern = pattern
        self.members = {}
        self.solo = {}
        self.pieces = []
        self.frame = None
        self.dead = False
        self.has_known = False

    def __dealloc__(self):
        _bits_free(&self.known)


@cython.no_gc
cdef class _PatternTrie:
    def __init__(self):
        self.children = {}
        self.star = None
        self.here = None
        self.rest = None

    cdef bint empty(self):
        return not self.children and self.star is None and self.here is None and self.rest is None


@cython.no_gc
cdef class _TopicTrie:
    def __init__(self):
        self.children = {}
        self.state = None
        self.height = 0


cdef inline bint _is_pattern(str name):
    return "*" in name or ">" in name


cdef bint _matches(list pattern, list tokens):
    cdef Py_ssize_t n = PyList_GET_SIZE(tokens), i
    cdef str token
    for i in range(PyList_GET_SIZE(pattern)):
        token = <str>PyList_GET_ITEM(pattern, i)
        if token == ">":
            return n > i
        if i >= n or (token != "*" and token != <str>PyList_GET_ITEM(tokens, i)):
            return False
    return PyList_GET_SIZE(pattern) == n


cdef class _Excluding:
    """A subscription string with exclusions, `PATTERN !DENIED ...` (see the twin)."""

    def __init__(self, str pattern, Node node=None):
        cdef list parts = pattern.split(" !")
        self.node = node
        self.base = (<str>parts[0]).split(".")
        self.excluded = [(<str>part).split(".") for part in parts[1:]]

    cdef bint matches(self, list tokens):
        if not _matches(self.base, tokens):
            return False
        for excluded in self.excluded:
            if _matches(<list>excluded, tokens):
                return False
        return True


cdef class Index:
    """Subscriptions and topics, kept so that every topic's `nodes` list holds the live nodes
    that match it (see the twin). `work` counts trie nodes visited and topic lists changed."""

    def __init__(self):
        self.exact = {}
        self.root = _PatternTrie()
        self.topics = {}
        self.by_key = {}
        self.states = []
        self._topic_root = _TopicTrie()
        self.patterns = 0
        self.excluding = {}
        self.subscriptions = 0
        self.work = 0

    def __len__(self):
        return self.subscriptions

    # topics

    def add_topic(self, TopicState state not None):
        """Register a new topic (`state.id` one no topic of the index had; see the twin) and
        find the nodes that match it."""
        if state.id < 0 or state.id < PyList_GET_SIZE(self.states) and self.states[state.id] is not None or state.name in self.topics:
            raise ValueError(f"topic {state.name!r} with id {state.id} does not fit the index")
        cdef list tokens = state.name.split(".")
        cdef list nodes = _untracked_list([])
        node = self.exact.get(state.name)
        if node is not None:
            nodes.append(node)
        if self.patterns:
            self._collect(self.root, tokens, 0, nodes)
        cdef _Excluding entry
        if self.excluding:
            for value in self.excluding.values():
                entry = <_Excluding>value
                self.work += 1
                if entry.matches(tokens):
                    nodes.append(entry.node)
        state.nodes = nodes
        state.compacted = PyList_GET_SIZE(nodes)
        cdef _TopicTrie trie = self._topic_root, child
        cdef Py_ssize_t depth = PyList_GET_SIZE(tokens)
        for token in tokens:
            if trie.height < depth:
                trie.height = depth
            depth -= 1
            child = trie.children.get(token)
            if child is None:
                child = _TopicTrie()
                trie.children[token] = child
            trie = child
        trie.state = state
        self.work += PyList_GET_SIZE(tokens)
        self.topics[state.name] = state
        self.by_key[state.key] = state
        self._place(state)

    def retire(self, TopicState state not None):
        """Forget a topic that no live subscription matches: its name may come back as a new
        topic with a new id (ids are never used again; a retired id's slot in `states` is None)."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        cdef Node node
        for node in state.nodes:
            if not node.dead:
                raise ValueError(f"topic {state.name!r} has subscribers")
        cdef list tokens = state.name.split(".")
        cdef list path = []
        cdef _TopicTrie trie = self._topic_root, child
        for token in tokens:
            path.append((trie, token))
            trie = <_TopicTrie>trie.children[token]
        trie.state = None
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(path) - 1, -1, -1):
            parent, token = path[i]
            child = <_TopicTrie>(<_TopicTrie>parent).children[token]
            if child.state is not None or child.children:
                break
            del (<_TopicTrie>parent).children[token]
        del self.topics[state.name]
        del self.by_key[state.key]
        self.states[state.id] = None
        state.nodes = _untracked_list([])
        state.compacted = 0
        self.work += PyList_GET_SIZE(tokens)

    cdef void _place(self, TopicState state) except *:
        cdef list states = self.states
        cdef Py_ssize_t size = PyList_GET_SIZE(states)
        if state.id >= size:
            states.extend([None] * (state.id + 1 - size))
        states[state.id] = state

    def renew(self, TopicState state not None, epoch, Py_ssize_t topic_id):
        """Start a new epoch of a topic: a new state with the new id `topic_id` takes the old
        one's place and its subscription nodes; the old id is retired (see the twin)."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if topic_id < 0 or topic_id < PyList_GET_SIZE(self.states) and self.states[topic_id] is not None:
            raise ValueError(f"topic id {topic_id} is taken")
        cdef TopicState fresh = TopicState(topic_id, state.name, epoch)
        fresh.nodes = state.nodes
        fresh.compacted = state.compacted
        cdef list tokens = state.name.split(".")
        cdef _TopicTrie trie = self._topic_root
        for token in tokens:
            trie = <_TopicTrie>trie.children[token]
        trie.state = fresh
        self.topics[state.name] = fresh
        self.by_key[state.key] = fresh
        self.states[state.id] = None
        self._place(fresh)
        state.nodes = _untracked_list([])
        state.compacted = 0
        self.work += PyList_GET_SIZE(tokens)
        return fresh

    cdef void _collect(self, _PatternTrie trie, list tokens, Py_ssize_t i, list out) except *:
        cdef Py_ssize_t n = PyList_GET_SIZE(tokens)
        cdef object child
        while True:
            self.work += 1
            if trie.rest is not None and i < n:
                out.append(trie.rest)
            if i == n:
                if trie.here is not None:
                    out.append(trie.here)
                return
            child = trie.children.get(<object>PyList_GET_ITEM(tokens, i))
            if trie.star is not None:
                if child is not None:
                    self._collect(<_PatternTrie>child, tokens, i + 1, out)
                trie = trie.star
            elif child is not None:
                trie = <_PatternTrie>child
            else:
                return
            i += 1

    def matching(self, str pattern not None):
        """The topics that match `pattern` (a topic, a pattern, or a pattern with exclusions),
        found through the topic trie."""
        cdef _Excluding entry
        if " " in pattern:
            entry = _Excluding(pattern)
            return [state for state in self._matching_topics(pattern.partition(" ")[0]) if entry.matches((<TopicState>state).name.split("."))]
        return self._matching_topics(pattern)

    cdef list _matching_topics(self, str pattern):
        cdef list out = []
        self._match_topics(self._topic_root, pattern.split("."), 0, out)
        return out

    cdef void _match_topics(self, _TopicTrie trie, list tokens, Py_ssize_t i, list out) except *:
        self.work += 1
        if trie.height < PyList_GET_SIZE(tokens) - i:
            return
        if i == PyList_GET_SIZE(tokens):
            if trie.state is not None:
                out.append(trie.state)
            return
        cdef str token = <str>PyList_GET_ITEM(tokens, i)
        cdef object child
        if token == ">":
            for child in trie.children.values():
                self._subtree(<_TopicTrie>child, out)
        elif token == "*":
            for child in trie.children.values():
                self._match_topics(<_TopicTrie>child, tokens, i + 1, out)
        else:
            child = trie.children.get(token)
            if child is not None:
                self._match_topics(<_TopicTrie>child, tokens, i + 1, out)

    cdef void _subtree(self, _TopicTrie trie, list out) except *:
        self.work += 1
        if trie.state is not None:
            out.append(trie.state)
        cdef object child
        for child in trie.children.values():
            self._subtree(<_TopicTrie>child, out)

    # subscriptions

    def subscribe(self, str pattern not None, Outbox box not None):
        """Add `box` to the node of `pattern`; False when it is already there (see the twin)."""
        cdef Node node = self._node(pattern, True), old
        if box in node.members or box in node.solo:
            return False
        if box.nsubs == 0:
            self._join_solo(node, box)
        else:
            old = box.solo_node
            if old is not None:  # its only subscription so far (a box left with one plain membership has none)
                self._leave_solo(old, box)
                old.members[box] = None
            node.members[box] = None
        box.nsubs += 1
        self.subscriptions += 1
        self.work += 1
        return True

    def unsubscribe(self, str pattern not None, Outbox box not None):
        """Remove `box` from the node of `pattern`; False when it was not there."""
        cdef Node node = self._node(pattern, False)
        if node is None:
            return False
        if box in node.solo:
            self._leave_solo(node, box)
        elif box in node.members:
            del node.members[box]
        else:
            return False
        box.nsubs -= 1
        self.subscriptions -= 1
        self.work += 1
        if not node.members and not node.solo:
            self._drop(node)
        return True

    def settle(self, str pattern not None, Outbox box not None):
        """`box` holds `pattern` as its only subscription now: make it a solo member."""
        cdef Node node = self._node(pattern, False)
        if node is not None and box.nsubs == 1 and box in node.members:
            del node.members[box]
            self._join_solo(node, box)

    cdef void _join_solo(self, Node node, Outbox box) except *:
        cdef Py_ssize_t i, bit
        cdef uint8_t missing
        if not node.solo:
            _bits_copy(&node.known, &box.known)
            node.has_known = True
        else:
            for i in range(node.known.size):
                missing = node.known.data[i] & ~(box.known.data[i] if i < box.known.size else 0)
                if missing:
                    for bit in range(8):
                        if (missing >> bit) & 1 and self.states[i * 8 + bit] is not None:
                            box._add((<TopicState>self.states[i * 8 + bit]).announce)
                            self.work += 1
            _bits_or(&box.known, &node.known)
        node.solo[box] = None
        box.solo_node = node
        box.offset = PyList_GET_SIZE(node.pieces)

    cdef void _leave_solo(self, Node node, Outbox box) except *:
        cdef Py_ssize_t i
        del node.solo[box]
        if not box.closed:
            for i in range(box.offset, PyList_GET_SIZE(node.pieces)):
                box._add(<bytes>PyList_GET_ITEM(node.pieces, i))
            _bits_or(&box.known, &node.known)
        box.solo_node = None
        box.offset = 0
        if not node.solo:
            _bits_free(&node.known)
            node.has_known = False

    def node(self, str pattern not None):
        """The node of `pattern`, if anyone holds it."""
        return self._node(pattern, False)

    def receivers(self, str name not None):
        """The outboxes a message of topic `name` reaches now, each once (for tests and
        introspection; the hot path reads `state.nodes`)."""
        cdef list nodes
        state = self.topics.get(name)
        if state is not None:
            nodes = (<TopicState>state).nodes
        else:
            nodes = []
            node = self.exact.get(name)
            if node is not None:
                nodes.append(node)
            self._collect(self.root, name.split("."), 0, nodes)
            nodes += [(<_Excluding>entry).node for entry in self.excluding.values() if (<_Excluding>entry).matches(name.split("."))]
        seen = {}
        for node in nodes:
            if not (<Node>node).dead:
                for box in (<Node>node).solo:
                    seen[box] = None
                for box in (<Node>node).members:
                    seen[box] = None
        return list(seen)

    cdef Node _node(self, str pattern, bint create):
        cdef Node node
        cdef _PatternTrie trie
        cdef object child
        cdef _Excluding entry
        if " " in pattern:
            found = self.excluding.get(pattern)
            if found is None:
                if not create:
                    return None
                entry = _Excluding(pattern, Node(pattern))
                self.excluding[pattern] = entry
                for state in self._matching_topics(pattern.partition(" ")[0]):
                    self.work += 1
                    if entry.matches((<TopicState>state).name.split(".")):
                        _add_node(<TopicState>state, entry.node)
                return entry.node
            return (<_Excluding>found).node
        if not _is_pattern(pattern):
            found = self.exact.get(pattern)
            if found is None:
                if not create:
                    return None
                node = Node(pattern)
                self.exact[pattern] = node
                state = self.topics.get(pattern)
                if state is not None:
                    _add_node(<TopicState>state, node)
                    self.work += 1
                return node
            return <Node>found
        trie = self.root
        for token in pattern.split("."):
            self.work += 1
            if token == ">":
                if trie.rest is None and create:
                    trie.rest = self._attach(Node(pattern))
                return trie.rest
            if token == "*":
                if trie.star is None:
                    if not create:
                        return None
                    trie.star = _PatternTrie()
                trie = trie.star
            else:
                child = trie.children.get(token)
                if child is None:
                    if not create:
                        return None
                    child = _PatternTrie()
                    trie.children[token] = child
                trie = <_PatternTrie>child
        if trie.here is None and create:
            trie.here = self._attach(Node(pattern))
        return trie.here

    cdef Node _attach(self, Node node):
        self.patterns += 1
        for state in self._matching_topics(node.pattern):
            _add_node(<TopicState>state, node)
            self.work += 1
        return node

    cdef void _drop(self, Node node) except *:
        node.dead = True
        cdef str pattern = node.pattern
        if " " in pattern:
            del self.excluding[pattern]
            return
        if not _is_pattern(pattern):
            del self.exact[pattern]
            return
        self.patterns -= 1
        cdef list tokens = pattern.split(".")
        cdef Py_ssize_t last = PyList_GET_SIZE(tokens) - 1
        cdef bint rest = tokens[last] == ">"
        cdef list path = tokens[:last] if rest else tokens
        cdef list chain = [self.root]
        cdef _PatternTrie trie = self.root, parent
        for token in path:
            trie = trie.star if token == "*" else <_PatternTrie>trie.children[token]
            chain.append(trie)
        if rest:
            trie.rest = None
        else:
            trie.here = None
        cdef Py_ssize_t depth
        for depth in range(PyList_GET_SIZE(path), 0, -1):
            trie = <_PatternTrie>chain[depth]
            if not trie.empty():
                return
            parent = <_PatternTrie>chain[depth - 1]
            token = path[depth - 1]
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]
