"""The benchmark's multi-node systems work end to end: one short run of scenario (a) against
three broker nodes joined through one redis-server and three nats-server joined by routes, the
publisher on node A and the subscribers on B and C, through the same code path as a full
benchmark (bench/run.py); the rows carry the CPU of every process and, with Redis, Redis's
commands per published message."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_bench_cluster_systems_smoke(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--scenarios",
            "a",
            "--systems",
            "broker-cluster,nats-cluster,broker-redis",
            "--clients",
            "cheap",
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
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["system"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"broker-cluster", "nats-cluster", "broker-redis"}, out.stderr[-3000:]
    for r in rows.values():
        assert r["delivered_per_s"] > 0 and r["lost"] == 0 and r["alive"] and r["published_per_s"] > 0
        assert r["closes_slow"] == 0 and r["closes_other"] == 0
    assert set(rows["broker-cluster"]["system_cpu"]) == {"A", "B", "C", "redis"}
    assert set(rows["nats-cluster"]["system_cpu"]) == {"A", "B", "C"}
    assert set(rows["broker-redis"]["system_cpu"]) == {"A", "redis"}
    for name in ("broker-cluster", "broker-redis"):
        r = rows[name]
        assert r["redis_sent_per_msg"] > 0 and r["redis_total_per_msg"] >= r["redis_sent_per_msg"]
        assert "evalsha" in r["redis_calls_per_msg"] and "xread" in r["redis_calls_per_msg"]
        assert "xadd" in r["redis_in_scripts"] and "evalsha" not in r["redis_in_scripts"]
    # the subscribers are on B and C, the publisher on A: the nodes B and C deliver
    nodes = rows["nats-cluster"]["system_cpu"]
    assert nodes["B"] > 0 and nodes["C"] > 0
    assert "| broker-cluster |" in out.stdout and "Redis commands per published msg" in out.stdout
