"""Load generator processes in Python: the publisher, and the "cheap" subscribers.

Cheap subscribers run many WebSocket connections per process over plain asyncio protocols;
each received chunk goes to a compiled scanner that counts frames and messages without
decoding them (the real-client fleet, bench/fleet, is the other kind of subscriber). In latency
scenarios one connection of the first process decodes every payload to time it.

The publisher sends pre-built frames of many publishes, round-robin over the topics: in a
closed loop (at most `window` deliveries in flight, summed over every subscriber through the
shared counters) or at a fixed rate with fresh timestamps.

Each process is driven by the orchestrator (bench/run.py) over a multiprocessing pipe."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import ssl
import time
from collections import Counter
from multiprocessing.connection import Connection

import uvloop

from . import scan
from .counters import Counters
from .systems import System, client_ssl

STAMP = 20  # payloads start with the publish time, CLOCK_MONOTONIC ns, as 20 ASCII digits


class HandshakeRefused(RuntimeError):
    """The server answered the upgrade request with something other than 101 (the answer's start)."""


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
        self.close_code = 0  # the server's close code; 1006 if the connection ended without one
        self.response = ""  # the server's answer to the upgrade request (status line and headers)

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [
            f"GET {self.system.path} HTTP/1.1",
            f"Host: {host}:{self.port}",
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
            self.response = self._head[:end].decode(errors="replace")
            if not self._head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(HandshakeRefused(self._head[:300].decode(errors="replace")))
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
                elif opcode == 8 and not self.close_code:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            scanner.control.clear()
        if self.on_data is not None:
            self.on_data(self)

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost during handshake"))
        if not self.close_code:
            self.close_code = 1006

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
    context = client_ssl(system)
    _, client = await loop.create_connection(
        lambda: WSClient(system, host, port, scan.Scanner(system.scan_mode, sample), on_data),
        host,
        port,
        ssl=context,
        server_hostname=host if context else None,
    )
    await asyncio.wait_for(client.ready, 10)
    for opcode, frame in system.hello() + (system.subscribe(patterns) if patterns else []):
        client.send(frame, opcode)
    return client


def connect_failure(system: System, port: int, exc: BaseException, timeout: float = 10.0) -> str:
    """Why a connection to `system` on `port` failed (connect()'s exception), in words a user can act on."""
    where = f"{system.host}:{port}"
    url = system.name if system.external else system.url(port)  # a --url target's without its query (a token?)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {system.host!r}: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = " (--cafile FILE trusts a private CA)" if system.external and not system.ca else ""
        return f"TLS: the certificate of {where} is not trusted: {exc.verify_message or exc}{hint}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc} (does it serve wss://, not ws://?)"
    if isinstance(exc, HandshakeRefused):
        text = str(exc)
        if not text.startswith("HTTP/"):
            hint = " (a wss:// server spoken to with ws://?)" if not system.tls else ""
            return f"{where} answered the WebSocket upgrade with something other than HTTP{hint}: {text[:40]!r}"
        body = text.split("\r\n\r\n", 1)[1].strip() if "\r\n\r\n" in text else ""
        return f"{url} refused the WebSocket upgrade: {text.split(chr(13))[0]}" + (f": {body[:200]}" if body else "")
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is it running, on this port?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within {timeout:g} s"
    if isinstance(exc, ConnectionError):
        hint = " (does it serve wss://, not ws://?)" if system.tls else " (a wss:// server spoken to with ws://?)"
        return f"{where} closed the connection during the {'TLS or ' if system.tls else ''}WebSocket handshake{hint}"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"{url}: {exc}"


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
    """Keeps this process's delivered-message total in its shared counter slot, for the
    publisher's closed loop (updated once per received chunk, not per message)."""

    def __init__(self, counters: Counters, slot: int) -> None:
        self.counters = counters
        self.slot = slot
        self.total = 0

    def __call__(self, client: WSClient) -> None:
        messages = client.scanner.messages
        self.total += messages - client.counted
        client.counted = messages
        self.counters.view[self.slot] = self.total


def subscriber_main(
    pipe: Connection,
    system: System,
    host: str,
    ports: list[int],
    assignments: list[list[str]],
    counters_path: str,
    slots: int,
    slot: int,
    sample_latency: bool,
) -> None:
    """One process holding len(assignments) subscriber connections; assignments[i] = patterns,
    connected to ports[i]. With `sample_latency`, the first connection decodes every payload and
    times it."""

    async def main() -> None:
        counters = Counters(counters_path, slots)
        progress = Progress(counters, slot)
        latencies: Counter[int] = Counter()  # µs -> count
        carry = bytearray()

        def on_sampled(client: WSClient) -> None:
            if client.scanner.samples:
                now = time.monotonic_ns()
                for frame in client.scanner.samples:
                    for payload in system.payloads(frame, carry):
                        latencies[max(0, now - int(payload[:STAMP])) // 1000] += 1
                client.scanner.samples = []
            progress(client)

        clients = []
        for i, patterns in enumerate(assignments):
            sampled = sample_latency and i == 0
            try:
                clients.append(await connect(system, host, ports[i], patterns, sample=sampled, on_data=on_sampled if sampled else progress))
            except (OSError, RuntimeError, TimeoutError) as exc:  # the orchestrator says why, once
                pipe.send({"error": f"subscriber connection {i + 1} of {len(assignments)}: {connect_failure(system, ports[i], exc)}"})
                for c in clients:
                    c.transport.abort()
                return
        pipe.send("ready")

        def handle(command):
            if command == "mark":
                return {
                    "per_conn": [c.scanner.messages for c in clients],
                    "frames": sum(c.scanner.frames for c in clients),
                    "closes": Counter(str(c.close_code) for c in clients if c.close_code),
                }
            if command == "latency":
                out = sorted(latencies.items())
                latencies.clear()
                return out
            return None

        await _commands(pipe, handle)
        for c in clients:
            c.transport.abort()
        counters.close()

    uvloop.run(main())


def build_frames(system: System, topics: list[str], batch: int, payload_size: int, stamp: bytes) -> list[tuple[int, bytes, list[int]]]:
    """The frames of one round-robin cycle over `topics`, `batch` publishes each:
    (opcode, frame, topic indexes). Every payload starts with `stamp` (20 digits)."""
    payload = (stamp + b"x" * max(0, payload_size - STAMP))[: max(payload_size, STAMP)]
    n = len(topics)
    cycle = n // math.gcd(n, batch)  # frames until the start topic comes round again
    frames = []
    for k in range(cycle):
        idx = [(k * batch + i) % n for i in range(batch)]
        opcode, data = system.publish([(topics[i], payload) for i in idx])
        frames.append((opcode, data, idx))
    return frames


def publisher_main(
    pipe: Connection,
    system: System,
    host: str,
    port: int,
    topics: list[str],
    payload_size: int,
    batch: int,
    deliveries: list[int],
    window: int,
    rate: float,
    counters_path: str,
    slots: int,
) -> None:
    """Publishes round-robin over `topics`: closed loop (rate 0: frames of `batch` publishes
    while fewer than `window` deliveries are in flight, summed over every subscriber through
    the shared counters) or at a fixed `rate` per second (every 1 ms, each frame with a fresh
    stamp). `deliveries[i]` is how many subscriber connections receive a message of topics[i]."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counters = Counters(counters_path, slots)
        try:
            publisher = await connect(system, host, port, [])
        except (OSError, RuntimeError, TimeoutError) as exc:  # the orchestrator says why
            pipe.send({"error": f"the publisher's connection: {connect_failure(system, port, exc)}"})
            return
        interval, per_tick = 0.001, batch
        if rate:
            per_tick = max(1, round(rate * interval))
            interval = per_tick / rate
        built_at = b"%020d" % time.monotonic_ns()  # unique in the frames: replaced by a fresh stamp at a fixed rate
        frames = build_frames(system, topics, per_tick, payload_size, built_at)
        frame_deliveries = [sum(deliveries[i] for i in idx) for _, _, idx in frames]
        sends = [0] * len(frames)
        state = {"stop": False, "stalls": 0}

        async def closed_loop() -> None:
            expected, k = 0, 0
            stalled_since = None
            while not state["stop"]:
                received = counters.total()
                if expected - received >= window or publisher.paused:
                    now = loop.time()
                    if stalled_since is None or received != stalled_since[1]:
                        stalled_since = (now, received)
                    elif now - stalled_since[0] > 1.0:
                        expected = received  # a system that drops messages must not stall the loop
                        state["stalls"] += 1
                    await asyncio.sleep(0.001)  # libuv timers have 1 ms resolution: less is a busy loop
                    continue
                opcode, data, _ = frames[k]
                publisher.send(data, opcode)
                sends[k] += 1
                expected += frame_deliveries[k]
                k = (k + 1) % len(frames)
                await asyncio.sleep(0)

        async def fixed_rate() -> None:
            start = loop.time()
            tick, k = 0, 0
            while not state["stop"]:
                opcode, data, _ = frames[k]
                publisher.send(data.replace(built_at, b"%020d" % time.monotonic_ns()), opcode)
                sends[k] += 1
                k = (k + 1) % len(frames)
                tick += 1
                await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))

        task = None
        pipe.send("ready")

        def handle(command):
            nonlocal task
            if command == "go":
                task = loop.create_task(fixed_rate() if rate else closed_loop())
                return "going"
            if command == "stop":
                state["stop"] = True
                published = [0] * len(topics)
                for (_, _, idx), n in zip(frames, sends):
                    for i in idx:
                        published[i] += n
                return {"published": published, "stalls": state["stalls"], "frames": sum(sends)}
            if command == "count":  # messages sent so far
                return sum(n * len(idx) for (_, _, idx), n in zip(frames, sends))
            return None

        await _commands(pipe, handle)
        if task is not None:
            task.cancel()
        publisher.transport.abort()
        counters.close()

    uvloop.run(main())
