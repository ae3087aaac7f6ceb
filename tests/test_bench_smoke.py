"""The benchmark harness still works end to end: one short run of scenario (a), broker and the
ceiling probe, through the same code path as a full benchmark (bench/run.py)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_runner_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--scenarios", "a", "--systems", "broker,ceiling",
         "--runs", "1", "--duration", "0.5", "--warmup", "0.3", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["system"] for r in rows} == {"broker", "ceiling"}
    for r in rows:
        assert r["delivered_per_s"] > 0 and r["lost"] == 0 and r["alive"]
    assert "#### (a) fan-out" in out.stdout
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.json"))
