"""The TypeScript client in a real headless Chromium, on the page of `broker demo`: it shows
ticks; offline for seconds then online it loses and repeats nothing (checked per topic against
the broker's record); it recovers from a broker restart with the `ended` gap; a hidden page
unsubscribes and recovers when visible again; without `WebSocket` it uses the SSE + POST
fallback and gets the same messages; a path that drops every packet is noticed within the
heartbeat bound; and the page logs no console errors. Skipped, with one line saying why,
where Playwright, Chromium or npm cannot be had."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest

# The brokers these tests talk to are processes of their own (compiled whatever the suite's
# fast path): the suite's second, pure-Python run would repeat exactly the same.
pytestmark = [
    pytest.mark.skipif(
        os.environ.get("BROKER_PURE_PYTHON") == "1", reason="the demo broker runs compiled in its own process: covered by the compiled run"
    ),
    pytest.mark.slow,
    pytest.mark.browser,
]

from test_dashboard import chromium

from conftest import BlackHoleProxy, broker_cli, free_port

SYMBOLS = "40"


class Demo:
    """`broker demo` as a process on fixed ports (so that it can be restarted on them)."""

    def __init__(self, port: int | None = None, http_port: int | None = None) -> None:
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.proc = broker_cli(
            "demo",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--symbols",
            SYMBOLS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert "the page is at" in line, line + self.proc.stderr.read()
        self.url = f"http://127.0.0.1:{self.http_port}/"

    def record(self) -> dict[str, list]:
        with urllib.request.urlopen(self.url + "record", timeout=5) as answer:
            return json.load(answer)["topics"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(js_client):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    executable = chromium()
    with sync_api.sync_playwright() as playwright:
        try:
            if executable is None:
                browser = playwright.chromium.launch()
            else:
                browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as exc:
            pytest.skip(f"no Chromium here (apt-get install chromium, or playwright install chromium): {exc}")
        yield browser
        browser.close()


@pytest.fixture
def demo():
    d = Demo()
    yield d
    d.stop()


class Watched:
    """A page with its console errors collected."""

    def __init__(self, browser, url: str, init_script: str | None = None) -> None:
        self.context = browser.new_context()
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def value(self, expression: str):
        return self.page.evaluate(expression)

    def wait(self, expression: str, timeout_s: float = 15) -> None:
        self.page.wait_for_function(expression, timeout=timeout_s * 1000)

    def received(self) -> dict[str, list[tuple[str, int]]]:
        return {topic: [tuple(x) for x in seqs] for topic, seqs in self.value("window.demo.received").items()}

    def caught_up(self, record: dict[str, list], timeout_s: float = 15) -> None:
        """Wait until the page got every instrument up to what the broker held in `record`."""
        wanted = {topic: seq for topic, (epoch, seq) in record.items()}
        self.page.wait_for_function(
            """(wanted) => Object.entries(wanted).every(([t, seq]) => {
                 const got = window.demo.received[t]; return got && got[got.length - 1][1] >= seq; })""",
            arg=wanted,
            timeout=timeout_s * 1000,
        )

    def close(self) -> None:
        self.context.close()


def exactly_once(received: dict, gaps: list[dict]) -> None:
    """Per topic: every message once, in order; a jump only where a gap said so."""
    covered = {(g["topic"], g["epoch"], n) for g in gaps if g["last"] for n in range(g["first"], g["last"] + 1)}
    ended = {(g["topic"], g["epoch"]) for g in gaps if not g["last"]}
    for topic, seqs in received.items():
        assert len(set(seqs)) == len(seqs), f"{topic}: a message twice"
        for (epoch, seq), (next_epoch, next_seq) in zip(seqs, seqs[1:]):
            if next_epoch != epoch:
                assert (topic, epoch) in ended, f"{topic}: a new epoch without the old one's end"
                missing = range(1, next_seq)
                epoch = next_epoch
            else:
                missing = range(seq + 1, next_seq)
                assert next_seq > seq, f"{topic}: out of order {seq} then {next_seq}"
            lost = [n for n in missing if (topic, epoch, n) not in covered]
            assert not lost, f"{topic}: messages {lost} of epoch {epoch} lost without a gap"


def test_the_demo_page_shows_ticks(browser, demo):
    page = Watched(browser, demo.url)
    page.wait("window.demo && window.demo.count > 100")
    page.wait("document.querySelectorAll('#prices tr').length >= 20")
    assert page.value("document.getElementById('state').textContent") == "connected"
    assert page.value("document.getElementById('transport').textContent") == "websocket"
    assert not page.value("window.demo.gaps.length")
    exactly_once(page.received(), [])
    assert not page.errors, page.errors
    page.close()


def test_offline_for_seconds_then_online_loses_and_repeats_nothing(browser, demo):
    page = Watched(browser, demo.url)
    page.wait("window.demo.count > 50")
    page.context.set_offline(True)
    page.wait("document.getElementById('state').textContent === 'offline'", 5)
    during = page.value("window.demo.count")
    time.sleep(2)
    assert page.value("window.demo.count") == during  # nothing arrives while offline
    page.context.set_offline(False)
    page.wait("document.getElementById('state').textContent === 'connected'", 10)
    page.caught_up(demo.record())
    exactly_once(page.received(), page.value("window.demo.gaps"))
    assert page.value("window.demo.client.reconnects") == 1
    assert not page.errors, page.errors
    page.close()


def test_a_restarted_broker_is_recovered_with_the_ended_gap(browser, demo):
    page = Watched(browser, demo.url + "?heartbeatMs=1000&heartbeatTimeoutMs=3000")
    page.wait("window.demo.count > 50")
    before = demo.record()
    demo.stop()
    again = Demo(demo.port, demo.http_port)  # the same ports: a new epoch
    try:
        page.wait("document.getElementById('state').textContent === 'connected' && window.demo.client.reconnects >= 1", 20)
        page.caught_up(again.record())
        gaps = page.value("window.demo.gaps")
        ended = {g["topic"] for g in gaps if g["cause"] == "ended"}
        received = page.received()
        # a topic first published after `before` was taken is not judged (its old epoch is unknown)
        old = {topic for topic, seqs in received.items() if topic in before and seqs[0][0] == before[topic][0]}
        assert old and old <= ended, old - ended  # every topic the page had in the old epoch was told it ended
        exactly_once(received, gaps)
        # Chromium itself logs the refused attempts to reconnect while no broker listened
        assert all("ERR_CONNECTION_REFUSED" in e for e in page.errors), page.errors
    finally:
        again.stop()
    page.close()


def test_a_hidden_page_unsubscribes_and_recovers_when_visible(browser, demo):
    page = Watched(browser, demo.url + "?hiddenMode=unsubscribe&hiddenDelayMs=300")
    page.wait("window.demo.count > 50")
    page.value("""Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
                  document.dispatchEvent(new Event('visibilitychange'))""")
    time.sleep(1.0)  # the delay, and what was on its way
    paused = page.value("window.demo.count")
    time.sleep(1.5)
    assert page.value("window.demo.count") == paused, "deliveries went on while hidden"
    page.value("""Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'});
                  document.dispatchEvent(new Event('visibilitychange'))""")
    page.caught_up(demo.record())
    exactly_once(page.received(), page.value("window.demo.gaps"))
    assert page.value("window.demo.client.reconnects") == 0
    assert not page.errors, page.errors
    page.close()


def test_without_websocket_the_fallback_brings_the_same_messages(browser, demo):
    page = Watched(browser, demo.url, init_script="delete window.WebSocket")
    page.wait("window.demo.count > 50")
    assert page.value("document.getElementById('transport').textContent") == "fallback"
    page.caught_up(demo.record())
    exactly_once(page.received(), page.value("window.demo.gaps"))
    assert not page.errors, page.errors
    page.close()


def test_a_silent_network_is_noticed_within_the_heartbeat_bound(browser, demo):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = BlackHoleProxy(demo.port)
    proxy_url = asyncio.run_coroutine_threadsafe(proxy.start(), loop).result()
    try:
        page = Watched(browser, demo.url + f"?url={proxy_url}&transports=websocket&heartbeatMs=1000&heartbeatTimeoutMs=2500")
        page.wait("window.demo.count > 50")
        loop.call_soon_threadsafe(proxy.black_hole)
        silent_at = time.time() * 1000
        page.wait("window.demo.states.some((s) => s.state === 'disconnected')", 10)
        lost = page.value("window.demo.states.find((s) => s.state === 'disconnected')")
        assert "no heartbeat" in lost["reason"], lost
        # the bound: heartbeatTimeoutMs, checked four times per bound
        assert lost["at"] - silent_at <= 2500 + 2500 / 4 + 500, lost["at"] - silent_at
        page.wait("window.demo.client.reconnects >= 1 && window.demo.client.state === 'connected'", 10)
        page.caught_up(demo.record())
        exactly_once(page.received(), page.value("window.demo.gaps"))
        assert not page.errors, page.errors
        page.close()
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
