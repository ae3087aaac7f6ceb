"""What watching costs: publish→ack latency over 100,000 topics with and without open dashboards.

    python -m bench.watching                                   # broker: 0, 1, 16, 0 dashboards
    BENCH_BASELINE_TREE=/tmp/old python -m bench.watching --systems broker-baseline,broker

A broker (its defaults, with an admin port and key, max_topics and the topic-creation burst
raised for 100,000 topics) gets 100,000 topics `md.x.N`, one message each. Then one Python
client (`broker.client.Client`) publishes with `publish_acked` to `md.x.0` at a fixed RATE (an
open loop: each publish is due at its time whatever the others do, and its latency counts from
then, so a broker that stalls for 30 ms delays every publish due in those 30 ms, as it does an
application's), for DURATION seconds per phase; the phases go from no dashboard to one and 16
open dashboards (each an HTTP client reading /dashboard/events, as the page does), ROUNDS
times. Reported per phase: the median, p99 and worst publish→ack latency, the broker's CPU
seconds per second and its full (generation 2) garbage collections in the phase, from
broker_gc_pause_seconds (a broker without that metric: blank); then per system and number of
dashboards, the median over the rounds. Every system named runs in the same command, one
after the other.

The collector's full collections matter here: with 100,000 topics one takes about 70 ms, and
they come with or without dashboards, so the p99 of a phase depends on whether one fell in it.
The median over rounds, and the count beside each phase, keep them apart from what the
dashboards cost."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp
import uvloop

from broker.client import Client

from .procstat import cpu_seconds
from .report import commit, machine
from .run import free_port, stop_server, wait_port
from .systems import start

TOPICS = 100_000
KEY = "bench-watching-key"
PHASES = (0, 1, 16)  # open dashboards, in order, each round


async def make_topics(url: str, topics: int) -> None:
    async with Client(url) as client:
        for i in range(topics):
            client.publish(f"md.x.{i}", b"x")
            if i % 5000 == 4999:
                await client.drain()
        await client.publish_acked(f"md.x.{topics - 1}", b"x")


async def watch(session: aiohttp.ClientSession, admin: int, events: list) -> None:
    """One dashboard: read the event stream, decode each event (as the page does)."""
    async with session.get(f"http://127.0.0.1:{admin}/dashboard/events", headers={"Authorization": f"Bearer {KEY}"}) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:])["topics"])


async def full_collections(session: aiohttp.ClientSession, admin: int) -> float | None:
    """The broker's generation-2 collections so far (None: it has no such metric)."""
    async with session.get(f"http://127.0.0.1:{admin}/metrics", headers={"Authorization": f"Bearer {KEY}"}) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('broker_gc_pause_seconds_count{generation="2"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def phase(url: str, admin: int, dashboards: int, seconds: float, rate: float, pid: int) -> dict:
    events: list = []
    async with aiohttp.ClientSession() as session, Client(url) as client:
        collections = await full_collections(session, admin)
        watchers = [asyncio.ensure_future(watch(session, admin, events)) for _ in range(dashboards)]
        await asyncio.sleep(1.5)  # every dashboard open and past its first event
        rtts: list[float] = []

        async def one(due: float) -> None:
            await client.publish_acked("md.x.0", b"p")
            rtts.append(time.perf_counter() - due)

        pending = []
        cpu_before, began = cpu_seconds(pid), time.perf_counter()
        count = int(seconds * rate)
        for n in range(count):
            due = began + n / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*pending)
        cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - began)
        after = await full_collections(session, admin)
        collections = None if collections is None or after is None else after - collections
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    rtts.sort()
    return {
        "dashboards": dashboards,
        "publishes": len(rtts),
        "events": len(events),
        "p50_ms": statistics.median(rtts) * 1000,
        "p99_ms": rtts[int(len(rtts) * 0.99)] * 1000,
        "max_ms": rtts[-1] * 1000,
        "broker_cpu": cpu,
        "full_gcs": collections,
    }


async def measure(port: int, admin: int, pid: int, seconds: float, rate: float, rounds: int) -> list[dict]:
    url = f"ws://127.0.0.1:{port}/"
    await make_topics(url, TOPICS)
    return [await phase(url, admin, dashboards, seconds, rate, pid) for _ in range(rounds) for dashboards in PHASES]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.watching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default="broker", help="comma-separated: broker, broker-baseline (BENCH_BASELINE_TREE)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishes per phase")
    parser.add_argument("--rate", type=float, default=500.0, help="publishes a second")
    parser.add_argument("--rounds", type=int, default=3, help="times the phases are gone through")
    args = parser.parse_args(argv)
    results = []
    for name in args.systems.split(","):
        port, admin = free_port(), free_port()
        settings = {"admin_port": admin, "admin_api_key": KEY, "max_topics": 200_000, "new_topic_burst": 200_000, "new_topic_rate": 200_000}
        server = start(name, port, broker=settings)
        try:
            wait_port(port, server)
            wait_port(admin, server)
            for row in uvloop.run(measure(port, admin, server.pid, args.duration, args.rate, args.rounds)):
                results.append({"system": name, **row})
                print(json.dumps(results[-1]), flush=True)
        finally:
            stop_server(server)
    command = " ".join(["python -m bench.watching"] + (argv if argv is not None else sys.argv[1:]))
    print(f"\nCommand: `{command}`  \nCommit: {commit()}, machine: {machine()}\n")
    print("| system | open dashboards | p50 | p99 | worst | broker CPU (cores) | full GCs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gcs = "" if r["full_gcs"] is None else f"{r['full_gcs']:.0f}"
        print(
            f"| {r['system']} | {r['dashboards']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['max_ms']:.1f} ms | {r['broker_cpu']:.2f} | {gcs} |"
        )
    print(f"\nmedians over {args.rounds} rounds of {args.duration:g} s at {args.rate:g} publishes/s:\n")
    print("| system | open dashboards | p50 | p99 | worst | broker CPU (cores) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.systems.split(","):
        for dashboards in PHASES:
            rows = [r for r in results if r["system"] == name and r["dashboards"] == dashboards]
            med = {key: statistics.median(r[key] for r in rows) for key in ("p50_ms", "p99_ms", "max_ms", "broker_cpu")}
            print(
                f"| {name} | {dashboards} | {med['p50_ms']:.2f} ms | {med['p99_ms']:.2f} ms | {med['max_ms']:.1f} ms | {med['broker_cpu']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
