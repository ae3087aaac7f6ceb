"""Load generator processes: subscribers that count cheaply, and a publisher with a pacer.

Subscribers run many WebSocket connections per process over plain asyncio protocols; each
received chunk goes to a compiled scanner that counts frames and messages without decoding
them. Only the pacer connection (in the publisher process) decodes payloads, for latency.

Each process is driven by the orchestrator (bench/run.py) over a multiprocessing pipe."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from multiprocessing.connection import Connection

import uvloop

from . import scan
from .systems import SYSTEMS, System

STAMP = 20  # payloads start with the publish time, monotonic ns, as 20 ASCII digits


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class WSClient(asyncio.Protocol):
    """A minimal WebSocket client: handshake, zero-key masked sends, scanned receives."""

    def __init__(self, system: System, host: str, port: int, scanner, on_data=None) -> None:
        self.system = system
        self.host, self.port = host, port
        self.scanner = scanner
        self.on_data = on_data
        self.ready = asyncio.get_running_loop().create_future()
        self.transport = None
        self._head = b""
        self.paused = False
        self.counted = 0  # messages already reported to Progress

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET / HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.system.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.system.subprotocol}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self._head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(self._head[:200].decode(errors="replace")))
                return
            data = self._head[end + 4 :]
            self.ready.set_result(None)
            if not data:
                return
        scanner = self.scanner
        scanner.feed(data)
        if scanner.control:
            for opcode, payload in scanner.control:
                if opcode == 9:
                    self.send(payload, 0xA)
            scanner.control.clear()
        if self.on_data is not None:
            self.on_data(self)

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost during handshake"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def send(self, payload: bytes, opcode: int = 2) -> None:
        size = len(payload)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + size.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)  # mask key 0: the payload goes as is


async def connect(system: System, host: str, port: int, patterns: list[str], sample: bool = False, on_data=None) -> WSClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: WSClient(system, host, port, scan.Scanner(system.scan_mode, sample), on_data), host, port
    )
    await asyncio.wait_for(client.ready, 10)
    for opcode, frame in system.hello() + (system.subscribe(patterns) if patterns else []):
        client.send(frame, opcode)
    return client


async def _commands(pipe: Connection, handle) -> None:
    """Serve orchestrator commands until 'exit'."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        try:
            while pipe.poll():
                command = pipe.recv()
                if command == "exit":
                    break
                pipe.send(handle(command))
            else:
                return
        except (EOFError, OSError):
            pass  # the orchestrator is gone: stop too
        if not done.done():
            done.set_result(None)

    loop.add_reader(pipe.fileno(), readable)
    try:
        await done
    finally:
        loop.remove_reader(pipe.fileno())


class Progress:
    """Publishes this process's delivered-message count in a shared-memory slot, for the
    publisher's closed loop (updated once per received chunk, not per message)."""

    def __init__(self, shared, slot: int) -> None:
        self.shared = shared
        self.slot = slot
        self.total = 0

    def __call__(self, client: "WSClient") -> None:
        messages = client.scanner.messages
        self.total += messages - client.counted
        client.counted = messages
        self.shared[self.slot] = self.total


def subscriber_main(pipe: Connection, system_name: str, host: str, port: int, assignments: list[list[str]], shared, slot: int) -> None:
    """One process holding len(assignments) subscriber connections; assignments[i] = patterns."""

    async def main() -> None:
        system = SYSTEMS[system_name]
        progress = Progress(shared, slot)
        clients = []
        for patterns in assignments:
            clients.append(await connect(system, host, port, patterns, on_data=progress))
        pipe.send("ready")

        def handle(command):
            if command == "mark":
                return {
                    "messages": [c.scanner.messages for c in clients],
                    "frames": sum(c.scanner.frames for c in clients),
                    "cpu": cpu_seconds(),
                    "time": time.monotonic(),
                }
            return None

        await _commands(pipe, handle)
        for c in clients:
            c.transport.abort()

    uvloop.run(main())


def publisher_main(
    pipe: Connection,
    system_name: str,
    host: str,
    port: int,
    topics: list[str],
    pacer_patterns: list[str],
    payload_size: int,
    batch: int,
    window: int,
    rate: float,
    deliveries: list[int],
    shared,
    slot: int,
) -> None:
    """Publishes round-robin over `topics`: closed loop (rate 0: at most `window` deliveries in
    flight, summed over every subscriber through shared memory) or at a fixed `rate` per second.
    `deliveries[i]` is how many subscribers receive a message of topics[i]. The pacer is one of
    the scenario's subscribers (counted like the others) and also measures latency."""

    async def main() -> None:
        system = SYSTEMS[system_name]
        loop = asyncio.get_running_loop()
        state = {"published": [0] * len(topics), "go": False, "stop": False, "stalls": 0}
        latencies: list[int] = []
        carry = bytearray()
        wake = asyncio.Event()

        def on_pacer_data(client: WSClient) -> None:
            samples = client.scanner.samples
            if samples:
                now = time.monotonic_ns()
                if state["go"] and rate:
                    for frame in samples:
                        for payload in system.payloads(frame, carry):
                            latencies.append(now - int(payload[:STAMP]))
                client.scanner.samples = []
            progress(client)
            wake.set()

        progress = Progress(shared, slot)
        pacer = await connect(system, host, port, pacer_patterns, sample=True, on_data=on_pacer_data)
        publisher = await connect(system, host, port, [])
        filler = b"x" * max(0, payload_size - STAMP)

        def frame_for(start: int) -> tuple[int, bytes, list[int]]:
            stamp = b"%020d" % time.monotonic_ns()
            payload = (stamp + filler)[:payload_size] if payload_size >= STAMP else stamp[:payload_size]
            idx = [(start + i) % len(topics) for i in range(batch)]
            opcode, data = system.publish([(topics[i], payload) for i in idx])
            return opcode, data, idx

        # Closed loop: the same frame bytes are sent again and again (building them is not
        # what is measured); latency runs build each frame with a fresh timestamp.
        fixed = frame_for(0)
        per_frame_counts = [0] * len(topics)
        for i in fixed[2]:
            per_frame_counts[i] += 1
        per_frame_deliveries = sum(n * deliveries[i] for i, n in enumerate(per_frame_counts))
        counted = [(i, n) for i, n in enumerate(per_frame_counts) if n]

        async def run_closed() -> None:
            opcode, data, _ = fixed
            expected = 0
            stalled_since = None
            while not state["stop"]:
                received = sum(shared)
                if expected - received >= window or publisher.paused:
                    now = loop.time()
                    if stalled_since is None or received != stalled_since[1]:
                        stalled_since = (now, received)
                    elif now - stalled_since[0] > 1.0:
                        expected = received  # a peer that drops messages must not stall the loop
                        state["stalls"] += 1
                    wake.clear()
                    try:
                        async with asyncio.timeout(0.002):
                            await wake.wait()
                    except TimeoutError:
                        pass
                    continue
                publisher.send(data, opcode)
                expected += per_frame_deliveries
                for i, n in counted:
                    state["published"][i] += n
                await asyncio.sleep(0)

        async def run_rate() -> None:
            interval = 0.001
            per_tick = rate * interval
            owed = 0.0
            nxt = 0
            start = loop.time()
            tick = 0
            while not state["stop"]:
                tick += 1
                owed += per_tick
                count = int(owed)
                owed -= count
                if count:
                    stamp = b"%020d" % time.monotonic_ns()
                    payload = (stamp + filler)[:payload_size]
                    idx = [(nxt + i) % len(topics) for i in range(count)]
                    nxt += count
                    opcode, data = system.publish([(topics[i], payload) for i in idx])
                    publisher.send(data, opcode)
                    for i in idx:
                        state["published"][i] += 1
                delay = start + tick * interval - loop.time()
                await asyncio.sleep(max(0.0, delay))

        task = None
        pipe.send("ready")

        def handle(command):
            nonlocal task
            if command == "go":
                state["go"] = True
                task = loop.create_task(run_rate() if rate else run_closed())
                return "going"
            if command == "mark":
                return {"messages": [pacer.scanner.messages], "frames": pacer.scanner.frames, "cpu": cpu_seconds(), "time": time.monotonic()}
            if command == "stop":
                state["stop"] = True
                wake.set()
                return {"published": dict(zip(topics, state["published"])), "stalls": state["stalls"]}
            if command == "latency":  # percentiles in microseconds, computed here (small reply)
                ordered = sorted(latencies)
                if not ordered:
                    return {}
                pick = lambda q: ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000
                return {"p50_us": pick(0.5), "p99_us": pick(0.99), "p999_us": pick(0.999), "latency_samples": len(ordered)}
            return None

        await _commands(pipe, handle)
        if task is not None:
            task.cancel()
        pacer.transport.abort()
        publisher.transport.abort()

    uvloop.run(main())

