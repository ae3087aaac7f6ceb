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
        while pipe.poll():
            command = pipe.recv()
            if command == "exit":
                if not done.done():
                    done.set_result(None)
                return
            pipe.send(handle(command))

    loop.add_reader(pipe.fileno(), readable)
    try:
        await done
    finally:
        loop.remove_reader(pipe.fileno())


def subscriber_main(pipe: Connection, system_name: str, host: str, port: int, assignments: list[list[str]]) -> None:
    """One process holding len(assignments) subscriber connections; assignments[i] = patterns."""

    async def main() -> None:
        system = SYSTEMS[system_name]
        clients = []
        for patterns in assignments:
            clients.append(await connect(system, host, port, patterns))
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
) -> None:
    """Publishes round-robin over `topics`: closed loop (rate 0: at most `window` messages in
    flight to the pacer) or at a fixed `rate` per second. The pacer is one of the scenario's
    subscribers (counted like the others) and also measures latency."""

    async def main() -> None:
        system = SYSTEMS[system_name]
        loop = asyncio.get_running_loop()
        state = {"published": [0] * len(topics), "go": False, "stop": False}
        latencies: list[int] = []
        carry = bytearray()
        wake = asyncio.Event()
        matches_pacer = [any(_matches(p, t) for p in pacer_patterns) for t in topics]
        pacer_expected = [0]

        def on_pacer_data(client: WSClient) -> None:
            samples = client.scanner.samples
            if samples:
                now = time.monotonic_ns()
                if state["go"] and rate:
                    for frame in samples:
                        for payload in system.payloads(frame, carry):
                            latencies.append(now - int(payload[:STAMP]))
                client.scanner.samples = []
            wake.set()

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
        per_frame_pacer = sum(matches_pacer[i] for i in fixed[2])
        per_frame_counts = [0] * len(topics)
        for i in fixed[2]:
            per_frame_counts[i] += 1

        async def run_closed() -> None:
            opcode, data, _ = fixed
            while not state["stop"]:
                if pacer_expected[0] - pacer.scanner.messages >= window or publisher.paused:
                    wake.clear()
                    try:
                        async with asyncio.timeout(0.5):
                            await wake.wait()
                    except TimeoutError:
                        # lost messages (a peer that drops) must not stall the closed loop
                        pacer_expected[0] = pacer.scanner.messages
                    continue
                publisher.send(data, opcode)
                pacer_expected[0] += per_frame_pacer
                for i, n in enumerate(per_frame_counts):
                    if n:
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
                return {"published": dict(zip(topics, state["published"]))}
            if command == "latency":
                return latencies
            return None

        await _commands(pipe, handle)
        if task is not None:
            task.cancel()
        pacer.transport.abort()
        publisher.transport.abort()

    uvloop.run(main())


def _matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)
