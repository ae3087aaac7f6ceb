"""Micro benchmarks of the hot functions, on both fast-path implementations.

    python -m pytest bench/test_micro.py --benchmark-only --benchmark-group-by=func

Not part of the default test run (pytest's testpaths is tests/). Each benchmark runs once with
the compiled module and once with the pure-Python twin; compare the two rows of each group."""

import msgspec
import pytest

import broker._fastpath_py as pure
from broker.messages import Pub, decode_client_frame

try:
    import broker._fastpath as compiled
except ImportError:  # pragma: no cover - the suite requires the compiled module
    compiled = None

IMPLS = [pytest.param(compiled, id="cython"), pytest.param(pure, id="python")]
PAYLOAD = b"x" * 100


@pytest.fixture(params=IMPLS)
def impl(request):
    if request.param is None:
        pytest.skip("compiled fast path not built")
    return request.param


def test_encode_batch_100_payloads(benchmark, impl):
    payloads = [PAYLOAD] * 100
    benchmark(impl.encode_batch, 7, 12345, payloads)


def emit_and_take(impl, state, boxes_touched_per_tick_check=None):
    """One tick of one topic: its batch of 10 payloads encoded once, queued, every outbox's
    frame assembled (shared where the pieces are the same), the tick ended."""
    emission = iter(range(1, 1 << 62))

    def run():
        touched, slow, nodes = [], [], []
        state.pending = [PAYLOAD] * 10
        impl.emit(state, next(emission), 1 << 20, touched, slow, nodes)
        impl.schedule_solo(nodes, touched)
        shared = {}
        for box in touched:
            box.scheduled = False
            box.take(1 << 20, shared)
        impl.end_tick(nodes)

    return run


@pytest.mark.parametrize("members", ["solo", "plain"])
def test_emit_to_100_outboxes(benchmark, impl, members):
    """100 subscribers of `md.>`: solo members of its node (their only subscription), or plain
    members (each also holds another pattern)."""
    index = impl.Index()
    state = impl.TopicState(0, "md.x.1", 1)  # ids are given in order from 0
    index.add_topic(state)
    for i in range(100):
        box = impl.Outbox(i, 1 << 40)
        index.subscribe("md.>", box)
        if members == "plain":
            index.subscribe(f"other.{i}.>", box)
    benchmark(emit_and_take(impl, state))


def test_fast_publish_batch_of_100(benchmark, impl):
    names = [f"md.t{i}" for i in range(10)]
    states = {s.key: s for s in (impl.TopicState(i, n, 1) for i, n in enumerate(names))}
    data = msgspec.msgpack.encode([Pub(0, names[i % 10], PAYLOAD) for i in range(100)])

    def run():
        dirty = []
        assert impl.fast_publish(data, states, 1 << 20, 10_000, dirty) == 100
        for state in dirty:
            state.pending = []
            state.dirty = False

    benchmark(run)


def test_general_decode_batch_of_100(benchmark):
    data = msgspec.msgpack.encode([Pub(0, f"md.t{i % 10}", PAYLOAD) for i in range(100)])
    benchmark(decode_client_frame, data)


@pytest.mark.parametrize("patterns", ["1,000 subscribers", "8,192 overlapping"])
def test_add_topic_walks_the_pattern_trie(benchmark, impl, patterns):
    """A new topic finds the subscription nodes that match it: with 1,000 subscribers of md.>
    and of md.xN.* (11 nodes), or with one client's 8,192 overlapping patterns of 13 tokens of
    `a` or `*` then `>` (8,192 nodes, 16,383 trie nodes to visit)."""
    index = impl.Index()
    box = impl.Outbox(0, 1 << 40)
    if patterns.startswith("1,000"):
        boxes = [impl.Outbox(i, 1 << 40) for i in range(1000)]
        for i, b in enumerate(boxes):
            index.subscribe("md.>", b)
            index.subscribe(f"md.x{i % 10}.*", b)
        name = "md.x1.{}"
    else:
        import itertools

        for bits in itertools.product("a*", repeat=13):
            index.subscribe(".".join(bits) + ".>", box)
        name = ".".join(["a"] * 13) + ".n{}"
    counter = iter(range(1 << 62))

    def run():
        n = next(counter)
        index.add_topic(impl.TopicState(n, name.format(n), 1))

    benchmark(run)


def test_read_frame_of_32_kib(benchmark, impl):
    """Parse and unmask one client frame of 32 KiB (256 publishes of 100 bytes)."""
    payload = msgspec.msgpack.encode([Pub(0, "md.x.1", PAYLOAD)] * 256)
    mask = b"\x11\x22\x33\x44"
    n = len(payload)
    frame = bytes((0x82, 0xFE)) + n.to_bytes(2, "big") + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    benchmark(impl.read_frame, frame, 0, 1 << 20)


def test_assemble_256_batches(benchmark, impl):
    """One connection's frame of a tick: 256 batches of one payload each (the wildcard case)."""
    pieces = [impl.encode_batch(i, 1000 + i, [PAYLOAD]) for i in range(256)]
    benchmark(impl.assemble, pieces, 1 << 20)


@pytest.mark.parametrize("how", ["drop", "conflate"])
def test_shed_a_queue_of_1000_batches(benchmark, impl, how):
    """A connection behind: 1,000 queued batches of 10 payloads on 100 topics, shed by one
    policy pass (the slow path; it runs about once per half max_pending_bytes of new data)."""
    from broker import policy
    from broker.router import Router

    router = Router(lambda: None)
    states = [router.topic(f"t.{i}") for i in range(100)]
    pieces = [impl.encode_batch(states[i % 100].id, 1 + 10 * (i // 100), [PAYLOAD] * 10) for i in range(1000)]
    chosen = policy.DROP if how == "drop" else policy.CONFLATE

    def setup():
        box = impl.Outbox(None, 1 << 30)
        for piece in pieces:
            box.push(piece)
        return (box,), {}

    def shed(box):
        policy.Shed(lambda topic_id: chosen, router.index.states).shed(box, box.size // 2)

    benchmark.pedantic(shed, setup=setup, rounds=50)


@pytest.mark.parametrize("frame", [1, 100])
@pytest.mark.parametrize("limits", ["none", "connection", "connection+user"])
def test_session_receive_fire_and_forget(benchmark, limits, frame):
    """Session.receive of one frame of fire-and-forget publishes to known topics (the compiled
    path of broker.fastpath): without rate limits, with a connection's publish bucket, and with
    its user's too (buckets so large that they stay full: the cost of the check alone)."""
    from broker.limits import Guard
    from broker.router import Router
    from broker.session import Session, SessionLimits
    from broker.settings import load

    router = Router(lambda: None)
    names = [f"md.t{i}" for i in range(10)]
    for name in names:
        router.topic(name)
    limiter = None
    if limits != "none":
        settings = {"publish_rate": 1e12, "publish_burst": 1e12}
        if limits == "connection+user":
            settings.update(user_publish_rate=1e12, user_publish_burst=1e12)
        guard = Guard(load(settings, environ={}), log=lambda *a, **k: None)
        limiter = guard.admit("127.0.0.1", "alice" if limits == "connection+user" else None)
    session = Session(router, SessionLimits(), owner="bench", limiter=limiter)
    data = msgspec.msgpack.encode([Pub(0, names[i % 10], PAYLOAD) for i in range(frame)])

    def run():
        assert session.receive(data)
        for state in router.dirty:
            state.pending = []
            state.dirty = False
        router.dirty.clear()

    benchmark(run)
