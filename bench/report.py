"""Results: medians over runs, latency percentiles, and the Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess

from .scenarios import Scenario
from .systems import ROOT

SATURATED = 0.9  # a single-threaded process at this many cores is the limit, not the system
OTHER = 0.2  # cores used by processes outside the run that are worth a note


# The percentiles kept of every latency run ("latency_pct": {percentile: µs}), for the
# percentile curves of the plots: evenly spaced up to p90, then ever closer to the maximum.
CURVE = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 98, 99, 99.5, 99.7, 99.8, 99.9, 99.95, 99.97, 99.98, 99.99, 100)


def percentiles(histogram: list[list[float]]) -> dict:
    """p50/p99/p99.9 in µs from [value_us, count] pairs (any order, repeats summed), and
    "latency_pct": the value at each percentile of CURVE (0: the least, 100: the largest)."""
    merged: dict[float, float] = {}
    for value, count in histogram:
        merged[value] = merged.get(value, 0) + count
    total = sum(merged.values())
    if not total:
        return {}
    out: dict = {"latency_samples": int(total)}
    wanted = sorted({p / 100 for p in CURVE} | {0.5, 0.99, 0.999})
    at: dict[float, float] = {}
    seen, i = 0.0, 0
    for value, count in sorted(merged.items()):
        seen += count
        while i < len(wanted) and seen >= wanted[i] * total:
            at[wanted[i]] = value
            i += 1
    for q in wanted[i:]:  # rounding in the sums: the largest value
        at[q] = value
    for key, q in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
        out[key] = at[q]
    out["latency_pct"] = {f"{p:g}": at[p / 100] for p in CURVE}
    return out


NESTED = ("system_cpu", "redis_calls_per_msg", "latency_pct")  # {name: number} values whose median is taken per name


def median_of(results: list[dict]) -> dict:
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r.get(key, 0) for r in results)
        elif key in NESTED:
            names = dict.fromkeys(name for r in results for name in r.get(key, {}))
            out[key] = {name: statistics.median(r.get(key, {}).get(name, 0) for r in results) for name in names}
    out["runs"] = len(results)
    out["delivered_per_s_range"] = [min(r["delivered_per_s"] for r in results), max(r["delivered_per_s"] for r in results)]
    out["lost_max"] = max(r["lost"] for r in results)
    out["alive"] = all(r["alive"] for r in results)
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


def notes(r: dict, closed_loop: bool) -> str:
    out = []
    if r["server_cpu"] is None:
        out.append("system CPU not measured (a --url target without --pid)")
    else:
        system_max = max(r["system_cpu"].values()) if r.get("system_cpu") else r["server_cpu"]  # its busiest process
        if closed_loop and max(system_max, r["clients_cpu_max"], r["publisher_cpu"]) < SATURATED:
            out.append("no process at a full core: bound by the loop's turns")
    if r["clients_cpu_max"] >= SATURATED:
        out.append(f"{r['clients']} clients at {r['clients_cpu_max']:.2f} core: the limit")
    if r["publisher_cpu"] >= SATURATED:
        out.append(f"publisher at {r['publisher_cpu']:.2f} core")
    if r.get("other_cpu", 0) >= OTHER:
        out.append(f"other processes used {r['other_cpu']:.2f} core")
    if r.get("stalls"):
        out.append(f"window reset {r['stalls']:.0f}×")
    if not r["alive"]:
        out.append("system died")
    if r.get("unknown") or r.get("errors"):
        out.append(f"{r.get('unknown', 0):.0f} unannounced, {r.get('errors', 0):.0f} errors")
    return "; ".join(out)


def table(rows: list[dict], scs: dict[str, Scenario], command) -> str:
    """One table per scenario; command(key, systems) is the command line that reproduces it."""
    lines = []
    for key in dict.fromkeys(r["scenario"] for r in rows):
        sc = scs[key]
        these = [r for r in rows if r["scenario"] == key]
        ours = next((r for r in these if r["system"] == "broker"), None)
        lines.append(f"\n#### ({key}) {sc.title}\n")
        lines.append(f"`{command(key, [r['system'] for r in these])}`\n")
        if sc.broker:
            settings = ", ".join(
                f"`{name}` {value:,}" if isinstance(value, int) else f"`{name}` {value}" for name, value in sc.broker.items()
            )
            if any(r.get("target") for r in these):
                lines.append(
                    f"A broker the runner starts gets {settings} (past its defaults: see bench/scenarios.py); "
                    "a --url target runs on its own settings.\n"
                )
            else:
                lines.append(f"The broker with {settings} (past its defaults: see bench/scenarios.py).\n")
        head = (
            "| system | delivered msg/s | MB/s | lost | closes slow/other | seq gaps/dups | system CPU | "
            "CPU s per M msg | clients CPU | publisher CPU |"
        )
        if sc.latency:
            head += " p50 µs | p99 µs | p99.9 µs |"
        head += " ours ÷ this | notes |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for r in these:
            ratio = ""
            if ours is not None:
                if sc.latency and r.get("p99_us"):
                    ratio = f"p99 {ours.get('p99_us', 0) / r['p99_us']:.2f}"
                elif r["delivered_per_s"]:
                    ratio = f"{ours['delivered_per_s'] / r['delivered_per_s']:.2f}"
            seq = f"{r['gaps']:,.0f}/{r['dups']:,.0f}" if "gaps" in r else "–"
            cpu = "– | –" if r["server_cpu"] is None else f"{r['server_cpu']:.2f} | {r['cpu_s_per_m']:.3f}"
            line = (
                f"| {r['system']} | {r['delivered_per_s']:,.0f} | {r['bytes_per_s'] / 1e6:,.0f} | "
                f"{r['lost']:,.0f} (max {r['lost_max']:,.0f}) | {r['closes_slow']:,.0f}/{r['closes_other']:,.0f} | {seq} | "
                f"{cpu} | {r['clients_cpu']:.2f} | {r['publisher_cpu']:.2f} |"
            )
            if sc.latency:
                line += f" {r.get('p50_us', 0):,.0f} | {r.get('p99_us', 0):,.0f} | {r.get('p999_us', 0):,.0f} |"
            line += f" {ratio} | {notes(r, not sc.latency)} |"
            lines.append(line)
        lines += processes(these)
    return "\n".join(lines) + "\n"


def processes(rows: list[dict]) -> list[str]:
    """For the systems of several processes (cluster nodes, Redis): each process's CPU and what
    Redis did per published message (a table under the scenario's table; none if no row has it)."""
    rows = [r for r in rows if r.get("system_cpu")]
    if not rows:
        return []
    lines = [
        "",
        "| system | published msg/s | CPU per process (cores) | Redis CPU | Redis commands per published msg: sent / with scripts | "
        "Redis calls per published msg, by command |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        procs = ", ".join(f"{label} {cores:.2f}" for label, cores in r["system_cpu"].items())
        if "redis_cpu" in r:
            redis = f"{r['redis_cpu']:.2f}"
            per_msg = f"{r['redis_sent_per_msg']:.4f} / {r['redis_total_per_msg']:.4f}"
            inside = set(r.get("redis_in_scripts", ()))
            calls = ", ".join(
                f"{name}{' (in script)' if name in inside else ''} {n:.4f}" for name, n in r["redis_calls_per_msg"].items() if n >= 0.00005
            )
        else:
            redis = per_msg = calls = "–"
        lines.append(f"| {r['system']} | {r.get('published_per_s', 0):,.0f} | {procs} | {redis} | {per_msg} | {calls} |")
    return lines
