"""Shared test helpers: run a coroutine on uvloop, start a real server on a free port.

Every test that runs a loop fails if the loop's exception handler was called: an exception
that escaped a callback is a bug even when the test's own assertions pass."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
import pytest
import uvloop

from broker.config import load
from broker.messages import SUBPROTOCOL, server_decoder
from broker.server import Server

ROOT = Path(__file__).resolve().parent.parent


def run(coro, timeout: float = 60.0) -> Any:
    """Run `coro` on a new uvloop loop; fail if any callback raised into the loop."""
    errors: list[dict] = []
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert not errors, f"loop exception handler was called: {errors}"
    return result


@contextlib.asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[Server]:
    """A real broker on 127.0.0.1 and a free port, stopped gracefully on exit."""
    settings.setdefault("port", 0)
    settings.setdefault("log_level", "warning")
    server = Server(load(settings, environ={}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def decode_frames(data: bytes) -> list:
    """Split a stream of server frames (as the broker writes them) and decode each."""
    out = []
    while data:
        size = data[1] & 0x7F
        head = 2
        if size == 126:
            size, head = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[2:10], "big"), 10
        out.append(server_decoder.decode(data[head : head + size]))
        data = data[head + size :]
    return out


async def ws_raw(server: Server, **kwargs: Any):
    """A `websockets` client speaking broker.v1: for sending arbitrary frames."""
    import websockets

    return await websockets.connect(url(server), subprotocols=[SUBPROTOCOL], max_size=None, **kwargs)


async def recv_message(ws, timeout: float = 5.0):
    """The next server message on a `websockets` connection, decoded."""
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, bytes)
    return server_decoder.decode(data)


def broker_cli(*args: str, env: dict | None = None, **popen: Any) -> subprocess.Popen:
    """Start `python -m broker ARGS` as a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "broker", *args], env=full_env, cwd=ROOT, **popen)


@pytest.fixture(params=["cython", "python"])
def fastpath_impl(request):
    """Both fast-path implementations, for parity and behaviour tests."""
    if request.param == "cython":
        try:
            from broker import _fastpath as impl
        except ImportError:
            pytest.fail("the compiled fast path is not built: install with `pip install -e .`")
    else:
        from broker import _fastpath_py as impl
    return impl


encode = msgspec.msgpack.encode
