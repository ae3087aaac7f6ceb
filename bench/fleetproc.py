"""Starts and drives the real-client fleet (bench/fleet/fleet.js, one Bun process holding many
WebSocket connections) over its stdin/stdout: one command line in, one JSON line out."""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from .systems import HERE, System, bun_binary, child_setup

FLEET = HERE / "fleet"


def install() -> None:
    """The fleet's npm packages, from its committed lock file, the first time they are needed."""
    if not (FLEET / "node_modules" / "@msgpack" / "msgpack" / "package.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(FLEET)], check=True)


class FleetError(RuntimeError):
    pass


class Fleet:
    """One fleet process: `connections[i]` is the list of patterns connection i subscribes to;
    `port` the port of every connection, or a list: connection i connects to port[i]."""

    def __init__(
        self,
        system: System,
        port: int | list[int],
        connections: list[list[str]],
        counters_path: str,
        slot: int,
        latency: bool = False,
        concurrency: int = 100,
        ready_timeout: float = 120.0,
        command: list[str] | None = None,
        extra: dict | None = None,
    ) -> None:
        """`command`: the program and script that read the config (default: Bun running
        fleet.js); `extra`: more config for it."""
        install()
        ports = port if isinstance(port, list) else [port] * len(connections)
        config = {
            "url": system.url(ports[0]),
            "urls": [system.url(p) for p in ports] if len(set(ports)) > 1 else None,
            "ca": system.ca_file(),
            "protocol": system.fleet_protocol,
            "subprotocol": system.subprotocol,
            "acks": system.acks,
            "connections": connections,
            "counter": counters_path,
            "slot": slot,
            "latency": latency,
            "concurrency": concurrency,
            "ready_timeout_s": ready_timeout,
            **(extra or {}),
        }
        fd, self.config_path = tempfile.mkstemp(prefix="bench-fleet-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        self.log = tempfile.NamedTemporaryFile(prefix="bench-fleet-", suffix=".log", delete=False)
        self.ready_timeout = ready_timeout
        if command is None:
            command = [bun_binary(), *os.environ.get("BENCH_FLEET_BUN_ARGS", "").split(), str(FLEET / "fleet.js")]
        self.proc = subprocess.Popen(
            [*command, self.config_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=FLEET,
            preexec_fn=child_setup,
        )
        self._buffer = b""
        self.ready: dict | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FleetError(f"the fleet did not answer within {timeout:g} s ({self.log.name})")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise FleetError(f"the fleet exited with {self.proc.wait()} ({self.log.name}): {self.tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise FleetError(f"fleet: {answer['error']} ({self.log.name}): {self.tail()}")
        return answer

    def tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-1500:]

    def wait_ready(self) -> dict:
        self.ready = self._line(self.ready_timeout + 10)
        return self.ready

    def ask(self, command: str, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        os.unlink(self.config_path)
