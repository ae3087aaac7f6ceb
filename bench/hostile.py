"""Hostile frames, measured: what one client sending frames that are cheap to send and dear to
decode does to an honest publisher and subscriber of another topic.

    python -m bench.hostile                                   # every kind, the broker here
    python -m bench.hostile --kinds trailing,bad-trailing --duration 4
    BENCH_BASELINE_TREE=/path python -m bench.hostile --systems broker,broker-baseline --runs 3

For each kind of frame a fresh broker (default settings) serves an honest subscriber of
`honest.t` and an honest publisher (bench/attack.py's), measured first quietly and then while
an attacker sends frames of that kind back to back, as fast as the broker reads them:
- throughput: closed loop, delivered messages per second;
- latency: 1,000 timestamped messages per second, p50 and p99 from publish to delivery;
- the attacker's frames written per second, the replies it got, and the broker's CPU.
With --runs N each row is the median of N runs (the systems take turns within a run).

Kinds (each frame is about max_frame_bytes, 1 MiB):
- `payloads`, for comparison: an honest frame of two fire-and-forget publishes of 512 KiB
  to a topic nobody subscribes to (the broker's compiled fast path);
- `trailing`: a valid fire-and-forget `pub` followed by about a million extra elements;
- `int-array`: a `pub` whose data is an array of about a million integers;
- `bad-trailing`: a `sub` whose `since` is an integer, followed by about a million elements
  (invalid, so the error path looks at its elements);
- `since-maps`: a batch of four `sub`s, each with a pattern `since` map of 10,000 positions
  that the pattern does not match (refused with code 10 after decoding): the most a frame may
  hold inside the broker's bounds, and the dearest such frame to decode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import msgspec
import uvloop

from .attack import Honest, phase
from .loadgen import connect
from .procstat import cpu_seconds
from .report import commit, machine
from .run import free_port, stop_server, wait_port
from .systems import SYSTEMS, start

FRAME_BYTES = 1 << 20
encode = msgspec.msgpack.encode


def _array32(count: int) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big")


def hostile_frame(kind: str, size: int = FRAME_BYTES) -> bytes:
    """One frame of `kind`, at most `size` bytes."""
    if kind == "trailing":
        head = encode(["pub", 0, "hostile.t", b"x", ""])[1:]
        extra = size - len(head) - 5
        return _array32(5 + extra) + head + b"\x01" * extra
    if kind == "int-array":
        head = b"\x94" + encode("pub") + b"\x01" + encode("hostile.t")
        count = size - len(head) - 5
        return head + _array32(count) + b"\x01" * count
    if kind == "bad-trailing":
        head = encode(["sub", 0, "hostile.t", 1])[1:]
        extra = size - len(head) - 5
        return _array32(4 + extra) + head + b"\x01" * extra
    if kind == "payloads":
        half = (size - 64) // 2 - 16
        return encode([["pub", 0, "hostile.t", bytes(half)], ["pub", 0, "hostile.t", bytes(half)]])
    if kind == "since-maps":
        positions = {f"other.{i}": [1, 1] for i in range(10_000)}
        return encode([["sub", 0, "hostile.>", [1, positions]] for _ in range(4)])
    raise ValueError(f"unknown kind {kind}")


KINDS = ("payloads", "trailing", "int-array", "bad-trailing", "since-maps")


class Attacker:
    """Sends one prebuilt frame over and over while its transport takes more; counts replies."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.sent = 0
        self.replies = 0
        self.kinds: dict[str, int] = {}
        self.stop = asyncio.Event()

    def on_data(self, client) -> None:
        for payload in client.scanner.samples:
            for message in msgspec.msgpack.decode(payload):
                self.replies += 1
                key = f"{message[0]} {message[2]}" if message[0] == "err" else message[0]
                self.kinds[key] = self.kinds.get(key, 0) + 1
        client.scanner.samples = []

    async def run(self, client) -> None:
        while not self.stop.is_set() and not client.transport.is_closing():
            if client.paused:
                await asyncio.sleep(0.001)
                continue
            client.send(self.frame)
            self.sent += 1
            await asyncio.sleep(0)


async def measure_async(system_name: str, port: int, server_pid: int, kind: str, seconds: float) -> list[dict]:
    system = SYSTEMS[system_name]
    honest = Honest(system, port)
    await honest.open()
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    quiet = await phase(honest, system, port, seconds)
    quiet.update(
        phase="quiet", kind=kind, attack_frames_per_s=0.0, replies=0, system_cpu=(cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
    )

    attacker = Attacker(hostile_frame(kind))
    client = await connect(system, "127.0.0.1", port, [], sample=True, on_data=attacker.on_data)
    task = asyncio.ensure_future(attacker.run(client))
    await asyncio.sleep(0.5)
    cpu0, t0, sent0 = cpu_seconds(server_pid), time.monotonic(), attacker.sent
    under = await phase(honest, system, port, seconds)
    elapsed = time.monotonic() - t0
    under.update(
        phase="attack",
        kind=kind,
        attack_frames_per_s=(attacker.sent - sent0) / elapsed,
        replies=attacker.replies,
        reply_kinds=attacker.kinds,
        attacker_close=client.close_code,
        system_cpu=(cpu_seconds(server_pid) - cpu0) / elapsed,
    )
    attacker.stop.set()
    await task
    for c in (client, honest.sub, honest.pub):
        c.transport.abort()
    return [quiet, under]


def measure(system_name: str, kind: str, seconds: float) -> list[dict]:
    port = free_port()
    server = start(system_name, port, defaults=True)
    try:
        wait_port(port, server)
        rows = uvloop.run(measure_async(system_name, port, server.pid, kind, seconds))
    finally:
        stop_server(server)
    for row in rows:
        row["system"] = system_name
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per (system, kind, phase), each number the median over the runs."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["kind"], row["phase"]), []).append(row)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for key, value in group[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = statistics.median(r[key] for r in group)
        row["runs"] = len(group)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| system | frames | phase | honest msg/s | p50 ms | p99 ms | hostile frames/s | system CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['kind']} | {r['phase']} | {r['honest_msgs_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['attack_frames_per_s']:.0f} | {r['system_cpu']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default="broker")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each measurement")
    parser.add_argument("--runs", type=int, default=1, help="runs of everything; the table shows medians")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for name in systems:
        if not name.startswith("broker") or name not in SYSTEMS:
            parser.error(f"not a broker system: {name}")
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind}")
    rows = []
    for _ in range(args.runs):
        for kind in kinds:
            for name in systems:
                for row in measure(name, kind, args.duration):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    command = " ".join(["python -m bench.hostile"] + (argv if argv is not None else __import__("sys").argv[1:]))
    print(f"Command: `{command}`  \nCommit: {commit()}, machine: {machine()}\n")
    print(table(sorted(medians(rows), key=lambda r: (kinds.index(r["kind"]), systems.index(r["system"]), r["phase"] != "quiet"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
