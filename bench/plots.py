"""Plots of the results as PNG files beside the tables (matplotlib, no display needed):

- `STAMP-throughput.png`: delivered messages per second of each closed-loop scenario, one bar
  per system (the median run; the error bar spans the slowest and the fastest run);
- `STAMP-latency.png`: for each fixed-rate scenario, one percentile curve per system, publish
  to delivery (each point the median over the runs of that percentile), on a log scale.

A system has the same colour in every plot; one without a colour of its own here (a broker
named by its URL) gets one of the spare colours, in the order the results name them."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .scenarios import Scenario

# One colour per system, the same in every plot: the broker's variants in blues and purples,
# NATS in greens, Bun orange, the probes grey and red.
COLORS = {
    "broker": "#1f77b4",
    "broker-tls": "#6baed6",
    "broker-auth": "#08519c",
    "broker-metrics": "#9ecae1",
    "broker-pure": "#17becf",
    "broker-baseline": "#7f7f7f",
    "broker-redis": "#9467bd",
    "broker-cluster": "#c5b0d5",
    "nats": "#2ca02c",
    "nats-cluster": "#98df8a",
    "bun": "#ff7f0e",
    "ceiling": "#4d4d4d",
    "naive": "#d62728",
}
SPARE = ("#e377c2", "#8c564b", "#bcbd22", "#000000", "#f7b6d2", "#c49c94")
TICKS = (50, 90, 99, 99.9, 99.99)  # percentiles marked on the latency plots' axis (the curves start at 0, the least)


def colors(names: list[str]) -> dict[str, str]:
    spare = iter(SPARE * (len(names) // len(SPARE) + 1))
    return {name: COLORS.get(name) or next(spare) for name in names}


def nines(percentile: float) -> float:
    """Where a percentile goes on the latency axis: -log10 of the share above it (p90 at 1,
    p99 at 2, p99.9 at 3, ...), so the tail gets as much room as the body."""
    return -math.log10(1 - percentile / 100)


def write(rows: list[dict], scs: dict[str, Scenario], out: Path, stamp: str, clients: str, runs: int) -> list[Path]:
    """Write the plots of `rows` (medians, report.median_of) to `out`; returns their paths
    (none when no row has what a plot shows, or matplotlib is missing: said on stderr)."""
    try:
        import matplotlib  # noqa: F401 (the figures are drawn by Agg, matplotlib's image backend: no display)
    except ImportError:
        print("plots: not written, matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return []
    palette = colors(list(dict.fromkeys(r["system"] for r in rows)))
    paths = []
    loops = [r for r in rows if r["scenario"] in scs and not scs[r["scenario"]].latency]
    if loops:
        paths.append(out / f"{stamp}-throughput.png")
        throughput(loops, scs, palette, clients, runs).savefig(paths[-1])
    timed = [r for r in rows if r["scenario"] in scs and scs[r["scenario"]].latency and r.get("latency_pct")]
    if timed:
        paths.append(out / f"{stamp}-latency.png")
        latency(timed, scs, palette, clients, runs).savefig(paths[-1])
    elif any(r["scenario"] in scs and scs[r["scenario"]].latency for r in rows):
        print("plots: no latency plot, the results hold no percentile curves (latency_pct)", file=sys.stderr)
    return paths


def throughput(rows: list[dict], scs: dict[str, Scenario], palette: dict[str, str], clients: str, runs: int):
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(r["scenario"] for r in rows))
    names = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["scenario"], r["system"]): r for r in rows}
    width = 0.8 / len(names)
    fig = Figure(figsize=(min(16.0, max(7.0, 3.5 + len(keys) * (0.6 + 0.4 * len(names)))), 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    top = max(r["delivered_per_s"] for r in rows) / 1e6
    for j, name in enumerate(names):
        xs, heights, low, high = [], [], [], []
        for i, key in enumerate(keys):
            r = by.get((key, name))
            if r is None:
                continue
            value = r["delivered_per_s"] / 1e6
            least, most = (v / 1e6 for v in r.get("delivered_per_s_range", (r["delivered_per_s"],) * 2))
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            heights.append(value)
            low.append(max(0.0, value - least))
            high.append(max(0.0, most - value))
            top = max(top, most)
        ax.bar(
            xs,
            heights,
            width * 0.92,
            label=name,
            color=palette[name],
            yerr=[low, high] if runs > 1 else None,
            capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
        )
        for x, h, up in zip(xs, heights, high):  # the median's value, above the error bar
            ax.annotate(
                f"{h:.2f}",
                (x, h + up),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if len(names) > 3 else 0,
            )
    ax.set_xticks(range(len(keys)), [f"{key}\n{scs[key].title.split(':')[0]}" for key in keys])
    ax.set_ylim(0, top * 1.18)
    ax.set_ylabel("delivered messages/s (millions)")
    ax.set_xlabel("scenario (bench/scenarios.py)")
    spread = "; error bars: slowest to fastest run" if runs > 1 else ""
    ax.set_title(f"Throughput, closed loop\n{clients} clients, median of {runs} run{'s' if runs != 1 else ''}{spread}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="system", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def latency(rows: list[dict], scs: dict[str, Scenario], palette: dict[str, str], clients: str, runs: int):
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = list(dict.fromkeys(r["scenario"] for r in rows))
    columns = min(3, len(keys))
    lines = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(1.5 + 4.6 * columns, 0.6 + 3.9 * lines), dpi=100, layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False).flatten()  # each scenario on its own scale: they differ by 1,000×
    for ax, key in zip(axes, keys):
        for r in (r for r in rows if r["scenario"] == key):
            curve = sorted((float(p), us) for p, us in r["latency_pct"].items() if float(p) < 100)
            # 0 µs has no place on a log scale: it is drawn at 1 µs
            ax.plot(
                [nines(p) for p, _ in curve],
                [max(us, 1) for _, us in curve],
                marker="o",
                markersize=2.5,
                linewidth=1.5,
                color=palette[r["system"]],
                label=f"{r['system']} (p99 {r['p99_us']:,.0f} µs)",
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([nines(p) for p in TICKS], [f"{p:g}" for p in TICKS])
        ax.set_xlabel("percentile (%)")
        ax.set_title(f"({key}) {scs[key].title}", fontsize=9)
        ax.grid(which="major", alpha=0.3)
        ax.grid(which="minor", axis="y", alpha=0.1)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[: len(keys)]:
        ax.set_ylabel("publish to delivery (µs, log scale)")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"Latency percentiles, publish to delivery\n{clients} clients, each point the median over {runs} run{'s' if runs != 1 else ''}",
        fontsize=10,
    )
    return fig
