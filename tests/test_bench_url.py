"""`python -m bench.run --url`: the benchmark measures a broker that is already running, writes
its table and plot images, and refuses a URL it cannot use with a clear message."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, broker_cli
from test_shutdown_cli import free_ports


def bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_a_running_broker_is_measured_by_url_with_plots(tmp_path):
    (port,) = free_ports()
    server = broker_cli("serve", "--port", str(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"ws://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while (out := bench("--url", url, "--scenarios", "a,d5", "--clients", "cheap", "--runs", "1", "--duration", "0.5",
                            "--warmup", "0.3", "--out", str(tmp_path))).returncode == 2 and "cannot reach" in out.stderr:
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.2)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert [(r["system"], r["scenario"]) for r in rows] == [("url", "a"), ("url", "d5")]
        for r in rows:
            assert r["delivered_per_s"] > 0 and r["lost"] == 0 and not r["system_cpu_known"]
        assert rows[1]["p99_us"] > 0 and rows[1]["latency_hist"]
        assert f"python -m bench.run --url {url} --scenarios a --systems url" in out.stdout
        assert "its CPU is not measured" in out.stdout
        images = sorted(tmp_path.glob("*.png"))
        assert [p.name.split("-")[-1] for p in images] == ["latency.png", "throughput.png"]
        for image in images:
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
            assert f"plot: {image}" in out.stdout
        # --report draws the same plots from the JSON lines
        log = tmp_path / "run.log"
        log.write_text(out.stdout)
        again = bench("--report", str(log), "--systems", "url", "--url", url, "--out", str(tmp_path / "again"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(list((tmp_path / "again").glob("*.png"))) == 2
    finally:
        server.terminate()
        server.wait(10)


def test_a_url_it_cannot_use_is_refused_with_the_reason(tmp_path):
    (port,) = free_ports()
    cases = [
        (["--url", "http://127.0.0.1:7341/"], "the scheme must be ws:// or wss://"),
        (["--url", "ws:///path"], "names no host"),
        (["--url", "ws://127.0.0.1:99999/"], "is not a URL"),
        (["--url", "ws://user:pw@127.0.0.1:7341/"], "a token goes in --token"),
        (["--token", "abc"], "--token and --cafile go with --url"),
        (["--systems", "url"], "the system url needs --url"),
        (["--url", f"ws://127.0.0.1:{port}/"], f"cannot reach 127.0.0.1:{port}"),
    ]
    # something that is not a WebSocket server
    import http.server
    import threading

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    cases.append((["--url", f"ws://127.0.0.1:{web.server_address[1]}/"], "did not accept a WebSocket connection for broker.v1: it answered \"HTTP/1.0 501"))
    try:
        check(cases, tmp_path)
    finally:
        web.shutdown()


def check(cases, tmp_path) -> None:
    for args, message in cases:
        out = bench(*args, "--scenarios", "a", "--out", str(tmp_path), timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
