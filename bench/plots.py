"""Plot images of a benchmark run (matplotlib, from the bench extra): delivered messages/s per
scenario and system, and the end-to-end latency distribution of each latency scenario."""

from __future__ import annotations

import math
from pathlib import Path

from .scenarios import Scenario

# one colour per system in every image: ours first, then the peers
COLOURS = {
    "broker": "#1f77b4", "url": "#1f77b4", "broker-redis": "#17becf", "broker-cluster": "#9467bd", "broker-metrics": "#aec7e8",
    "broker-tls": "#c5b0d5", "broker-auth": "#98df8a", "broker-pure": "#7f7f7f", "broker-baseline": "#bcbd22",
    "nats": "#ff7f0e", "nats-cluster": "#ffbb78", "bun": "#2ca02c", "ceiling": "#8c564b", "naive": "#d62728",
}


def _colour(system: str, others: dict[str, str]) -> str:
    if system in COLOURS:
        return COLOURS[system]
    spare = ["#e377c2", "#f7b6d2", "#dbdb8d", "#9edae5", "#c49c94"]
    return others.setdefault(system, spare[len(others) % len(spare)])


def write(rows: list[dict], scs: dict[str, Scenario], out: Path, stamp: str, source: str) -> list[Path]:
    """Write `STAMP-throughput.png` (every scenario with a closed loop) and `STAMP-latency.png`
    (every latency scenario with a recorded distribution) into `out`; returns their paths.
    Raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    others: dict[str, str] = {}
    throughput = [r for r in rows if not scs[r["scenario"]].latency]
    if throughput:
        scenarios = list(dict.fromkeys(r["scenario"] for r in throughput))
        systems = list(dict.fromkeys(r["system"] for r in throughput))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(scenarios) + 2), 4.5))
        width = 0.8 / len(systems)
        for j, system in enumerate(systems):
            xs, ys = [], []
            for i, key in enumerate(scenarios):
                r = next((r for r in throughput if r["scenario"] == key and r["system"] == system), None)
                if r is not None:
                    xs.append(i + (j - (len(systems) - 1) / 2) * width)
                    ys.append(r["delivered_per_s"] / 1e6)
            bars = ax.bar(xs, ys, width * 0.95, label=system, color=_colour(system, others))
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(scenarios)), [f"{key}\n{_short(scs[key].title)}" for key in scenarios], fontsize=8)
        ax.set_ylabel("delivered messages/s (millions)")
        ax.set_title(f"Throughput, medians of {int(throughput[0].get('runs', 1))} runs ({throughput[0]['clients']} clients)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.text(0.99, 0.01, source, ha="right", va="bottom", fontsize=6, color="#666666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out / f"{stamp}-throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    latency = [r for r in rows if scs[r["scenario"]].latency and r.get("latency_hist")]
    if latency:
        scenarios = list(dict.fromkeys(r["scenario"] for r in latency))
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5.0 * len(scenarios), 4.2), squeeze=False)
        for ax, key in zip(axes[0], scenarios):
            for r in (r for r in latency if r["scenario"] == key):
                values, cumulative, seen = [], [], 0.0
                total = sum(count for _, count in r["latency_hist"])
                for value, count in r["latency_hist"]:
                    seen += count
                    values.append(max(value, 1.0) / 1000)
                    cumulative.append(seen / total)
                # percentile axis: 0.9 -> 1 ("90"), 0.99 -> 2 ("99"), ... so the tail is visible
                tail = [-math.log10(max(1 - c, 1e-5)) for c in cumulative]
                ax.plot(values, tail, label=f"{r['system']} (p99 {r.get('p99_us', 0) / 1000:.1f} ms)", color=_colour(r["system"], others))
            ax.set_xscale("log")
            ax.set_yticks([0, 1, 2, 3, 4], ["0", "90", "99", "99.9", "99.99"])
            ax.set_xlabel("end-to-end latency (ms, log scale)")
            ax.set_ylabel("percentile")
            ax.set_title(f"({key}) {_short(scs[key].title, 60)}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle("Latency distribution at a fixed publish rate (first run)", fontsize=10)
        fig.text(0.99, 0.01, source, ha="right", va="bottom", fontsize=6, color="#666666")
        fig.tight_layout(rect=(0, 0.03, 1, 0.97))
        path = out / f"{stamp}-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _short(title: str, limit: int = 38) -> str:
    return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"
