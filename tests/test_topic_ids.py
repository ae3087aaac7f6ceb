"""Topic ids (broker.topic_ids, protocol.md 3.2): unique, small, and in an order that tells a
client at most the power of two below which the number of topics lies."""

from broker.messages import Pub, encode
from broker.topic_ids import FIRST_BLOCK, TopicIds
from conftest import Harness


def test_ids_are_unique_small_and_each_block_a_shuffled_range():
    ids = TopicIds()
    given = [ids.next() for _ in range(5000)]
    assert len(set(given)) == len(given)
    assert sorted(given[:FIRST_BLOCK]) == list(range(FIRST_BLOCK))
    for k in range(6, 12):  # topics 2^k ... 2^(k+1)-1 take exactly the ids of that range
        block = given[1 << k : 1 << (k + 1)]
        assert sorted(block) == list(range(1 << k, 1 << (k + 1)))
    assert max(given) < 2 * len(given)
    # not in the order they were made, and another process (another key) orders them otherwise
    assert given[:FIRST_BLOCK] != list(range(FIRST_BLOCK))
    other = TopicIds()
    assert [other.next() for _ in range(FIRST_BLOCK)] != given[:FIRST_BLOCK]


def test_a_new_connections_first_id_does_not_count_the_topics():
    """With 1,000 topics made, the next topics' ids are anywhere in 512 ... 1023, in no order,
    not 1000, 1001, ..."""
    h = Harness(max_topics=5000)
    p = h.session("p")
    p.receive(encode([Pub(0, f"t.{i}", b"") for i in range(1000)]))
    h.tick()
    firsts = set()
    for i in range(20):
        p.receive(encode(Pub(0, f"late.{i}", b"")))
        firsts.add(h.router.topics[f"late.{i}"].id)
    assert all(512 <= i < 1024 for i in firsts) and len(firsts) == 20
    assert sorted(firsts) != list(range(min(firsts), min(firsts) + 20))  # not consecutive
