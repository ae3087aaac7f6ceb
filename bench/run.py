"""Runs benchmark scenarios against the broker and its peers, in one run, on one machine.

    python -m bench.run --scenarios a,b,w1k,w10k,mixed,ticker,d5,d20,e --systems broker,ceiling,nats,bun,naive --runs 3

For every scenario and system: start the system, connect the subscribers (the real-client Bun
fleet, or with --clients cheap the compiled-scanner counters), publish from a separate Python
process (closed loop for throughput, fixed rate for latency), measure delivered messages/s over
a window after a warm-up, stop publishing, wait for every subscriber to drain, and count per
connection what was published and never delivered. CPU of the system, of the subscriber
processes and of the publisher comes from /proc. Medians over the runs go to a Markdown table
(and JSON) with the command, commit and machine, and plots (PNG) beside them: delivered
messages per second per scenario and system, and latency percentile curves.

    python -m bench.run --url ws://HOST:7341/ --scenarios a,d5 --runs 3

--url benchmarks a broker that is already running (this project's, anywhere the machine can
reach) instead of, or with --systems beside, the systems the runner starts: the publisher and
the subscribers run here and connect to the URL. Its CPU is measured only with --pid (a local
process). --report LOG... builds the tables and plots again from the JSON lines of earlier runs."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from . import plots
from .clients import CLIENTS, ask
from .counters import Counters
from .loadgen import publisher_main
from .procstat import cpu_seconds, machine_busy_seconds
from .report import SATURATED, commit, machine, median_of, percentiles, table
from .scenarios import Scenario, bad_prefix, expand, matching, prefixed, scenarios
from .systems import ROOT, SYSTEMS, System, free_port, launch, redis_script_commands, start, stop_server, wait_port  # noqa: F401 (re-exported)
from .target import External, TargetError, check_pid
from .target import check as check_target
from .target import parse as parse_target

SETTLE = 0.5  # s after the subscribers are ready: not every system acknowledges a subscription
DRAIN_QUIET = 2.0  # s without progress that ends the drain
DRAIN_MAX = 20.0


def run_once(system: str | System, sc: Scenario, clients_kind: str, procs: int, warmup: float, window: int, pid: int = 0) -> dict:
    """One run of scenario `sc` against `system`: a name in SYSTEMS (started for the run and
    stopped after it) or a --url target (target.parse; `pid`: its local process, for its CPU)."""
    if isinstance(system, str):
        system = SYSTEMS[system]
    system_name = system.name
    ctx = mp.get_context("spawn")
    topic_sets = matching(sc.subscribers, sc.topics)  # per connection: the topics it receives
    deliveries = [0] * len(sc.topics)
    for topics in topic_sets:
        for i in topics:
            deliveries[i] += 1
    connections = [expand(p, sc.topics, system.wildcards) for p in sc.subscribers]
    window = window or sc.window
    dep = External.of(system, pid) if system.external else launch(system_name, broker=sc.broker)
    counters = Counters.create(procs)
    clients = pub = None
    ours = None
    try:
        # every node up (a cluster's routes too), a probe published on the publisher's node
        # received on every subscriber node
        dep.wait_ready(sc.topics[0])
        ports = [dep.sub_ports[i % len(dep.sub_ports)] for i in range(len(connections))]
        clients = CLIENTS[clients_kind](system, ports, connections, counters, procs, sc.latency)
        dep.wait_interest(connections, ports)
        ours, theirs = ctx.Pipe()
        pub = ctx.Process(
            target=publisher_main,
            args=(
                theirs,
                system,
                system.host,
                dep.pub_port,
                sc.topics,
                sc.payload,
                sc.batch,
                deliveries,
                window,
                sc.rate,
                counters.path,
                counters.slots,
            ),
            daemon=True,
        )
        pub.start()
        answer = ask(ours, None, 120)
        if answer != "ready":
            raise RuntimeError(answer["error"] if isinstance(answer, dict) else "the publisher did not get ready")
        counters.unlink()  # every process has it mapped: nothing is left behind, however the run ends
        time.sleep(SETTLE)
        pids = dep.pids()

        def cpu() -> dict:
            return {
                "system": {label: cpu_seconds(pid) for label, pid in pids.items()},
                "clients": [cpu_seconds(p) for p in clients.pids],
                "publisher": cpu_seconds(pub.pid),
                "machine": machine_busy_seconds(),
            }

        ask(ours, "go")
        time.sleep(warmup)
        m0, c0, t0 = clients.mark(), cpu(), time.monotonic()
        n0, r0 = ask(ours, "count"), dep.redis_calls()
        if sc.latency:
            clients.latency()  # only what arrives in the measured window counts
        time.sleep(sc.duration)
        m1, c1, t1 = clients.mark(), cpu(), time.monotonic()
        n1, r1 = ask(ours, "count"), dep.redis_calls()
        latency = percentiles(clients.latency()) if sc.latency else {}
        stopped = ask(ours, "stop")
        published = stopped["published"]
        expected = [sum(published[i] for i in topics) for topics in topic_sets]
        last, quiet = -1, 0.0
        deadline = time.monotonic() + DRAIN_MAX
        while time.monotonic() < deadline:
            final = clients.mark()
            received = sum(final["per_conn"])
            if all(r >= e for r, e in zip(final["per_conn"], expected)):
                break
            quiet = quiet + 0.2 if received == last else 0.0
            if quiet >= DRAIN_QUIET:
                break
            last = received
            time.sleep(0.2)
        final = clients.mark()
        elapsed = t1 - t0
        delivered = sum(m1["per_conn"]) - sum(m0["per_conn"])
        clients_cpu = [(b - a) / elapsed for a, b in zip(c0["clients"], c1["clients"])]
        system_cpu = {label: c1["system"][label] - c0["system"][label] for label in pids}  # CPU seconds per process
        server_cpu_s = sum(system_cpu.values())
        known = bool(pids)  # a --url target without --pid: its CPU is not known
        closes = final["closes"]
        slow = closes.get("1013", 0) + final.get("slow", 0)
        result = {
            "system": system_name,
            "scenario": sc.key,
            "clients": clients_kind,
            "client_procs": len(clients.pids),
            "delivered_per_s": delivered / elapsed,
            "bytes_per_s": delivered * sc.payload / elapsed,
            "frames_per_s": (m1["frames"] - m0["frames"]) / elapsed,
            "published": sum(published),
            "expected": sum(expected),
            "received": sum(final["per_conn"]),
            "lost": sum(max(0, e - r) for e, r in zip(expected, final["per_conn"])),
            "excess": sum(max(0, r - e) for e, r in zip(expected, final["per_conn"])),
            "closes": closes,
            "closes_slow": slow,
            "closes_other": max(0, sum(closes.values()) - slow),
            "server_cpu": server_cpu_s / elapsed if known else None,
            "cpu_s_per_m": (server_cpu_s / (delivered / 1e6) if delivered else 0.0) if known else None,
            "clients_cpu": sum(clients_cpu),
            "clients_cpu_max": max(clients_cpu),
            "publisher_cpu": (c1["publisher"] - c0["publisher"]) / elapsed,
            # everything else running on the machine meanwhile (other work shares the cores)
            "other_cpu": max(
                0.0,
                (c1["machine"] - c0["machine"])
                - server_cpu_s
                - sum(b - a for a, b in zip(c0["clients"], c1["clients"]))
                - (c1["publisher"] - c0["publisher"]),
            )
            / elapsed,
            "window": window,
            "alive": dep.alive(),
            "stalls": stopped["stalls"],
            "published_per_s": (n1 - n0) / elapsed,
        }
        if system.external:
            result["target"] = system.name
            result["target_pid"] = pid
        if len(pids) > 1:  # each process of the system: cluster nodes A, B, C and Redis
            result["system_cpu"] = {label: seconds / elapsed for label, seconds in system_cpu.items()}
        if dep.redis_port:
            result.update(
                redis_usage(r0, r1, n1 - n0, elapsed, sum(seconds for label, seconds in system_cpu.items() if label.startswith("redis")))
            )
        if system.fleet_protocol == "broker" and clients_kind == "real":
            result.update({k: final.get(k, 0) for k in ("gaps", "dups", "unknown", "errors")})
        result["saturated"] = result["clients_cpu_max"] >= SATURATED or result["publisher_cpu"] >= SATURATED
        result.update(latency)
        return result
    finally:
        if ours is not None:
            try:
                ours.send("exit")
            except OSError:
                pass
        if pub is not None:
            pub.join(5)
            if pub.is_alive():
                pub.kill()
                pub.join()
        if clients is not None:
            clients.close()
        dep.stop()
        counters.close(remove=True)


def redis_usage(before: dict[str, int], after: dict[str, int], published: int, elapsed: float, cpu_s: float) -> dict:
    """Redis over the measured window, from INFO commandstats before and after it: per command the
    calls per published message, the commands Redis clients sent (the backplane's EVALSHA, XREAD,
    ...) and with those run inside its scripts (HINCRBY, XADD, ...: Redis 6 counts both alike,
    they are told apart by the names in the backplane's scripts, redis_script_commands()) per
    published message, and Redis's CPU in cores."""
    calls = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    calls["info"] = calls.get("info", 0) - 1  # the harness's INFO that read `before`
    calls = {name: n for name, n in calls.items() if n > 0}
    inside = redis_script_commands()
    sent = sum(n for name, n in calls.items() if name not in inside)
    total = sum(calls.values())
    per = max(published, 1)
    return {
        "redis_cpu": cpu_s / elapsed,
        "redis_calls_per_msg": {name: n / per for name, n in sorted(calls.items(), key=lambda kv: -kv[1])},
        "redis_sent_per_msg": sent / per,
        "redis_total_per_msg": total / per,
        "redis_sent_per_s": sent / elapsed,
        "redis_total_per_s": total / elapsed,
        "redis_in_scripts": sorted(inside & set(calls)),
    }


DEFAULT_SYSTEMS = "broker,ceiling,nats,bun,naive"


def shown_argv(argv: list[str]) -> list[str]:
    """The command line as the results show it: no token (--token's value, a URL's query)."""
    out, secret = [], False
    for arg in argv:
        if secret:
            out.append("***")
        elif arg.startswith("--token="):
            out.append("--token=***")
        elif arg.startswith(("ws://", "wss://", "--url=")) and "?" in arg:
            out.append(arg.split("?", 1)[0] + "?***")
        else:
            out.append(arg)
        secret = arg == "--token"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scs = scenarios()
    parser.add_argument("--scenarios", default=",".join(scs), help=f"comma-separated (default all): {', '.join(scs)}")
    parser.add_argument(
        "--systems",
        default=None,
        help=f"systems the runner starts, comma-separated (default {DEFAULT_SYSTEMS}; with --url none): {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--clients",
        choices=sorted(CLIENTS),
        default="real",
        help="real: the Bun fleet, applications that decode every message; cheap: compiled scanners that only count; "
        "client-node, client-bun, client-node-sse: the TypeScript client (clients/js) in Node or Bun, over a WebSocket or the fallback",
    )
    parser.add_argument("--fleet-procs", type=int, default=1, help="Bun fleet processes the subscribers are split over (--clients real)")
    parser.add_argument("--sub-procs", type=int, default=1, help="subscriber processes (--clients cheap)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per run (default: per scenario, 5)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--window", type=int, default=0, help="deliveries in flight in the closed loop, for every scenario (default: the scenario's)"
    )
    parser.add_argument(
        "--topic-prefix",
        default="",
        metavar="PREFIX",
        help="every topic and pattern under PREFIX. (PREFIX.bench.t0, PREFIX.md.>): apart from other traffic, within a token's grants",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and Markdown results and the plots (PNG)"
    )
    parser.add_argument("--report", nargs="+", metavar="LOG", help="only build the tables and plots from the JSON lines of earlier runs")
    running = parser.add_argument_group("a broker that is already running")
    running.add_argument(
        "--url",
        help="benchmark the broker at this ws:// or wss:// URL (the runner neither starts nor configures it; "
        "with --systems, beside the systems it starts)",
    )
    running.add_argument(
        "--token",
        help="a token for the broker's authentication, sent in a bearer.TOKEN subprotocol entry "
        "(default: $BENCH_TOKEN; never written to the results)",
    )
    running.add_argument(
        "--cafile", metavar="FILE", help="PEM file of the CA(s) to trust for a wss:// URL, instead of the default, publicly trusted ones"
    )
    running.add_argument(
        "--pid",
        type=int,
        default=0,
        help="the broker's process, when it runs on this machine: its CPU (with its children) from /proc (default: not measured)",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for key in chosen:
        if key not in scs:
            parser.error(f"unknown scenario {key}; choose from {', '.join(scs)}")
    if args.systems is None:
        systems = [] if args.url else DEFAULT_SYSTEMS.split(",")
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name}; choose from {', '.join(SYSTEMS)}")
    token = args.token if args.token is not None else os.environ.get("BENCH_TOKEN") or None
    if not args.url:
        for flag, value in (("--token", args.token), ("--cafile", args.cafile), ("--pid", args.pid)):
            if value:
                parser.error(f"{flag} is for a broker named by --url")
    elif args.report:
        parser.error("--report builds tables from earlier results: it runs nothing against --url")
    why = bad_prefix(args.topic_prefix) if args.topic_prefix else ""
    if why:
        parser.error(f"--topic-prefix {args.topic_prefix!r}: {why}")
    if not systems and not args.url and not args.report:
        parser.error("nothing to run: name --systems, or a running broker with --url")
    target = None
    if args.url:
        try:
            target = parse_target(args.url, token, args.cafile)
            if args.pid:
                check_pid(args.pid)
        except TargetError as exc:
            parser.error(str(exc))
    procs = args.sub_procs if args.clients == "cheap" else args.fleet_procs
    chosen_scs = {key: prefixed(scs[key], args.topic_prefix) for key in chosen}
    if target is not None:  # before any run: the URL, TLS, the token and its grants for each scenario's topics
        print(f"checking {target.name} ...", file=sys.stderr, flush=True)
        try:
            for sc in chosen_scs.values():
                check_target(target, sc.topics[0], sc.subscribers[0][0])
        except TargetError as exc:
            print(f"python -m bench.run: error: {exc}", file=sys.stderr)
            return 1
        for key, sc in chosen_scs.items():
            if sc.broker:  # what the runner sets on a broker it starts
                wanted = ", ".join(f"{name} {value:,}" for name, value in sc.broker.items())
                print(
                    f"note: {key} needs the broker settings {wanted} (past their defaults); {target.name} runs on its own",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    if args.report:
        # the JSON lines a run prints (one per run: medians are taken here), or the .json file
        # it writes (the medians already)
        runs: dict[tuple[str, str], list[dict]] = {}
        medians: dict[tuple[str, str], dict] = {}
        for path in args.report:
            try:
                text = Path(path).read_text()
                if text.lstrip().startswith("["):
                    for r in json.loads(text):
                        medians[(r["scenario"], r["system"])] = r
                    continue
                for line in text.splitlines():
                    if line.startswith("{"):
                        r = json.loads(line)
                        runs.setdefault((r["scenario"], r["system"]), []).append(r)
            except OSError as exc:
                print(f"python -m bench.run: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            except (ValueError, KeyError, TypeError) as exc:
                print(f"python -m bench.run: error: {path} holds no results of bench.run: {exc!r}", file=sys.stderr)
                return 1
        medians.update({key: median_of(results) for key, results in runs.items()})
        if not medians:
            print(f"python -m bench.run: error: no results (JSON lines, or a results .json) in {' '.join(args.report)}", file=sys.stderr)
            return 1
        order = {k: i for i, k in enumerate(scs)}
        for key in sorted(medians, key=lambda k: (order.get(k[0], 99), systems.index(k[1]) if k[1] in systems else 99)):
            rows.append(medians[key])
        args.runs = max(r["runs"] for r in medians.values())
    for key in chosen if not args.report else []:
        sc = chosen_scs[key]
        if args.duration:
            sc.duration = args.duration
        # Runs alternate between the systems (A B C A B C ...), so a slow phase of the machine
        # falls on every system alike rather than on one.
        these: list[tuple[str, str | System]] = [(name, name) for name in systems if name not in sc.skip]
        if target is not None:
            these.insert(0, (target.name, target))
        for name in systems:
            if name in sc.skip:
                print(f"skipped: {name} {key} (not run against this scenario, see bench/scenarios.py)", file=sys.stderr, flush=True)
        results: dict[str, list[dict]] = {name: [] for name, _ in these}
        for _ in range(args.runs):
            for name, system in these:
                try:
                    r = run_once(
                        system, sc, args.clients, procs, max(args.warmup, sc.warmup), args.window, args.pid if system is target else 0
                    )
                except Exception as exc:  # one failed run must not lose the others
                    print(f"run failed: {name} {key}: {exc}", file=sys.stderr, flush=True)
                    continue
                if args.topic_prefix:
                    r["topic_prefix"] = args.topic_prefix
                results[name].append(r)
                print(json.dumps(r), flush=True)
        for done in results.values():
            if done:
                rows.append(median_of(done))
    if not rows:
        print("python -m bench.run: error: no run succeeded (see the messages above)", file=sys.stderr)
        return 1

    prefixes = {r["scenario"]: r["topic_prefix"] for r in rows if r.get("topic_prefix")}
    kinds = list(dict.fromkeys(r.get("clients", args.clients) for r in rows))  # --report: what the runs used
    clients = kinds[0] if len(kinds) == 1 else args.clients

    def command(key: str, names: list[str]) -> str:
        parts = ["python -m bench.run", f"--scenarios {key}"]
        parts += [f"--url {name}" for name in names if name not in SYSTEMS]  # a --url target, by its URL without a query
        launched = [name for name in names if name in SYSTEMS]
        if launched:
            parts.append(f"--systems {','.join(launched)}")
        parts.append(f"--clients {clients}")
        if procs != 1:
            parts.append(f"--{'fleet' if clients == 'real' else 'sub'}-procs {procs}")
        parts += [f"--runs {args.runs}", f"--warmup {max(args.warmup, scs[key].warmup):g}"]
        if args.duration:
            parts.append(f"--duration {args.duration:g}")
        if args.window:
            parts.append(f"--window {args.window}")
        if key in prefixes:
            parts.append(f"--topic-prefix {prefixes[key]}")
        return " ".join(parts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = (
        f"Command: `{' '.join(['python -m bench.run'] + shown_argv(argv if argv is not None else sys.argv[1:]))}`  \n"
        f"Commit: {commit()}, machine: {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
        f"Clients: {', '.join(kinds)}, medians of {args.runs} runs, {args.warmup:g} s warm-up then the measured window per run.\n"
    )
    for url, pid in {r["target"]: r.get("target_pid", 0) for r in rows if r.get("target")}.items():
        cpu = f"its CPU from /proc of process {pid:.0f} (with its children)" if pid else "its CPU not measured (no --pid)"
        header += (
            f"\nTarget {url}: a broker that was already running, on its own settings; {cpu}. "
            "The publisher and the subscribers run on this machine (latency: publish to delivery on its clock).\n"
        )
    text = header + table(rows, scs, command)
    images = plots.write(rows, scs, out, stamp, clients=", ".join(kinds), runs=args.runs)
    if images:
        text += "\n" + "\n".join(f"![{path.stem.split('-', 2)[-1]}]({path.name})" for path in images) + "\n"
    (out / f"{stamp}.md").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps(rows, indent=1))
    print(text)
    for path in images:
        print(f"plot: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
