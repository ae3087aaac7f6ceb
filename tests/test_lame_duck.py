"""Lame-duck mode (SIGUSR2), as NATS has it: a node stops accepting, then tells its clients to
move (close 4010) a share at a time, spread over lame_duck_duration_s, and stops. The Python
client reconnects at once to the next node and recovers there, so a rolling restart loses
nothing and never sends every client of a node to the others at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

from broker.client import Client, Gap
from conftest import free_port, run
from redis_support import BrokerNode

CLIENTS = 20
DURATION_S = 2.0
GRACE_S = 0.5


def readyz(admin: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=3) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_a_node_in_lame_duck_mode_moves_its_clients_to_another_spread_over_time_and_nothing_is_lost(redis_url, redis_prefix):
    admin = free_port()
    common = ("--redis-url", redis_url, "--redis-prefix", redis_prefix)
    leaving = BrokerNode(
        *common, "--admin-port", str(admin), "--lame-duck-duration-s", str(DURATION_S), "--lame-duck-grace-s", str(GRACE_S)
    )
    staying = BrokerNode(*common)
    try:

        async def main():
            moved_at: dict[int, float] = {}
            closes: list[str] = []

            def watcher(n: int):
                def on_state(state: str, detail: str) -> None:
                    if state == "disconnected" and detail.startswith("40"):
                        closes.append(detail)
                    if state == "connected" and detail == staying.url:
                        moved_at[n] = time.monotonic()

                return on_state

            clients = [Client([leaving.url, staying.url], on_state=watcher(n), reconnect_delay=(0.5, 1.0)) for n in range(CLIENTS)]
            for client in clients:
                await client.open()
            assert all(client.url == leaving.url for client in clients)
            subs = [await client.subscribe("ld.>") for client in clients]
            sent = 0
            publishing = True

            async def publish() -> None:
                nonlocal sent
                async with Client(staying.url) as publisher:
                    while publishing:
                        await publisher.publish_acked("ld.t", b"%d" % (sent + 1))
                        sent += 1
                        await asyncio.sleep(0.005)

            publisher = asyncio.ensure_future(publish())
            while sent < 20:
                await asyncio.sleep(0.01)
            began = time.monotonic()
            leaving.proc.send_signal(signal.SIGUSR2)
            await asyncio.sleep(0.2)
            status, body = await asyncio.get_running_loop().run_in_executor(None, readyz, admin)
            assert status == 503 and body["state"] == "lame duck" and body["listening"] is False, body
            assert moved_at == {}  # the grace: load balancers notice before any client is told
            deadline = time.monotonic() + GRACE_S + DURATION_S + 10
            while len(moved_at) < CLIENTS:
                assert time.monotonic() < deadline, f"moved: {len(moved_at)} of {CLIENTS}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            publishing = False
            await publisher
            times = sorted(moved_at.values())
            # spread over the duration, not all at once: the first after the grace, the last
            # about DURATION_S later, and no more than a few in any tenth of a second
            assert times[0] - began >= GRACE_S - 0.1
            assert times[-1] - times[0] >= DURATION_S * 0.6, [round(t - began, 2) for t in times]
            assert max(sum(1 for t in times if start <= t < start + 0.1) for start in times) <= CLIENTS // 4
            assert set(closes) == {"4010: lame duck: reconnect to another node"}, closes
            # each subscriber got every message once, in order, across the move (recovered on
            # the other node with since)
            for n, sub in enumerate(subs):
                seqs = []
                while True:
                    item = await sub.next(5)
                    assert not isinstance(item, Gap), (n, item)
                    seqs.append(item.seq)
                    if item.seq == sent:
                        break
                assert seqs == list(range(1, sent + 1)), (n, seqs[:5])
            for client in clients:
                await client.close()

        run(main(), timeout=60)
        assert leaving.proc.wait(10) == 0
        log = leaving.stderr()
        assert "event=lame_duck " in log and "close_code=4010" in log, log
    finally:
        leaving.close()
        staying.close()
