"""Runs benchmark scenarios against the broker and its peers, in one run, on one machine.

    python -m bench.run --scenarios a,b,c,d,e --systems broker,ceiling,nats,bun,naive --runs 3

For every scenario and system: start the system, connect the subscribers (separate processes),
publish (closed loop for throughput, fixed rate for latency), measure delivered messages/s over
a window after a warm-up, stop publishing, wait for every subscriber to drain, and count what
was published and never delivered. CPU of the system and of the load generator is recorded.
Medians over the runs go to a Markdown table (and JSON) with the command, commit and machine."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from broker.topics import matches

from .loadgen import publisher_main, subscriber_main
from .systems import ROOT, SYSTEMS, start

CLOCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    key: str
    title: str
    topics: list[str]
    subscribers: list[list[str]]  # patterns of each subscriber connection
    payload: int = 100
    batch: int = 200
    window: int = 0  # deliveries in flight, summed over subscribers (0: 256 KiB of payload per subscriber)
    rate: float = 0.0  # publishes/s; 0 = closed loop
    duration: float = 5.0

    def __post_init__(self) -> None:
        if not self.window:
            self.window = max(2000, len(self.subscribers) * (256 << 10) // (self.payload + 32))


def scenarios() -> dict[str, Scenario]:
    many = [f"bench.t{i}" for i in range(100)]
    md = [f"md.x{x}.s{n}" for x in range(10) for n in range(100)]
    out = {
        "a": Scenario("a", "fan-out: 1 topic, 100 subscribers", ["bench.t0"], [["bench.t0"]] * 100),
        "b": Scenario("b", "many topics: 100 topics x 10 subscribers", many, [[t] for t in many for _ in range(10)], batch=400),
        "c": Scenario("c", "wildcard: 1,000 topics md.X.N, 100 subscribers on md.>", md, [["md.>"]] * 100, batch=500),
        "d5": Scenario("d5", "latency: 100 subscribers, 5,000 publishes/s", ["bench.t0"], [["bench.t0"]] * 100, rate=5000),
        "d20": Scenario("d20", "latency: 100 subscribers, 20,000 publishes/s", ["bench.t0"], [["bench.t0"]] * 100, rate=20000),
        "e": Scenario("e", "large payloads: 16 KiB, 10 subscribers", ["bench.t0"], [["bench.t0"]] * 10, payload=16384, batch=16),
    }
    return out


def reply(pipe, timeout: float = 60.0):
    """The answer of a load-generator process; fails the run instead of hanging if it died."""
    if not pipe.poll(timeout):
        raise RuntimeError("a load generator process did not answer")
    return pipe.recv()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def expand(system_name: str, patterns: list[str], topics: list[str]) -> list[str]:
    if SYSTEMS[system_name].wildcards:
        return patterns
    return [t for t in topics if any(matches(p, t) for p in patterns)]


def run_once(system_name: str, sc: Scenario, sub_procs: int, warmup: float) -> dict:
    ctx = mp.get_context("spawn")
    port = free_port()
    server = start(system_name, port)
    procs, pipes = [], []
    try:
        wait_port(port, server)
        pacer_patterns = expand(system_name, sc.subscribers[0], sc.topics)
        rest = [expand(system_name, p, sc.topics) for p in sc.subscribers[1:]]
        groups = [g for g in (rest[i::sub_procs] for i in range(sub_procs)) if g]
        shared = ctx.Array("q", len(groups) + 1, lock=False)
        for slot, group in enumerate(groups):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=subscriber_main, args=(theirs, system_name, "127.0.0.1", port, group, shared, slot), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(ours)
        for pipe in pipes:
            if not pipe.poll(60):
                raise RuntimeError("subscriber process did not get ready")
            assert pipe.recv() == "ready"
        ours, theirs = ctx.Pipe()
        pub = ctx.Process(
            target=publisher_main,
            args=(theirs, system_name, "127.0.0.1", port, sc.topics, pacer_patterns, sc.payload, sc.batch, sc.window, sc.rate,
                  [sum(1 for s in sc.subscribers if any(matches(p, t) for p in s)) for t in sc.topics], shared, len(groups)),
            daemon=True,
        )
        pub.start()
        procs.append(pub)
        if not ours.poll(60):
            raise RuntimeError("publisher did not get ready")
        assert ours.recv() == "ready"
        pipes.append(ours)
        time.sleep(0.5)  # let every subscription settle (not every system acknowledges one)

        def mark():
            out = []
            for pipe in pipes:
                pipe.send("mark")
            for pipe in pipes:
                out.append(reply(pipe))
            return out, proc_cpu(server.pid), time.monotonic()

        ours.send("go")
        reply(ours)
        time.sleep(warmup)
        m0, s0, t0 = mark()
        time.sleep(sc.duration)
        m1, s1, t1 = mark()
        ours.send("stop")
        stopped = reply(ours)
        published = stopped["published"]
        # drain: wait until nothing more arrives (or everything expected did)
        expected = []
        for patterns in [pacer_patterns] + rest:
            expected.append(sum(n for t, n in published.items() if any(matches(p, t) for p in patterns)))
        last, still = None, 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m, _, _ = mark()
            received = sum(sum(x["messages"]) for x in m)
            if received >= sum(expected):
                break
            if received == last:
                still += 0.2
                if still >= 2.0:
                    break
            else:
                still = 0.0
            last = received
            time.sleep(0.2)
        final, _, _ = mark()
        ours.send("latency")
        lat = reply(ours)
        elapsed = t1 - t0
        delivered = sum(sum(x["messages"]) for x in m1) - sum(sum(x["messages"]) for x in m0)
        frames = sum(x["frames"] for x in m1) - sum(x["frames"] for x in m0)
        received_total = sum(sum(x["messages"]) for x in final)
        gen_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(m0, m1))
        result = {
            "system": system_name,
            "scenario": sc.key,
            "delivered_per_s": delivered / elapsed,
            "bytes_per_s": delivered * sc.payload / elapsed,
            "frames_per_s": frames / elapsed,
            "published": sum(published.values()),
            "expected": sum(expected),
            "received": received_total,
            "lost": max(0, sum(expected) - received_total),
            "server_cpu": (s1 - s0) / elapsed,
            "loadgen_cpu": gen_cpu / elapsed,
            "alive": server.poll() is None,
            "stalls": stopped["stalls"],
        }
        if sc.rate:
            result.update(lat)
        return result
    finally:
        for pipe in pipes:
            try:
                pipe.send("exit")
            except OSError:
                pass
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def median_of(results: list[dict]) -> dict:
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
    out["runs"] = len(results)
    out["lost_max"] = max(r["lost"] for r in results)
    return out


def machine() -> str:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def commit() -> str:
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: list[dict], scs: dict[str, Scenario]) -> str:
    lines = []
    for key in dict.fromkeys(r["scenario"] for r in rows):
        sc = scs[key]
        these = [r for r in rows if r["scenario"] == key]
        ours = next((r for r in these if r["system"] == "broker"), None)
        lines.append(f"\n#### ({key}) {sc.title}\n")
        latency = sc.rate > 0
        head = "| system | delivered msg/s | MB/s | lost | broker CPU | loadgen CPU |"
        if latency:
            head += " p50 µs | p99 µs | p99.9 µs |"
        head += " ours ÷ this |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for r in these:
            ratio = ""
            if ours is not None:
                if latency and r.get("p99_us"):
                    ratio = f"p99 {ours['p99_us'] / r['p99_us']:.2f}"
                elif r["delivered_per_s"]:
                    ratio = f"{ours['delivered_per_s'] / r['delivered_per_s']:.2f}"
            line = (
                f"| {r['system']} | {r['delivered_per_s']:,.0f} | {r['bytes_per_s'] / 1e6:,.0f} | "
                f"{r['lost']:,.0f} (max {r['lost_max']:,.0f}) | {r['server_cpu']:.2f} | {r['loadgen_cpu']:.2f} |"
            )
            if latency:
                line += f" {r.get('p50_us', 0):,.0f} | {r.get('p99_us', 0):,.0f} | {r.get('p999_us', 0):,.0f} |"
            line += f" {ratio} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="a,b,c,d5,d20,e")
    parser.add_argument("--systems", default="broker,ceiling,nats,bun,naive")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per run (default: per scenario, 5)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--sub-procs", type=int, default=1, help="subscriber processes")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for JSON and Markdown results")
    parser.add_argument("--report", nargs="+", metavar="LOG", help="only build the table from the JSON lines of earlier runs")
    args = parser.parse_args(argv)
    scs = scenarios()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for key in chosen:
        if key not in scs:
            parser.error(f"unknown scenario {key}; choose from {', '.join(scs)}")
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name}; choose from {', '.join(SYSTEMS)}")
    rows = []
    if args.report:
        runs: dict[tuple[str, str], list[dict]] = {}
        for path in args.report:
            for line in Path(path).read_text().splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    runs.setdefault((r["scenario"], r["system"]), []).append(r)
        order = {k: i for i, k in enumerate(scs)}
        for key in sorted(runs, key=lambda k: (order.get(k[0], 99), systems.index(k[1]) if k[1] in systems else 99)):
            rows.append(median_of(runs[key]))
        args.runs = max(len(v) for v in runs.values())
    for key in chosen if not args.report else []:
        sc = scs[key]
        if args.duration:
            sc.duration = args.duration
        for name in systems:
            results = []
            for i in range(args.runs):
                try:
                    r = run_once(name, sc, args.sub_procs, args.warmup)
                except Exception as exc:  # one failed run must not lose the others
                    print(f"run failed: {name} {key}: {exc}", file=sys.stderr, flush=True)
                    continue
                results.append(r)
                print(json.dumps(r), flush=True)
            if results:
                rows.append(median_of(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = (
        f"Command: `{' '.join(['python -m bench.run'] + (argv if argv is not None else sys.argv[1:]))}`  \n"
        f"Commit: {commit()}, machine: {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
        f"Medians of {args.runs} runs, {args.warmup:g} s warm-up then the measured window per run.\n"
    )
    text = header + table(rows, scs)
    (out / f"{stamp}.md").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
