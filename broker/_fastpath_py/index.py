"""Who receives which topic: `Index` keeps each distinct subscription string as one `Node` and
each topic's list of the nodes that match it. Part of the pure-Python fast path
(`broker._fastpath_py`); the compiled twin is `_fastpath_index.pxi`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

from .topics import TopicState, add_node

if TYPE_CHECKING:
    from .fanout import Outbox


class Node:
    """One distinct subscription string (a topic or a pattern) and the outboxes holding it;
    dead once the last one left (a new subscription to the string makes a new node).

    `solo` holds the outboxes whose only subscription this is; `members` the others. This
    tick's pieces for the solo members are in `pieces` (and `frame`, once assembled). `known`
    holds the topics announced to every solo member: a member joining is first announced those
    it was not, so the node never announces a topic twice to anyone (a member that knew more
    than the others may see a topic announced a second time)."""

    __slots__ = ("pattern", "members", "solo", "pieces", "frame", "known", "dead")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.members: dict = {}
        self.solo: dict = {}
        self.pieces: list[bytes] = []
        self.frame: bytes | None = None
        self.known: set[int] = set()  # empty while there is no solo member
        self.dead = False


class _PatternTrie:
    __slots__ = ("children", "star", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _PatternTrie] = {}
        self.star: _PatternTrie | None = None
        self.here: Node | None = None  # a pattern ending exactly at this depth
        self.rest: Node | None = None  # a pattern ending in '>' at this depth

    def empty(self) -> bool:
        return not (self.children or self.star is not None or self.here is not None or self.rest is not None)


class _TopicTrie:
    __slots__ = ("children", "state", "height")

    def __init__(self) -> None:
        self.children: dict[str, _TopicTrie] = {}
        self.state: TopicState | None = None
        self.height = 0  # tokens on the longest path below: patterns longer than that skip it


def _is_pattern(name: str) -> bool:
    return "*" in name or ">" in name


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    """Whether the topic of `tokens` matches the pattern of `pattern` (both split at dots)."""
    n = len(tokens)
    for i, token in enumerate(pattern):
        if token == ">":
            return n > i
        if i >= n or (token != "*" and token != tokens[i]):
            return False
    return len(pattern) == n


class _Exclusions:
    """A subscription string with exclusions, `PATTERN !DENIED !DENIED...` (a grant's deny
    entries cut out of a subscription): its parts, split at dots."""

    __slots__ = ("base", "excluded")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split(" !")
        self.base = parts[0].split(".")
        self.excluded = [part.split(".") for part in parts[1:]]

    def matches(self, tokens: list[str]) -> bool:
        if not _matches(self.base, tokens):
            return False
        for excluded in self.excluded:
            if _matches(excluded, tokens):
                return False
        return True


class _Excluding(_Exclusions):
    """A subscription string with exclusions held by someone: its parts and its node."""

    __slots__ = ("node",)

    def __init__(self, pattern: str, node: Node) -> None:
        super().__init__(pattern)
        self.node = node


class Index:
    """Subscriptions and topics, kept so that every topic's `nodes` list holds exactly the live
    nodes that match it (and perhaps some dead ones, which readers skip).

    - A new topic walks the pattern trie once (`add_topic`), and is matched against each
      subscription string with exclusions (`PATTERN !DENIED ...`, made from grants with deny
      entries; there are few distinct ones, kept apart from the trie in `excluding`).
    - The first subscription to a string creates its node and adds it to the topics it
      matches (found through a trie of the existing topics); when the last one leaves, the
      node dies and touches no topic. Joining or leaving a live node touches no topic either.
    `work` counts trie nodes visited and topic lists changed, so callers can bound the work
    one client causes per loop iteration."""

    def __init__(self) -> None:
        self.exact: dict[str, Node] = {}
        self._root = _PatternTrie()
        self.topics: dict[str, TopicState] = {}
        self.by_key: dict[bytes, TopicState] = {}
        self.states: list[TopicState | None] = []  # by topic id (None: retired)
        self._topic_root = _TopicTrie()
        self.patterns = 0  # distinct pattern nodes
        self.excluding: dict[str, _Excluding] = {}  # subscription strings with exclusions
        self.subscriptions = 0  # (outbox, string) pairs
        self.work = 0

    def __len__(self) -> int:
        return self.subscriptions

    # topics

    def add_topic(self, state: TopicState) -> None:
        """Register a new topic (`state.id` one no topic of the index had: ids are small,
        `states` is a list by id, holding None where no topic is) and find the nodes that match
        it."""
        if state.id < 0 or state.id < len(self.states) and self.states[state.id] is not None or state.name in self.topics:
            raise ValueError(f"topic {state.name!r} with id {state.id} does not fit the index")
        tokens = state.name.split(".")
        nodes: list[Node] = []
        node = self.exact.get(state.name)
        if node is not None:
            nodes.append(node)
        if self.patterns:
            self._collect(self._root, tokens, 0, nodes)
        if self.excluding:
            for entry in self.excluding.values():
                self.work += 1
                if entry.matches(tokens):
                    nodes.append(entry.node)
        state.nodes = nodes
        state.compacted = len(nodes)
        trie = self._topic_root
        depth = len(tokens)
        for token in tokens:
            if trie.height < depth:
                trie.height = depth
            depth -= 1
            child = trie.children.get(token)
            if child is None:
                child = trie.children[token] = _TopicTrie()
            trie = child
        trie.state = state
        self.work += len(tokens)
        self.topics[state.name] = state
        self.by_key[state.key] = state
        self._place(state)

    def retire(self, state: TopicState) -> None:
        """Forget a topic that no live subscription matches: its name may come back as a new
        topic with a new id (ids are never used again; a retired id's slot in `states` is None).
        Heights in the topic trie may stay higher than what is below: they only bound a walk."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if any(not node.dead for node in state.nodes):
            raise ValueError(f"topic {state.name!r} has subscribers")
        tokens = state.name.split(".")
        path = []
        trie = self._topic_root
        for token in tokens:
            path.append((trie, token))
            trie = trie.children[token]
        trie.state = None
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.state is not None or child.children:
                break
            del parent.children[token]
        del self.topics[state.name]
        del self.by_key[state.key]
        self.states[state.id] = None
        state.nodes = []
        state.compacted = 0
        self.work += len(tokens)

    def _place(self, state: TopicState) -> None:
        states = self.states
        if state.id >= len(states):
            states.extend([None] * (state.id + 1 - len(states)))
        states[state.id] = state

    def renew(self, state: TopicState, epoch: int, topic_id: int) -> TopicState:
        """Start a new epoch of a topic: a new state with the new id `topic_id` (announced
        anew on every connection) takes the old one's place and its subscription nodes; the old
        id is retired. Returns the new state."""
        if self.topics.get(state.name) is not state:
            raise ValueError(f"topic {state.name!r} is not in the index")
        if topic_id < 0 or topic_id < len(self.states) and self.states[topic_id] is not None:
            raise ValueError(f"topic id {topic_id} is taken")
        fresh = TopicState(topic_id, state.name, epoch)
        fresh.nodes = state.nodes
        fresh.compacted = state.compacted
        tokens = state.name.split(".")
        trie = self._topic_root
        for token in tokens:
            trie = trie.children[token]
        trie.state = fresh
        self.topics[state.name] = fresh
        self.by_key[state.key] = fresh
        self.states[state.id] = None
        self._place(fresh)
        state.nodes = []
        state.compacted = 0
        self.work += len(tokens)
        return fresh

    def _collect(self, trie: _PatternTrie, tokens: list[str], i: int, out: list) -> None:
        self.work += 1
        if trie.rest is not None and i < len(tokens):
            out.append(trie.rest)
        if i == len(tokens):
            if trie.here is not None:
                out.append(trie.here)
            return
        child = trie.children.get(tokens[i])
        if child is not None:
            self._collect(child, tokens, i + 1, out)
        if trie.star is not None:
            self._collect(trie.star, tokens, i + 1, out)

    def matching(self, pattern: str) -> list[TopicState]:
        """The topics that match `pattern` (a topic, a pattern, or a pattern with exclusions),
        found through the topic trie."""
        if " " in pattern:
            entry = _Exclusions(pattern)
            return [state for state in self._matching_topics(pattern.partition(" ")[0]) if entry.matches(state.name.split("."))]
        return self._matching_topics(pattern)

    def _matching_topics(self, pattern: str) -> list[TopicState]:
        out: list[TopicState] = []
        self._match_topics(self._topic_root, pattern.split("."), 0, out)
        return out

    def _match_topics(self, trie: _TopicTrie, tokens: list[str], i: int, out: list) -> None:
        self.work += 1
        if trie.height < len(tokens) - i:
            return  # no topic below is long enough
        if i == len(tokens):
            if trie.state is not None:
                out.append(trie.state)
            return
        token = tokens[i]
        if token == ">":
            for child in trie.children.values():
                self._subtree(child, out)
        elif token == "*":
            for child in trie.children.values():
                self._match_topics(child, tokens, i + 1, out)
        else:
            below = trie.children.get(token)
            if below is not None:
                self._match_topics(below, tokens, i + 1, out)

    def _subtree(self, trie: _TopicTrie, out: list) -> None:
        self.work += 1
        if trie.state is not None:
            out.append(trie.state)
        for child in trie.children.values():
            self._subtree(child, out)

    # subscriptions

    def subscribe(self, pattern: str, box: Outbox) -> bool:
        """Add `box` to the node of `pattern`; False when it is already there.

        Its first subscription makes it a solo member of the node; a second one makes it a
        plain member of both (what its old node gave it this tick becomes its own)."""
        node = self._node(pattern, create=True)
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

    def unsubscribe(self, pattern: str, box: Outbox) -> bool:
        """Remove `box` from the node of `pattern`; False when it was not there."""
        node = self._node(pattern, create=False)
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

    def settle(self, pattern: str, box: Outbox) -> None:
        """`box` holds `pattern` as its only subscription now: make it a solo member."""
        node = self._node(pattern, create=False)
        if node is not None and box.nsubs == 1 and box in node.members:
            del node.members[box]
            self._join_solo(node, box)

    def _join_solo(self, node: Node, box: Outbox) -> None:
        if not node.solo:
            node.known = set(box.known)
        else:
            # the node's deliveries name topics announced to its solo members: announce to the
            # newcomer, first, those it was not
            for topic_id in sorted(node.known - box.known):
                state = self.states[topic_id]
                if state is not None:  # not retired
                    box._add(state.announce)
                    self.work += 1
            box.known |= node.known
        node.solo[box] = None
        box.solo_node = node
        box.offset = len(node.pieces)  # what the node got earlier in this tick is not for it

    def _leave_solo(self, node: Node, box: Outbox) -> None:
        del node.solo[box]
        if not box.closed:
            # what the node got in this tick since it joined becomes its own; so does what
            # the node announced to it
            for piece in node.pieces[box.offset :]:
                box._add(piece)
            box.known |= node.known
        box.solo_node = None
        box.offset = 0
        if not node.solo:
            node.known = set()

    def node(self, pattern: str) -> Node | None:
        """The node of `pattern`, if anyone holds it."""
        return self._node(pattern, create=False)

    def receivers(self, name: str) -> list:
        """The outboxes a message of topic `name` reaches now, each once (for tests and
        introspection; the hot path reads `state.nodes`)."""
        state = self.topics.get(name)
        if state is not None:
            nodes = state.nodes
        else:
            nodes = []
            node = self.exact.get(name)
            if node is not None:
                nodes.append(node)
            self._collect(self._root, name.split("."), 0, nodes)
            nodes += [entry.node for entry in self.excluding.values() if entry.matches(name.split("."))]
        seen: dict = {}
        for node in nodes:
            if not node.dead:
                for box in node.solo:
                    seen[box] = None
                for box in node.members:
                    seen[box] = None
        return list(seen)

    @overload
    def _node(self, pattern: str, create: Literal[True]) -> Node: ...
    @overload
    def _node(self, pattern: str, create: Literal[False]) -> Node | None: ...
    def _node(self, pattern: str, create: bool) -> Node | None:
        if " " in pattern:
            entry = self.excluding.get(pattern)
            if entry is None:
                if not create:
                    return None
                entry = self.excluding[pattern] = _Excluding(pattern, Node(pattern))
                for state in self._matching_topics(pattern.partition(" ")[0]):
                    self.work += 1
                    if entry.matches(state.name.split(".")):
                        add_node(state, entry.node)
            return entry.node
        if not _is_pattern(pattern):
            node = self.exact.get(pattern)
            if node is None and create:
                node = self.exact[pattern] = Node(pattern)
                topic = self.topics.get(pattern)
                if topic is not None:
                    add_node(topic, node)
                    self.work += 1
            return node
        trie = self._root
        tokens = pattern.split(".")
        for token in tokens:
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
                    child = trie.children[token] = _PatternTrie()
                trie = child
        if trie.here is None and create:
            trie.here = self._attach(Node(pattern))
        return trie.here

    def _attach(self, node: Node) -> Node:
        """A new pattern node joins every existing topic it matches."""
        self.patterns += 1
        for state in self._matching_topics(node.pattern):
            add_node(state, node)
            self.work += 1
        return node

    def _drop(self, node: Node) -> None:
        node.dead = True
        pattern = node.pattern
        if " " in pattern:
            del self.excluding[pattern]
            return
        if not _is_pattern(pattern):
            del self.exact[pattern]
            return
        self.patterns -= 1
        tokens = pattern.split(".")
        chain = [self._root]
        for token in tokens[:-1] if tokens[-1] == ">" else tokens:
            trie = chain[-1]
            step = trie.star if token == "*" else trie.children[token]
            assert step is not None  # the path of a held pattern exists down to its node
            chain.append(step)
        if tokens[-1] == ">":
            chain[-1].rest = None
            path = tokens[:-1]
        else:
            chain[-1].here = None
            path = tokens
        for depth in range(len(path), 0, -1):
            trie = chain[depth]
            if not trie.empty():
                return
            parent, token = chain[depth - 1], path[depth - 1]
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]
