from broker.client import Client
from conftest import run, serving, url


def test_pub_sub_round_trip():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub_client:
                sub = await sub_client.subscribe("md.>")
                ack = await pub_client.publish_acked("md.AAPL", b"1")
                pub_client.publish("md.AAPL", b"2")
                first = await sub.next(5)
                second = await sub.next(5)
                assert (first.topic, first.seq, first.data) == ("md.AAPL", 1, b"1")
                assert (second.seq, second.data) == (2, b"2")
                assert ack.seq == 1 and ack.epoch == first.epoch == server.router.epoch

    run(main())
