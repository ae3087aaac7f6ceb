"""Connection density: memory per idle subscribed connection, and one fan-out to all of them.

    python -m bench.density                                   # broker, nats, bun at 10,000; broker at 19,000
    python -m bench.density --rows broker:19000 --fleet-procs 2

For each row SYSTEM:N: start the system on its default settings (the broker's
max_connections and max_connections_per_ip raised to N + 100: every connection comes from
127.0.0.1) and measure its resident memory (RSS, from /proc, with its child processes); open
N WebSocket connections from the Bun fleet, split over at least two processes (one process may
hold about 20,000 descriptors here), each subscribed to the same topic, and wait until every
subscription is confirmed (broker: ack, NATS: PONG, Bun: its barrier); measure RSS again:
(after - before) / N is the cost of one idle subscribed connection. Then publish one 100-byte
message to the topic and time how long until every connection has it (counted by each
connection)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import uvloop

from .counters import Counters
from .fleetproc import Fleet
from .loadgen import connect
from .procstat import rss_bytes
from .report import commit, machine
from .run import free_port, stop_server, wait_port
from .systems import ROOT, SYSTEMS, start

TOPIC = "density.t0"
PER_PROCESS = 9_500  # connections per fleet process, below its descriptor limit
SETTLE = 2.0  # s for the system to finish allocating before RSS is read


async def publish_once(system_name: str, port: int, counters: Counters, expected: int, timeout: float) -> tuple[float, int]:
    """Publish one message, then wait until `expected` deliveries are counted: (seconds, counted)."""
    system = SYSTEMS[system_name]
    client = await connect(system, "127.0.0.1", port, [])
    await asyncio.sleep(0.2)
    opcode, frame = system.publish([(TOPIC, (b"%020d" % time.monotonic_ns() + b"x" * 100)[:100])])
    began = time.monotonic()
    client.send(frame, opcode)
    deadline = began + timeout
    while counters.total() < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    took = time.monotonic() - began
    client.transport.abort()
    return took, int(counters.total())


def measure(system_name: str, connections: int, procs: int, timeout: float) -> dict:
    procs = max(procs, 2, math.ceil(connections / PER_PROCESS))
    port = free_port()
    # every connection comes from 127.0.0.1: past max_connections_per_ip (1,000) and, at 19,000,
    # max_connections (10,000); the publisher's connection and a margin on top
    server = start(
        system_name, port, defaults=True, broker={"max_connections": connections + 100, "max_connections_per_ip": connections + 100}
    )
    counters = Counters.create(procs)
    fleets: list[Fleet] = []
    try:
        wait_port(port, server)
        time.sleep(SETTLE)
        before = rss_bytes(server.pid)
        shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
        began = time.monotonic()
        for slot, share in enumerate(shares):
            fleets.append(Fleet(SYSTEMS[system_name], port, [[TOPIC]] * share, counters.path, slot, ready_timeout=timeout))
        for fleet in fleets:
            fleet.wait_ready()
        counters.unlink()  # every process has it mapped
        connect_s = time.monotonic() - began
        time.sleep(SETTLE)
        after = rss_bytes(server.pid)
        took, counted = uvloop.run(publish_once(system_name, port, counters, connections, timeout))
        marks = [fleet.ask("mark") for fleet in fleets]
        received = sum(1 for m in marks for n in m["per_conn"] if n == 1)
        return {
            "system": system_name,
            "connections": connections,
            "fleet_procs": procs,
            "rss_before": before,
            "rss_after": after,
            "bytes_per_connection": (after - before) / connections,
            "connect_s": connect_s,
            "fanout_ms": took * 1000,
            "received": received,
            "counted": counted,
            "open": sum(m["open"] for m in marks),
            "alive": server.poll() is None,
        }
    finally:
        for fleet in fleets:
            fleet.close()
        stop_server(server)
        counters.close(remove=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| system | connections | RSS before | RSS after | bytes per idle subscribed connection | one publish reaches all in | received |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['connections']:,} | {r['rss_before'] / 2**20:,.1f} MiB | {r['rss_after'] / 2**20:,.1f} MiB | "
            f"{r['bytes_per_connection']:,.0f} ({r['bytes_per_connection'] / 1024:,.1f} KiB) | {r['fanout_ms']:,.1f} ms | "
            f"{r['received']:,} of {r['connections']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.density", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="broker:10000,nats:10000,bun:10000,broker:19000", help="SYSTEM:CONNECTIONS,...")
    parser.add_argument("--fleet-procs", type=int, default=2, help="fleet processes (at least 2, more when needed)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for connecting, and for the fan-out")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    plan = []
    for item in args.rows.split(","):
        name, _, count = item.strip().partition(":")
        if name not in SYSTEMS or not count.isdigit():
            parser.error(f"bad row {item!r}: SYSTEM:CONNECTIONS with SYSTEM in {', '.join(SYSTEMS)}")
        plan.append((name, int(count)))
    rows = []
    for name, count in plan:
        try:
            r = measure(name, count, args.fleet_procs, args.timeout)
        except Exception as exc:
            print(f"density failed: {name} {count}: {exc}", file=sys.stderr, flush=True)
            continue
        rows.append(r)
        print(json.dumps(r), flush=True)
    text = (
        f"Command: `{' '.join(['python -m bench.density'] + (argv if argv is not None else sys.argv[1:]))}`  \n"
        f"Commit: {commit()}, machine: {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
        "Systems on their default settings (the broker's max_connections and max_connections_per_ip raised to N + 100: "
        "every connection comes from 127.0.0.1); RSS from /proc (with child processes).\n\n" + table(rows)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"density-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    print(text)
    return 0 if len(rows) == len(plan) else 1


if __name__ == "__main__":
    raise SystemExit(main())
