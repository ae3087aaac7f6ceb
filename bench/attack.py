"""The overlapping-pattern attack, measured: what one client holding thousands of overlapping
wildcard patterns, and churning subscriptions while it publishes to new matching topics, does
to an honest publisher and subscriber of another topic and to new connections.

    python -m bench.attack                                         # broker and nats
    BENCH_BASELINE_TREE=/path BENCH_BASELINE_PROTOCOL=broker-old python -m bench.attack --systems broker,broker-baseline

For each system (on its default settings): an honest subscriber of `honest.t` and an honest
publisher measure, first quietly and then under attack,
- throughput: closed loop, at most WINDOW messages in flight, delivered messages per second;
- latency: 1,000 timestamped messages per second, p50 and p99 from publish to delivery;
- connection time: new WebSocket connections (handshake completed), p50 and max.
The attacker subscribes PATTERNS patterns of DEPTH tokens, each `a` or `*`, then `>` (every one
matches every topic `a.a. ... .a.<x>`), then sends RATE frames a second, each subscribing to a
new pattern, unsubscribing it and publishing to a new topic that all its patterns match."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import msgspec
import uvloop

from .loadgen import STAMP, WSClient, connect
from .procstat import cpu_seconds
from .report import commit, machine
from .run import free_port, stop_server, wait_port
from .systems import SYSTEMS, System, start

HONEST = "honest.t"
DEPTH = 13
WINDOW = 2000


def patterns(count: int) -> list[str]:
    return [".".join(bits) + ".>" for bits in itertools.islice(itertools.product("a*", repeat=DEPTH), count)]


def attack_topic(n: int) -> str:
    return ".".join(["a"] * DEPTH) + f".n{n}"


def subscribe_frames(system: System, subs: list[str]) -> list[tuple[int, bytes]]:
    """The attacker's subscriptions, in frames of at most 1,000."""
    out = []
    for first in range(0, len(subs), 1000):
        chunk = subs[first : first + 1000]
        if system.name == "nats":
            out.append((1, b"".join(b"SUB %s %d\r\n" % (p.encode(), first + i + 1) for i, p in enumerate(chunk))))
        else:
            out.append((2, msgspec.msgpack.encode([["sub", 0, p] for p in chunk])))
    return out


def churn_frame(system: System, n: int) -> tuple[int, bytes]:
    """Subscribe to a new pattern, unsubscribe it, publish to a new topic all patterns match."""
    x = attack_topic(n)
    if system.name == "nats":
        sid = 1_000_000 + n
        return 1, b"SUB %s.> %d\r\nUNSUB %d\r\nPUB %s 1\r\nx\r\n" % (x.encode(), sid, sid, x.encode())
    return 2, msgspec.msgpack.encode([["sub", 0, x + ".>"], ["unsub", 0, x + ".>"], ["pub", 0, x, b"x"]])


class Honest:
    """The honest publisher and subscriber, and what the subscriber has seen."""

    def __init__(self, system: System, port: int) -> None:
        self.system, self.port = system, port
        self.latencies: list[int] = []
        self.timing = False
        self.carry = bytearray()
        self.arrived = asyncio.Event()

    async def open(self) -> None:
        self.sub = await connect(self.system, "127.0.0.1", self.port, [HONEST], sample=True, on_data=self._on_data)
        self.pub = await connect(self.system, "127.0.0.1", self.port, [])
        await asyncio.sleep(0.3)

    def _on_data(self, client: WSClient) -> None:
        samples = client.scanner.samples
        if samples:
            now = time.monotonic_ns()
            if self.timing:
                for frame in samples:
                    for payload in self.system.payloads(frame, self.carry):
                        self.latencies.append(now - int(payload[:STAMP]))
            client.scanner.samples = []
        self.arrived.set()

    def received(self) -> int:
        return self.sub.scanner.messages

    async def throughput(self, seconds: float) -> float:
        """Closed loop: at most WINDOW messages in flight; delivered messages per second."""
        opcode, frame = self.system.publish([(HONEST, b"%020d" % 0 + bytes(80))] * 64)
        sent = self.received()
        start_count, started = sent, time.monotonic()
        while time.monotonic() - started < seconds:
            if sent - self.received() + 64 > WINDOW:
                self.arrived.clear()
                try:
                    async with asyncio.timeout(0.01):
                        await self.arrived.wait()
                except TimeoutError:
                    pass
                continue
            self.pub.send(frame, opcode)
            sent += 64
            await asyncio.sleep(0)
        elapsed = time.monotonic() - started
        done = self.received() - start_count
        deadline = time.monotonic() + 5
        while self.received() < sent and time.monotonic() < deadline:  # drain
            await asyncio.sleep(0.01)
        return done / elapsed

    async def latency(self, seconds: float, rate: int = 1000) -> tuple[float, float]:
        """p50 and p99 in ms of `rate` timestamped messages a second."""
        self.latencies = []
        self.timing = True
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            n += 1
            opcode, frame = self.system.publish([(HONEST, b"%020d" % time.monotonic_ns() + bytes(80))])
            self.pub.send(frame, opcode)
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await asyncio.sleep(1.0)
        self.timing = False
        ordered = sorted(self.latencies)
        if not ordered:
            return float("inf"), float("inf")
        return ordered[len(ordered) // 2] / 1e6, ordered[int(len(ordered) * 0.99)] / 1e6


async def connect_times(system: System, port: int, count: int = 10) -> tuple[float, float]:
    """p50 and max in ms of `count` new connections (handshake completed)."""
    times = []
    for _ in range(count):
        began = time.monotonic()
        client = await connect(system, "127.0.0.1", port, [])
        times.append((time.monotonic() - began) * 1000)
        client.transport.abort()
        await asyncio.sleep(0.05)
    return statistics.median(times), max(times)


async def phase(honest: Honest, system: System, port: int, seconds: float) -> dict:
    rate = await honest.throughput(seconds)
    p50, p99 = await honest.latency(seconds)
    c50, cmax = await connect_times(system, port)
    return {"honest_msgs_per_s": rate, "p50_ms": p50, "p99_ms": p99, "connect_p50_ms": c50, "connect_max_ms": cmax}


async def measure_async(system_name: str, port: int, server_pid: int, n_patterns: int, rate: float, seconds: float) -> list[dict]:
    system = SYSTEMS[system_name]
    honest = Honest(system, port)
    await honest.open()
    rows = []
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    quiet = await phase(honest, system, port, seconds)
    quiet.update(phase="quiet", attack_frames_per_s=0.0, system_cpu=(cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0))
    rows.append(quiet)

    attacker = await connect(system, "127.0.0.1", port, [])
    for opcode, frame in subscribe_frames(system, patterns(n_patterns)):
        attacker.send(frame, opcode)
    await asyncio.sleep(2.0)  # let the subscriptions settle
    stop = asyncio.Event()
    sent = 0

    async def attack() -> None:
        nonlocal sent
        began = time.monotonic()
        while not stop.is_set():
            opcode, frame = churn_frame(system, sent)
            attacker.send(frame, opcode)
            sent += 1
            await asyncio.sleep(max(0.0, began + sent / rate - time.monotonic()))

    task = asyncio.ensure_future(attack())
    await asyncio.sleep(0.5)
    cpu0, t0, sent0 = cpu_seconds(server_pid), time.monotonic(), sent
    under = await phase(honest, system, port, seconds)
    elapsed = time.monotonic() - t0
    under.update(phase="attack", attack_frames_per_s=(sent - sent0) / elapsed, system_cpu=(cpu_seconds(server_pid) - cpu0) / elapsed)
    stop.set()
    await task
    rows.append(under)
    for client in (attacker, honest.sub, honest.pub):
        client.transport.abort()
    return rows


def measure(system_name: str, n_patterns: int, rate: float, seconds: float) -> list[dict]:
    port = free_port()
    server = start(system_name, port, defaults=True)
    try:
        wait_port(port, server)
        rows = uvloop.run(measure_async(system_name, port, server.pid, n_patterns, rate, seconds))
    finally:
        stop_server(server)
    for row in rows:
        row["system"] = system_name
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| system | phase | honest msg/s | p50 ms | p99 ms | new connection p50 / max ms | attack frames/s | system CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['phase']} | {r['honest_msgs_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['connect_p50_ms']:.1f} / {r['connect_max_ms']:.1f} | {r['attack_frames_per_s']:.0f} | {r['system_cpu']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default="broker,nats")
    parser.add_argument("--patterns", type=int, default=8192)
    parser.add_argument("--rate", type=float, default=250.0, help="attack frames per second")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each measurement")
    args = parser.parse_args(argv)
    rows = []
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name}")
        for row in measure(name, args.patterns, args.rate, args.duration):
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = " ".join(["python -m bench.attack"] + (argv if argv is not None else __import__("sys").argv[1:]))
    print(f"Command: `{command}`  \nCommit: {commit()}, machine: {machine()}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
