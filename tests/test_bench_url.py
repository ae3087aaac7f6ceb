"""The benchmark pointed at a broker that is already running (`python -m bench.run --url`): one
short run against a `broker serve` this test starts (wss://, authentication on), through the
same code path as a full benchmark, writing tables and plots; `--report` draws the plots again
from the run's JSON lines; a URL that cannot work ends with a clear message and exit code, not a
traceback."""

import json
import os
import socket
import struct
import subprocess
import sys
import time

import jwt
import pytest
import trustme

from conftest import ROOT, broker_cli, free_port

SECRET = "bench-url-test-secret-of-32-bytes-or-more"
PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_url_parse():
    """What every client of a --url run connects to, and what the results name it."""
    from bench.target import TargetError, parse

    system = parse("wss://broker.example:8443/ws?token=x")
    assert (system.host, system.port, system.path, system.tls) == ("broker.example", 8443, "/ws?token=x", True)
    assert system.name == "wss://broker.example:8443/ws"  # no query in tables and logs
    assert system.url(8443) == "wss://broker.example:8443/ws?token=x"
    assert parse("ws://[::1]/").url(80) == "ws://[::1]:80/" and parse("wss://h").port == 443
    assert parse("ws://h:1/", token="abc").subprotocol == "broker.v1, bearer.abc"
    for bad in ("http://h/", "h:7341", "ws://", "ws://h:70000/", "ws://u:p@h/"):
        with pytest.raises(TargetError):
            parse(bad)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A broker serving wss:// with authentication on, started as users start it: (port, pid,
    CA file, a token granting everything)."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    port = free_port()
    proc = broker_cli(
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--tls-cert-file",
        str(folder / "server.pem"),
        "--tls-key-file",
        str(folder / "server.pem"),
        env={"BROKER_AUTH_JWT_SECRET": SECRET, "BROKER_MAX_CONNECTIONS_PER_USER": "1000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)
    token = jwt.encode({"sub": "bench", "exp": 4102444800, "subscribe": [">"], "publish": [">"]}, SECRET, algorithm="HS256")
    yield port, proc.pid, str(folder / "ca.pem"), token
    proc.terminate()
    proc.wait(10)


def bench(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_bench_url_run_writes_tables_and_plots(tmp_path, running):
    port, pid, ca, token = running
    url = f"wss://127.0.0.1:{port}/"
    out = bench(
        "--url",
        url,
        "--cafile",
        ca,
        "--pid",
        str(pid),
        "--scenarios",
        "a,d5",
        "--clients",
        "cheap",
        "--runs",
        "1",
        "--duration",
        "0.5",
        "--warmup",
        "0.3",
        "--out",
        str(tmp_path / "run"),
        env={**os.environ, "BENCH_TOKEN": token},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["scenario"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"a", "d5"}, out.stderr[-3000:]
    for r in rows.values():
        assert r["system"] == url and r["target"] == url
        assert r["delivered_per_s"] > 0 and r["lost"] == 0 and r["alive"]
        assert r["server_cpu"] > 0  # read from /proc of --pid
    curve = [rows["d5"]["latency_pct"][p] for p in sorted(rows["d5"]["latency_pct"], key=float)]
    assert len(curve) > 10 and curve == sorted(curve) and curve[0] > 0
    assert rows["d5"]["latency_pct"]["99"] == rows["d5"]["p99_us"]
    md = next((tmp_path / "run").glob("*.md"))
    stamp = md.stem
    for kind in ("throughput", "latency"):
        image = tmp_path / "run" / f"{stamp}-{kind}.png"
        width, height = png_size(image)
        assert width >= 400 and height >= 300
        assert f"({image.name})" in md.read_text()
    assert f"Target {url}" in md.read_text() and f"CPU from /proc of process {pid}" in md.read_text()
    for text in [out.stdout, out.stderr] + [path.read_text() for path in (tmp_path / "run").glob("*.[mj]*")]:
        assert token not in text

    # the plots again, from the JSON lines the run printed
    log = tmp_path / "run.log"
    log.write_text(out.stdout)
    again = bench("--report", str(log), "--out", str(tmp_path / "report"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name.split("-")[-1] for p in (tmp_path / "report").glob("*.png")) == ["latency.png", "throughput.png"]


def test_bench_url_without_pid_reports_no_system_cpu(tmp_path):
    """--report of a target's rows without --pid: the CPU columns say unknown instead of 0."""
    row = {
        "system": "ws://10.0.0.1:7341/",
        "target": "ws://10.0.0.1:7341/",
        "target_pid": 0,
        "scenario": "a",
        "clients": "cheap",
        "delivered_per_s": 1e6,
        "bytes_per_s": 1e8,
        "lost": 0,
        "closes_slow": 0,
        "closes_other": 0,
        "server_cpu": None,
        "cpu_s_per_m": None,
        "clients_cpu": 0.5,
        "clients_cpu_max": 0.5,
        "publisher_cpu": 0.1,
        "alive": True,
    }
    log = tmp_path / "log"
    log.write_text(json.dumps(row) + "\n")
    out = bench("--report", str(log), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("| ws://10.0.0.1:7341/"))
    assert "| – | – |" in line and "system CPU not measured" in line
    assert "its CPU not measured (no --pid)" in out.stdout
    png_size(next(tmp_path.glob("*-throughput.png")))


@pytest.mark.parametrize("case", ["scheme", "refused", "path", "token", "trust"])
def test_bench_url_errors_are_clear(running, tmp_path, case):
    port, _, ca, _ = running
    args, code, said = {
        "scheme": (["--url", f"http://127.0.0.1:{port}/"], 2, "the scheme must be ws:// or wss://"),
        "refused": (["--url", f"ws://127.0.0.1:{free_port()}/"], 1, "connection refused"),
        "path": (["--url", f"wss://127.0.0.1:{port}/nowhere", "--cafile", ca], 1, "404 Not Found"),
        "token": (["--url", f"wss://127.0.0.1:{port}/", "--cafile", ca], 1, "401 Unauthorized: a token is required"),
        "trust": (["--url", f"wss://127.0.0.1:{port}/"], 1, "is not trusted"),
    }[case]
    out = bench(*args, "--scenarios", "a", "--clients", "cheap", "--runs", "1", "--out", str(tmp_path), timeout=30)
    assert out.returncode == code, out.stderr
    assert said in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())  # nothing written
