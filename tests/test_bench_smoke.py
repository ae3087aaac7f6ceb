"""The benchmark harness still works end to end: one short run of scenario (a), broker and the
ceiling probe, through the same code path as a full benchmark (bench/run.py), once with the
compiled-scanner clients and once with the real-client Bun fleet (Bun and the fleet's npm
packages are installed from the npm registry on first use), writing its tables and plot."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.timeout(240)
@pytest.mark.parametrize("clients", ["cheap", "real"])
@pytest.mark.slow
def test_bench_runner_smoke(tmp_path, clients):
    if clients == "real":  # first use installs Bun and the fleet's packages: not part of the run's time
        subprocess.run(
            [sys.executable, "-c", "from bench import fleetproc, systems; systems.bun_binary(); fleetproc.install()"],
            cwd=ROOT,
            check=True,
            timeout=180,
        )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--scenarios",
            "a",
            "--systems",
            "broker,ceiling",
            "--clients",
            clients,
            "--runs",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0.3",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["system"] for r in rows} == {"broker", "ceiling"}, out.stderr[-3000:]
    for r in rows:
        assert r["clients"] == clients
        assert r["delivered_per_s"] > 0 and r["lost"] == 0 and r["alive"]
        assert r["closes_slow"] == 0 and r["closes_other"] == 0
        if clients == "real":
            assert r["gaps"] == 0 and r["dups"] == 0 and r["unknown"] == 0
    assert "#### (a) fan-out" in out.stdout
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.json"))
    # the plot beside them: a closed-loop scenario only, so throughput and no latency plot
    (image,) = tmp_path.glob("*.png")
    assert image.name.endswith("-throughput.png") and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({image.name})" in next(tmp_path.glob("*.md")).read_text()
