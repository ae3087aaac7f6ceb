"""Micro benchmarks of the hot functions, on both fast-path implementations.

    python -m pytest bench/test_micro.py --benchmark-only --benchmark-group-by=func

Not part of the default test run (pytest's testpaths is tests/). Each benchmark runs once with
the compiled module and once with the pure-Python twin; compare the two rows of each group."""

import msgspec
import pytest

import broker._fastpath_py as pure
from broker.messages import Pub, decode_client_frame
from broker.topics import SubscriptionIndex

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


def test_emit_to_100_outboxes(benchmark, impl):
    """One topic's batch of 10 payloads encoded once and queued on 100 outboxes, then each
    outbox's frame assembled (shared between outboxes holding the same pieces)."""
    index = impl.Index()
    state = impl.TopicState(0, "md.x.1", 1)  # ids are given in order from 0
    index.add_topic(state)
    boxes = [impl.Outbox(i, 1 << 40) for i in range(100)]
    for box in boxes:
        index.subscribe("md.>", box)
    emission = iter(range(1, 1 << 62))

    def run():
        touched, slow = [], []
        state.pending = [PAYLOAD] * 10
        impl.emit(state, next(emission), 1 << 20, touched, slow)
        shared = {}
        for box in touched:
            box.scheduled = False
            box.take(1 << 20, shared)

    benchmark(run)


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


def test_index_lookup_cached(benchmark):
    index = SubscriptionIndex()
    for i in range(1000):
        index.add("md.>", i)
        index.add(f"md.x{i % 10}.*", -i)
    index.lookup("md.x1.AAPL")
    benchmark(index.lookup, "md.x1.AAPL")


def test_index_lookup_uncached_wildcards(benchmark):
    index = SubscriptionIndex()
    for i in range(1000):
        index.add("md.>", i)
        index.add(f"md.x{i % 10}.*", -i)

    def run():
        index.forget("md.x1.AAPL")
        index.lookup("md.x1.AAPL")

    benchmark(run)
