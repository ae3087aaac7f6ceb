"""Idempotent publish: a msg_id repeated within the dedupe window is acknowledged with the
original sequence number and not delivered again (sans-I/O core and a real server)."""

from test_history import LaterBackplane

from broker.client import Client
from broker.errors import ErrorCode
from broker.messages import Ack, Delivery, Err, Pub, Sub, encode
from broker.router import Router
from conftest import Harness, eventually, run, serving, url


def test_a_repeated_msg_id_is_acknowledged_with_the_original_seq_and_delivered_once():
    h = Harness()
    s, p = h.session("s"), h.session("p")
    s.receive(encode(Sub(0, "t")))
    p.receive(encode([Pub(1, "t", b"a", "p1-1"), Pub(2, "t", b"b", "p1-2"), Pub(3, "t", b"a again", "p1-1")]))
    written, _ = h.tick()
    assert written["p"] == [Ack(1, 42, 1), Ack(2, 42, 2), Ack(3, 42, 1)]
    assert written["s"] == [Delivery("t", 42, 1, [b"a", b"b"])]
    p.receive(encode([Pub(4, "t", b"later", "p1-2"), Pub(5, "u", b"other topic", "p1-1"), Pub(0, "t", b"x", "p1-1")]))
    written, _ = h.tick()
    assert written["p"] == [Ack(4, 42, 2), Ack(5, 42, 1)]
    assert "s" not in written
    assert h.router.stats.duplicates == 3


def test_a_msg_id_is_forgotten_after_the_window_and_past_the_bound():
    h = Harness()
    h.router.dedupe.window_ms = 1000
    p = h.session("p")
    p.receive(encode(Pub(1, "t", b"a", "m")))
    h.now += 2.0
    p.receive(encode(Pub(2, "t", b"a", "m")))
    assert h.tick()[0]["p"] == [Ack(1, 42, 1), Ack(2, 42, 2)]
    h.router.dedupe.max_ids = 3
    p.receive(encode([Pub(0, "t", b"x", f"n{i}") for i in range(5)]))
    assert len(h.router.dedupe) <= 3
    p.receive(encode([Pub(6, "t", b"x", "n0"), Pub(7, "t", b"x", "n4")]))
    assert h.tick()[0]["p"] == [Ack(6, 42, 8), Ack(7, 42, 7)]  # n0 was forgotten, n4 not


def test_a_repeat_before_the_original_is_sequenced_waits_for_its_seq():
    h = Harness()
    h.router.use_backplane(backplane := LaterBackplane(clock=lambda: h.now))
    s, p = h.session("s"), h.session("p")
    s.receive(encode(Sub(0, "t")))
    p.receive(encode([Pub(1, "t", b"a", "m"), Pub(2, "t", b"a", "m")]))
    assert h.tick()[0] == {}
    backplane.sequence(h.router)
    written, _ = h.tick()
    assert written["p"] == [Ack(1, 42, 1), Ack(2, 42, 1)]
    assert written["s"] == [Delivery("t", 42, 1, [b"a"])]


def test_a_msg_id_too_long_is_refused_with_the_request_id():
    h = Harness()
    p = h.session("p")
    p.receive(encode(Pub(9, "t", b"a", "x" * 129)))
    (err,) = h.tick()[0]["p"]
    assert type(err) is Err and err.id == 9 and err.code == ErrorCode.BAD_MESSAGE


def test_publish_acked_with_a_msg_id_through_a_real_server():
    async def main():
        async with serving(dedupe_window_s=5) as server:
            async with Client(url(server)) as client:
                got = []
                await client.subscribe("d.t", got.append)
                first = await client.publish_acked("d.t", b"once", msg_id="order-17")
                again = await client.publish_acked("d.t", b"once", msg_id="order-17")
                assert first == again and first.seq == 1
                await client.publish_acked("d.t", b"next")
                await eventually(lambda: len(got) == 2, 5, "the deliveries")
                assert [m.data for m in got] == [b"once", b"next"]
                assert server.router.stats.duplicates == 1

    run(main())


def test_router_defaults():
    router = Router(lambda: None)
    assert router.dedupe.window_ms == 120_000 and router.dedupe.max_ids == 100_000


def test_publish_acked_survives_a_lost_ack_exactly_once():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client:
                got = []
                await sub_client.subscribe("d.once", got.append)
                client = await Client.connect(url(server), reconnect_delay=(0.01, 0.05))
                real = client.protocol.receive
                lost = []

                def lose_the_first_ack(data):
                    if not lost:  # the broker published it; the ack dies with the connection
                        lost.append(bytes(data))
                        client.abort()
                        return
                    real(data)

                client.protocol.receive = lose_the_first_ack
                ack = await client.publish_acked("d.once", b"exactly once")
                assert lost and ack.seq == 1 and client.reconnects == 1
                await client.publish_acked("d.once", b"then this")
                await eventually(lambda: len(got) == 2, 5, "the deliveries")
                assert [m.data for m in got] == [b"exactly once", b"then this"]
                assert server.router.stats.duplicates == 1
                await client.close()

    run(main())


def test_publishes_held_offline_carry_msg_ids_and_are_acknowledged():
    async def main():
        async with serving() as server:
            port = server.port
            client = await Client.connect(url(server), reconnect_delay=(0.02, 0.1))
        client.publish("d.off", b"1")
        client.publish("d.off", b"2")
        assert [(t, d) for t, d, _ in client.protocol.offline] == [("d.off", b"1"), ("d.off", b"2")]
        assert len({m for _, _, m in client.protocol.offline}) == 2
        async with serving(port=port) as server:
            async with Client(url(server)) as sub_client:
                got = []
                await sub_client.subscribe("d.off", got.append, since=(0, 0))
                await eventually(lambda: len(got) == 2 and not client.protocol.inflight, 10, "the held publishes")
                assert [m.data for m in got] == [b"1", b"2"]
        await client.close()

    run(main())
