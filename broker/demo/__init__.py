"""`broker demo`: a broker, a synthetic market-data publisher and a page that uses the
TypeScript client (clients/js), all on this machine, with nothing from the internet.

The publisher gives each of `symbols` instruments (md.EXCHANGE.SYMBOL) a random-walk price and
its own tick rate, from a tick every few seconds to tens a second (log-uniform), so a few
topics are busy and most are quiet, as on a market; each tick is a small JSON payload. The
page (static/demo.html, demo.js) shows the prices ticking, the connection's state, every gap
the client reports, and a switch that takes the client offline. It is served by a small HTTP
server of its own, with the built client and @msgpack/msgpack from clients/js (built with npm
the first time when they are not)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import subprocess
import time
from pathlib import Path

from ..client import Client
from ..config import Config
from ..errors import BrokerError

STATIC = Path(__file__).resolve().parent / "static"
# A checkout's client, beside the broker package.
CLIENT_DIR = Path(__file__).resolve().parent.parent.parent / "clients" / "js"
EXCHANGES = ("NASDAQ", "NYSE", "LSE", "XETRA", "TSE")
PUBLISH_PERIOD_S = 0.02

log = logging.getLogger("broker.demo")


def client_files(client_dir: Path) -> tuple[Path, Path]:
    """The built client (dist/) and @msgpack/msgpack's ES module build of `client_dir`, built
    with npm (from the lock file) when they are missing; BrokerError when they cannot be."""
    dist = client_dir / "dist"
    msgpack = client_dir / "node_modules" / "@msgpack" / "msgpack" / "dist.esm"
    if (dist / "index.js").exists() and (msgpack / "index.mjs").exists():
        return dist, msgpack
    if not (client_dir / "package.json").exists():
        raise BrokerError(f"no TypeScript client at {client_dir}: run the demo from a checkout of the broker, or give --client-dir")
    npm = shutil.which("npm")
    if npm is None:
        raise BrokerError(f"the client at {client_dir} is not built and npm is not installed: run `npm ci && npm run build` there")
    log.warning("building the TypeScript client in %s (npm ci, npm run build)", client_dir)
    for command in ([npm, "ci", "--no-audit", "--no-fund"], [npm, "run", "build"]):
        done = subprocess.run(command, cwd=client_dir, capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"`{' '.join(command[1:])}` failed in {client_dir}: {done.stderr.strip()[-500:]}")
    return dist, msgpack


class Instrument:
    __slots__ = ("topic", "symbol", "price", "period", "due", "seq")

    def __init__(self, topic: str, symbol: str, price: float, period: float, due: float) -> None:
        self.topic = topic
        self.symbol = symbol
        self.price = price
        self.period = period  # mean seconds between ticks
        self.due = due
        self.seq = 0


def instruments(count: int, rng: random.Random, now: float) -> list[Instrument]:
    out = []
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(count):
        symbol = "".join(rng.choice(letters) for _ in range(3 + i % 2)) + str(i)
        exchange = EXCHANGES[i % len(EXCHANGES)]
        period = math.exp(rng.uniform(math.log(0.03), math.log(4.0)))
        out.append(Instrument(f"md.{exchange}.{symbol}", symbol, round(rng.uniform(5, 500), 2), period, now + rng.uniform(0, period)))
    return out


async def publish_forever(url: str, symbols: int, seed: int = 7) -> None:
    """Tick every instrument at its own rate (exponential gaps around its period) forever."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    book = instruments(symbols, rng, loop.time())
    async with Client(url, heartbeat_s=None) as client:
        while True:
            now = loop.time()
            for item in book:
                if item.due <= now:
                    item.price = max(0.01, round(item.price * (1 + rng.gauss(0, 0.0015)), 2))
                    item.due = now + rng.expovariate(1 / item.period)
                    payload = {"s": item.symbol, "p": item.price, "q": rng.choice((100, 200, 500, 1000)), "t": int(time.time() * 1000)}
                    client.publish(item.topic, json.dumps(payload, separators=(",", ":")).encode())
            await asyncio.sleep(PUBLISH_PERIOD_S)


async def run_demo(config: Config, http_host: str, http_port: int, symbols: int, client_dir: Path, ready=None) -> None:
    """The broker (with `config`), the publisher and the page, until cancelled."""
    from aiohttp import web

    from ..server.app import Server

    dist, msgpack = client_files(client_dir)
    server = Server(config)
    await server.start()
    url = f"ws://{config.host}:{server.port}{config.path}"

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "demo.html", headers={"Cache-Control": "no-store"})

    async def record(request: web.Request) -> web.Response:
        """What the broker holds of each instrument now: its epoch and last sequence number
        (the tests compare what the page received with it)."""
        topics = {name: [str(state.epoch), state.seq] for name, state in server.router.topics.items() if name.startswith("md.")}
        return web.json_response({"url": url, "topics": topics})

    async def settings(request: web.Request) -> web.Response:
        return web.json_response({"url": url})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/settings", settings)
    app.router.add_get("/record", record)
    app.router.add_static("/static/", STATIC)
    app.router.add_static("/client/", dist)
    app.router.add_static("/vendor/msgpack/", msgpack)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, http_host, http_port)
    try:
        await site.start()
        publisher = asyncio.ensure_future(publish_forever(url, symbols))
        page_url = f"http://{http_host}:{runner.addresses[0][1]}/"
        print(f"broker demo: the page is at {page_url} (the broker at {url}, {symbols} instruments)", flush=True)
        if ready is not None:
            ready(page_url)
        try:
            await publisher
        finally:
            publisher.cancel()
    finally:
        await runner.cleanup()
        await server.stop()
