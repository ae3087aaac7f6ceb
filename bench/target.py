"""A broker that is already running, named by its URL (`python -m bench.run --url`).

The runner does not start, stop or configure it: every client (the publisher, the cheap
subscribers or the Bun fleet) connects to the URL's host, port and path, over TLS for wss://,
with a token (if given) in a `bearer.` subprotocol entry beside `broker.v1`, as a browser
sends it. Its CPU is read from /proc only for a local process named by --pid."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import msgspec

from . import scan
from .loadgen import connect, connect_failure
from .systems import Deployment, System

CHECK_TIMEOUT = 10.0  # s for the whole check: connect, TLS, upgrade, one subscribe and one publish
DEFAULT_PORTS = {"ws": 80, "wss": 443}  # RFC 6455, as browsers and Bun use them


class TargetError(Exception):
    """A --url target that cannot be used: the message says why, for the user."""


def display(url: str) -> str:
    """The URL as tables and logs show it: scheme, host, port and path, no query (a query
    may carry a token)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # no user:password@
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


def parse(url: str, token: str | None = None, cafile: str | None = None) -> System:
    """The System of a broker at `url` (ws:// or wss://); TargetError if the URL is unusable.
    `token`: sent in a `bearer.<token>` subprotocol entry; `cafile`: PEM CA(s) to trust for wss://."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"--url {url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise TargetError(f"--url {url!r}: the scheme must be ws:// or wss://, not {scheme + '://' if scheme else 'none'}")
    if not parts.hostname:
        raise TargetError(f"--url {url!r} names no host (e.g. ws://127.0.0.1:7341/)")
    if parts.username is not None or parts.password is not None:
        raise TargetError(f"--url {display(url)!r}: credentials in the URL are not sent; give a token with --token")
    if parts.fragment:
        raise TargetError(f"--url {display(url)!r}: a WebSocket URL has no #fragment")
    if cafile is not None:
        if scheme != "wss":
            raise TargetError(f"--cafile is for wss:// URLs, not {display(url)}")
        try:
            ssl.create_default_context(cafile=cafile)
        except ssl.SSLError:
            raise TargetError(f"--cafile: {cafile} holds no PEM CA certificate (-----BEGIN CERTIFICATE-----)") from None
        except OSError as exc:
            raise TargetError(f"--cafile: cannot read {cafile}: {exc.strerror or exc}") from None
        cafile = os.path.abspath(cafile)  # the fleet runs in bench/fleet
    if token is not None:
        token = token.strip()
        if not token or any(c in token for c in ", \t\r\n"):
            raise TargetError("--token: empty, or holds a comma or white space (it goes in a Sec-WebSocket-Protocol entry)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return System(
        display(url),
        scan.BROKER,
        "broker.v1" + (f", bearer.{token}" if token else ""),
        "broker",
        acks=True,
        tls=scheme == "wss",
        external=True,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        path=path,
        ca=cafile,
    )


def check_pid(pid: int) -> None:
    if pid <= 0 or not os.path.exists(f"/proc/{pid}/stat"):
        raise TargetError(f"--pid {pid}: no such process on this machine (its CPU is read from /proc/{pid})")


def explain(system: System, exc: BaseException) -> str:
    return connect_failure(system, system.port, exc, CHECK_TIMEOUT)


async def _check(system: System, topic: str, pattern: str) -> None:
    """Connect as the benchmark's clients do, then subscribe to `pattern` and publish one
    message to `topic`, each acknowledged: the URL, TLS, the token and its grants all work."""
    try:
        client = await connect(system, system.host, system.port, [], sample=True)
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise TargetError(explain(system, exc)) from None
    try:
        chosen = next(
            (line.split(":", 1)[1].strip() for line in client.response.split("\r\n") if line.lower().startswith("sec-websocket-protocol:")),
            "",
        )
        if chosen != "broker.v1":
            raise TargetError(
                f"{system.name} accepted the WebSocket but not the broker.v1 subprotocol "
                f"(it chose {chosen or 'none'}): is it this project's broker?"
            )
        frames = [["sub", 1, pattern], ["pub", 2, topic, b"0" * 20 + b"bench check"]]
        client.send(msgspec.msgpack.encode(frames), 2)
        answers: dict[int, list] = {}
        deadline = time.monotonic() + CHECK_TIMEOUT
        while len(answers) < 2:
            if client.close_code:
                raise TargetError(f"{system.name} closed the connection (code {client.close_code}) after a subscribe and a publish")
            if time.monotonic() > deadline:
                raise TargetError(f"{system.name} did not acknowledge a subscribe and a publish within {CHECK_TIMEOUT:g} s")
            for payload in client.scanner.samples:
                try:
                    frame = msgspec.msgpack.decode(payload)
                except msgspec.DecodeError:
                    raise TargetError(f"{system.name} sent a frame that is not MessagePack: is it this project's broker?") from None
                for message in frame if frame and isinstance(frame[0], list) else [frame]:
                    if message and message[0] in ("ack", "err") and message[1] in (1, 2):
                        answers[message[1]] = message
            client.scanner.samples = []
            await asyncio.sleep(0.01)
        for request_id, what in ((1, f"subscribe to {pattern}"), (2, f"publish to {topic}")):
            answer = answers[request_id]
            if answer[0] == "err":
                raise TargetError(f"{system.name} refused to {what}: error {answer[2]}: {answer[3]}")
    finally:
        client.transport.abort()


def check(system: System, topic: str, pattern: str | None = None) -> None:
    """TargetError unless the broker at `system`'s URL takes the benchmark's clients: a
    subscription to `pattern` (default `topic`) and a publish to `topic` (see _check)."""

    async def bounded() -> None:
        try:
            await asyncio.wait_for(_check(system, topic, pattern or topic), CHECK_TIMEOUT)
        except TimeoutError:
            raise TargetError(explain(system, TimeoutError())) from None

    asyncio.run(bounded())


@dataclass
class External(Deployment):
    """The Deployment of a --url target: nothing to start or stop; its CPU from /proc only with
    `pid` (a local process), else unknown (pids() is empty)."""

    target: System | None = None
    pid: int = 0

    @classmethod
    def of(cls, system: System, pid: int = 0) -> External:
        return cls(system.name, {}, {"server": system.port}, system.port, [system.port], target=system, pid=pid)

    @property
    def system(self) -> System:
        return self.target

    def pids(self) -> dict[str, int]:
        return {"server": self.pid} if self.pid else {}

    def alive(self) -> bool:
        if self.pid and not os.path.exists(f"/proc/{self.pid}/stat"):
            return False
        try:
            with socket.create_connection((self.target.host, self.target.port), 5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        pass

    def wait_ready(self, topic: str, timeout: float = 30.0) -> None:
        check(self.target, topic)
