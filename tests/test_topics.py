"""Topic validation and the subscription index, including a property test against a naive model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client.index import SubscriptionIndex
from broker.errors import ErrorCode, TopicError
from broker.topics import is_pattern, matches, validate_pattern, validate_topic


@pytest.mark.parametrize("topic", ["a", "md.NASDAQ.AAPL", "x-1_2:3@4/5", "a" * 255, ".".join("t" * 32)])
def test_valid_topics(topic):
    validate_topic(topic)
    validate_pattern(topic)


@pytest.mark.parametrize(
    "topic",
    ["", "a..b", ".a", "a.", "a b", "a\x00b", "é", "a" * 256, ".".join("t" * 33), "a*", "a>b", "*", "a.>", "a.*.b"],
)
def test_invalid_topics(topic):
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert info.value.code == ErrorCode.INVALID_TOPIC


@pytest.mark.parametrize("pattern", ["*", ">", "md.>", "md.*.AAPL", "*.*", "a.*.>"])
def test_valid_patterns(pattern):
    validate_pattern(pattern)
    assert is_pattern(pattern)


@pytest.mark.parametrize("pattern", ["a.>.b", ">.a", "a.**", "a.*b", "", "a..>"])
def test_invalid_patterns(pattern):
    with pytest.raises(TopicError):
        validate_pattern(pattern)


def test_length_limit_is_configurable():
    validate_topic("a" * 10, max_length=10)
    with pytest.raises(TopicError, match="limit is 9"):
        validate_topic("a" * 10, max_length=9)


@pytest.mark.parametrize(
    "pattern,topic,expected",
    [
        ("md.>", "md.a", True),
        ("md.>", "md.a.b", True),
        ("md.>", "md", False),
        ("md.*", "md.a", True),
        ("md.*", "md.a.b", False),
        ("*.a", "x.a", True),
        ("md.a", "md.a", True),
        ("md.a", "md.b", False),
        (">", "anything.at.all", True),
    ],
)
def test_matches(pattern, topic, expected):
    assert matches(pattern, topic) is expected


def test_index_dedupes_and_orders_subscribers():
    index = SubscriptionIndex()
    index.add("md.>", "a")
    index.add("md.*.x", "b")
    index.add("md.q.x", "c")
    index.add("md.q.x", "a")
    assert index.lookup("md.q.x") == ("c", "a", "b")
    assert index.lookup("md") == ()
    assert not index.add("md.>", "a")
    assert not index.remove("nope.>", "a")


def test_index_cache_is_invalidated_by_subscribe_and_unsubscribe():
    index = SubscriptionIndex()
    assert index.lookup("md.a") == ()
    assert index.cached_topics == 1
    index.add("md.*", "s1")
    assert index.lookup("md.a") == ("s1",)
    index.add("md.a", "s2")
    assert index.lookup("md.a") == ("s2", "s1")
    index.lookup("other.topic")
    index.add("other.topic", "s3")
    assert "md.a" in index._cache  # an exact change drops only its own topic
    assert index.lookup("other.topic") == ("s3",)
    index.remove("md.*", "s1")
    assert index.lookup("md.a") == ("s2",)


def test_index_prunes_empty_nodes():
    index = SubscriptionIndex()
    index.add("a.*.c.>", 1)
    index.add("a.b", 2)
    index.remove("a.*.c.>", 1)
    index.remove("a.b", 2)
    assert index._root.empty()
    assert len(index) == 0


token = st.sampled_from(["a", "b", "c"])
topic_st = st.lists(token, min_size=1, max_size=4).map(".".join)
pattern_st = st.lists(st.one_of(token, st.just("*")), min_size=1, max_size=4).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join(toks + [">"])])
)
ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "lookup"]), st.one_of(pattern_st, topic_st), st.integers(0, 4), topic_st),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_index_matches_naive_model(operations):
    index = SubscriptionIndex()
    model: set[tuple[str, int]] = set()
    for op, pattern, subscriber, topic in operations:
        if op == "add":
            assert index.add(pattern, subscriber) == ((pattern, subscriber) not in model)
            model.add((pattern, subscriber))
        elif op == "remove":
            assert index.remove(pattern, subscriber) == ((pattern, subscriber) in model)
            model.discard((pattern, subscriber))
        got = index.lookup(topic)
        assert len(got) == len(set(got))
        assert set(got) == {s for p, s in model if matches(p, topic)}
    assert len(index) == len(model)


def test_intersect_is_exactly_the_topics_both_patterns_match():
    from broker.topics import intersect

    assert intersect("md.>", "md.NASDAQ.*") == "md.NASDAQ.*"
    assert intersect("md.NASDAQ.*", "md.>") == "md.NASDAQ.*"
    assert intersect(">", "a.*") == "a.*" and intersect("*.x", "md.>") == "md.x"
    assert intersect("a.*", "*.b") == "a.b" and intersect("a.b", "a.b") == "a.b"
    assert intersect("md.>", "md") is None and intersect("a.*", "b.*") is None and intersect("a.*", "a.b.c") is None
    assert intersect("*.>", "a.>") == "a.>"
    topics = ["a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "b.b.c", "a.b.c.d", "x.y", "x"]
    patterns = ["a", "a.b", "a.*", "a.>", "*.b", "*.*", ">", "a.*.c", "*.b.>", "x.>", "a.b.*", "*", "b.*.c"] + topics
    for p in patterns:
        for q in patterns:
            both = intersect(p, q)
            for t in topics:
                assert (matches(p, t) and matches(q, t)) == (both is not None and matches(both, t)), (p, q, t, both)
