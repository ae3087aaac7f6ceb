"""The two kinds of subscriber fleets the runner drives, behind one interface.

RealClients: the Bun fleet (bench/fleet), applications that decode every message.
CheapClients: Python processes that count messages with the compiled scanner (bench/_scan.pyx).

Both take the connections of a scenario (`connections[i]` = the patterns of connection i) and
the port each connects to (`ports[i]`: a cluster's subscribers are spread over its nodes), split
them round-robin over `procs` processes, keep each process's delivered total in its slot of the
shared counters, and answer `mark()` with per-connection counts in the scenario's order."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import time
from collections import Counter
from pathlib import Path

from .counters import Counters
from .fleetproc import FLEET as FLEET_DIR
from .fleetproc import Fleet, FleetError
from .loadgen import subscriber_main
from .systems import HERE, System, bun_binary


def split(connections: list[list[str]], procs: int) -> list[list[int]]:
    """Connection indexes per process (round-robin; no empty process)."""
    return [g for g in (list(range(i, len(connections), procs)) for i in range(procs)) if g]


def merge(parts: list[dict], groups: list[list[int]], size: int) -> dict:
    """One mark from the marks of every process: per-connection counts back in scenario order,
    numbers summed, close codes merged."""
    per_conn = [0] * size
    out: dict = {"closes": Counter()}
    for part, group in zip(parts, groups):
        for index, count in zip(group, part["per_conn"]):
            per_conn[index] = count
        out["closes"].update({str(k): v for k, v in part.get("closes", {}).items()})
        for key, value in part.items():
            if key not in ("per_conn", "closes", "time_ns", "sink") and isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    out["per_conn"] = per_conn
    out["closes"] = dict(out["closes"])
    return out


class RealClients:
    kind = "real"
    command: list[str] | None = None  # the fleet's program (None: Bun running fleet.js)
    extra: dict | None = None  # more of its config

    def __init__(
        self, system: System, ports: list[int], connections: list[list[str]], counters: Counters, procs: int, latency: bool
    ) -> None:
        self.groups = split(connections, procs)
        self.size = len(connections)
        self.fleets: list[Fleet] = []
        try:
            for slot, group in enumerate(self.groups):
                self.fleets.append(
                    Fleet(
                        system,
                        [ports[i] for i in group],
                        [connections[i] for i in group],
                        counters.path,
                        slot,
                        latency,
                        command=self.command_line(),
                        extra=self.extra,
                    )
                )
            before = time.monotonic_ns()
            for fleet in self.fleets:
                fleet.wait_ready()
            after = time.monotonic_ns()
            for fleet in self.fleets:  # the fleet's clock is the clock of time.monotonic_ns()
                if not before - 1_000_000_000 <= fleet.ready["clock_ns"] <= after:
                    raise FleetError(f"the fleet's clock ({fleet.ready['clock_ns']}) is not CLOCK_MONOTONIC ({before}..{after})")
        except BaseException:
            self.close()
            raise

    def command_line(self) -> list[str] | None:
        return self.command

    @property
    def pids(self) -> list[int]:
        return [f.pid for f in self.fleets]

    def mark(self) -> dict:
        return merge([f.ask("mark") for f in self.fleets], self.groups, self.size)

    def latency(self) -> list[list[float]]:
        return [pair for f in self.fleets for pair in f.ask("latency")["histogram"]]

    def close(self) -> None:
        for fleet in self.fleets:
            fleet.close()


class CheapClients:
    kind = "cheap"

    def __init__(
        self, system: System, ports: list[int], connections: list[list[str]], counters: Counters, procs: int, latency: bool
    ) -> None:
        ctx = mp.get_context("spawn")
        self.groups = split(connections, procs)
        self.size = len(connections)
        self.procs, self.pipes = [], []
        try:
            for slot, group in enumerate(self.groups):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(
                    target=subscriber_main,
                    args=(
                        theirs,
                        system,
                        system.host,
                        [ports[i] for i in group],
                        [connections[i] for i in group],
                        counters.path,
                        counters.slots,
                        slot,
                        latency and slot == 0,
                    ),
                    daemon=True,
                )
                p.start()
                self.procs.append(p)
                self.pipes.append(ours)
            for pipe in self.pipes:
                answer = ask(pipe, None, 120)
                if answer != "ready":
                    raise RuntimeError(answer["error"] if isinstance(answer, dict) else "a subscriber process did not get ready")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def mark(self) -> dict:
        return merge([ask(pipe, "mark") for pipe in self.pipes], self.groups, self.size)

    def latency(self) -> list[list[float]]:
        return [list(pair) for pipe in self.pipes for pair in ask(pipe, "latency")]

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send("exit")
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def ask(pipe, command, timeout: float = 60.0):
    """Send a command (None: only wait) and return the answer; fails instead of hanging."""
    if command is not None:
        pipe.send(command)
    if not pipe.poll(timeout):
        raise RuntimeError(f"a load generator process did not answer {command!r}")
    return pipe.recv()


class ClientNode(RealClients):
    """The broker's TypeScript client (clients/js, built; its lock file brings Node 22) in
    Node, one Client per connection, a handler per message: bench/fleet/client.js."""

    kind = "client-node"
    extra = {"transport": "websocket"}

    def command_line(self) -> list[str]:
        js = js_client()
        return [str(js / "node_modules" / ".bin" / "node"), str(FLEET_DIR / "client.js")]


class ClientBun(ClientNode):
    kind = "client-bun"

    def command_line(self) -> list[str]:
        js_client()
        return [bun_binary(), str(FLEET_DIR / "client.js")]


class ClientNodeFallback(ClientNode):
    """The same over the SSE + POST fallback transport."""

    kind = "client-node-sse"
    extra = {"transport": "fallback"}


def js_client() -> Path:
    """clients/js installed from its lock file and built, the first time it is needed."""
    js = HERE.parent / "clients" / "js"
    if not (js / "node_modules" / "typescript" / "package.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(js)], check=True)
    if not (js / "dist" / "index.js").exists():
        subprocess.run(
            [str(js / "node_modules" / ".bin" / "node"), str(js / "node_modules" / "typescript" / "bin" / "tsc"), "-p", str(js)], check=True
        )
    return js


CLIENTS = {
    "real": RealClients,
    "cheap": CheapClients,
    "client-node": ClientNode,
    "client-bun": ClientBun,
    "client-node-sse": ClientNodeFallback,
}
