"""Recovery replay rate: how fast a subscriber that comes back with `since` gets what it missed.

    python -m bench.recovery                          # 400 topics x 100 messages of 100 bytes
    python -m bench.recovery --topics 100 --messages 99 --runs 9

The broker runs on its default settings (history: 100 messages per topic). A publisher fills
the history of TOPICS topics `rec.N` with MESSAGES + 1 messages each; then, RUNS times, a new
Python client (`broker.client.Client`, what applications use: one callback per message)
subscribes to `rec.>` with a `since` from before the first publish, so every retained message
is replayed, and the time from the `sub` until the last replayed message reached the callback
is measured. Reported: the median replay rate in messages per second (and MB/s of payload), and
the broker's CPU seconds per million replayed messages (from /proc, over the same window).
The default totals 4 MB of payload, within a connection's max_pending_bytes (8 MiB), so one
`sub` replays all of it."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import uvloop

from broker.client import Client, Gap

from .procstat import cpu_seconds
from .report import commit, machine
from .run import free_port, stop_server, wait_port
from .systems import start

PAYLOAD = 100


async def fill(url: str, topics: int, messages: int) -> int:
    """Publish `messages` messages to each topic; returns the time (ms) before the first."""
    async with Client(url) as pub:
        before = int(time.time() * 1000) - 1
        for seq in range(messages):
            for t in range(topics):
                pub.publish(f"rec.{t}", (b"%020d" % seq).ljust(PAYLOAD, b"x"))
            if seq % 50 == 49:
                await pub.drain()
        for t in range(topics):  # every publish before these acks was taken
            await pub.publish_acked(f"rec.{t}", b"end".ljust(PAYLOAD, b"x"))
    return before


async def replay_once(url: str, since_ms: int, expected: int, server_pid: int) -> dict:
    async with Client(url, max_queue=expected + 1) as client:
        got = 0
        gaps = 0
        done = asyncio.Event()

        def on_message(item) -> None:
            nonlocal got, gaps
            if type(item) is Gap:
                gaps += 1
                return
            got += 1
            if got == expected:
                done.set()

        cpu_before = cpu_seconds(server_pid)
        began = time.perf_counter()
        await client.subscribe("rec.>", on_message, since=(since_ms, {}))
        await asyncio.wait_for(done.wait(), 60)
        took = time.perf_counter() - began
        cpu = cpu_seconds(server_pid) - cpu_before
    return {
        "replayed": got,
        "gaps": gaps,
        "seconds": took,
        "msgs_per_s": got / took,
        "mb_per_s": got * PAYLOAD / took / 1e6,
        "broker_cpu_s_per_m": cpu / got * 1e6,
    }


async def measure_async(port: int, pid: int, topics: int, messages: int, runs: int) -> list[dict]:
    url = f"ws://127.0.0.1:{port}/"
    since = await fill(url, topics, messages)
    expected = topics * (messages + 1)
    return [await replay_once(url, since, expected, pid) for _ in range(runs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topics", type=int, default=400)
    parser.add_argument("--messages", type=int, default=99, help="messages per topic before the final acked one (history holds 100)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    port = free_port()
    server = start("broker", port)
    try:
        wait_port(port, server)
        rows = uvloop.run(measure_async(port, server.pid, args.topics, args.messages, args.runs))
    finally:
        stop_server(server)
    for row in rows:
        print(json.dumps(row), flush=True)
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    command = " ".join(["python -m bench.recovery"] + (argv if argv is not None else __import__("sys").argv[1:]))
    print(f"\nCommand: `{command}`  \nCommit: {commit()}, machine: {machine()}\n")
    print("| replayed per run | gaps | replay time | msg/s | MB/s of payload | broker CPU s per M replayed |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {median['replayed']:,.0f} | {median['gaps']:.0f} | {median['seconds'] * 1000:.0f} ms | {median['msgs_per_s']:,.0f} | {median['mb_per_s']:.1f} | {median['broker_cpu_s_per_m']:.2f} |"
    )
    print(f"\nmedian of {len(rows)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
