"""The dashboard in a real headless Chromium: it loads, asks for the admin key (and asks again
when the key is refused), shows live numbers that change while a publisher runs, and logs no
console errors other than the refused key's 401. Needs Playwright (test extras) and a Chromium
(`apt-get install chromium`, or `playwright install chromium`); skipped, saying which is
missing, where there is none."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from broker import __version__
from conftest import ROOT, free_port
from redis_support import BrokerNode

PUBLISHER = """
import asyncio, sys
from broker.client import Client
async def main():
    async with Client(sys.argv[1]) as client:
        sub = await client.subscribe("md.>")
        i = 0
        while True:
            for _ in range(50):
                i += 1
                client.publish("md.live", b"%d" % i)
            await asyncio.sleep(0.01)
asyncio.run(main())
"""


KEY = "dashboard-key-of-this-test"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def chromium_browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    executable = chromium()
    with sync_api.sync_playwright() as playwright:
        if executable is None:
            try:
                browser = playwright.chromium.launch()
            except Exception as exc:  # no Playwright-downloaded browser either
                pytest.skip(f"no Chromium here (apt-get install chromium, or playwright install chromium): {exc}")
        else:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def wait_admin(admin: int) -> None:
    deadline = time.monotonic() + 10
    while True:  # the admin server starts right after the WebSocket listener
        try:
            socket.create_connection(("127.0.0.1", admin), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the admin server did not start"
            time.sleep(0.05)


STATUS = "document.getElementById('status').textContent"
LIVE_RATE = "(() => { const t = document.getElementById('delivered-rate').textContent; return t !== '0' && t !== '–'; })()"


@pytest.mark.parametrize("processes", ["one process", "workers"])
@pytest.mark.slow
@pytest.mark.browser
def test_the_dashboard_shows_live_numbers_in_chromium(processes, request):
    """On one broker, and on the supervisor of `--workers 2` (its events combine the workers'):
    the node's name, version and uptime, live numbers, a chart with axes."""
    extra: list[str] = []
    if processes == "workers":
        redis_url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        extra = ["--workers", "2", "--redis-url", redis_url, "--redis-prefix", prefix]
    with chromium_browser() as browser:
        admin = free_port()
        with BrokerNode("--admin-port", str(admin), "--admin-api-key", KEY, "--node-name", "edge-7", *extra) as node:
            wait_admin(admin)
            publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, node.url], cwd=ROOT)
            try:
                page = browser.new_page()
                problems: list[str] = []
                page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.goto(f"http://127.0.0.1:{admin}/dashboard")
                status = STATUS
                page.wait_for_function(f"{status} === 'needs the admin key'", timeout=10_000)
                page.fill("#key", "not-the-key")
                page.click("#key-form button")
                page.wait_for_function(f"{status} === 'the key was refused'", timeout=10_000)
                assert all("401" in problem for problem in problems), problems  # the browser logs the refused fetch
                problems.clear()
                page.fill("#key", KEY)
                page.click("#key-form button")
                page.wait_for_function(f"{status} === 'live'", timeout=10_000)
                assert page.is_hidden("#key-form")
                # the first snapshot has no rate yet and shows "0"; the next ones show the
                # publisher's, so the number changes while the page is open
                page.wait_for_function(
                    "(() => { const t = document.getElementById('delivered-rate').textContent; return t !== '0' && t !== '–'; })()",
                    timeout=10_000,
                )
                assert page.text_content("#delivered-rate") not in ("0", "–")
                assert page.text_content("#connections") == "1"
                page.wait_for_function(
                    "document.querySelector('#hot td') && document.querySelector('#hot td').textContent === 'md.live'", timeout=10_000
                )
                assert page.text_content("#node") == "edge-7"
                assert page.text_content("#version").startswith(f"version {__version__}")
                assert ("2 workers" in page.text_content("#version")) == (processes == "workers")
                assert re.fullmatch(r"\d+ s", page.text_content("#uptime")), page.text_content("#uptime")
                # the chart has its axes: msg/s at 0 and at its top, seconds ago below
                ticks = page.eval_on_selector_all("#chart .tick", "nodes => nodes.map(n => n.textContent)")
                assert "0" in ticks and "now" in ticks and "−60 s" in ticks and "−30 s" in ticks, ticks
                assert page.locator("#chart .axis").count() == 2 and page.locator("#chart path.line").count() == 1
                # the cluster's nodes: this one (with workers, each worker, as they announce themselves)
                expected = json.dumps(["edge-7/w0", "edge-7/w1"] if processes == "workers" else ["edge-7"], separators=(",", ":"))
                page.wait_for_function(
                    f"JSON.stringify([...document.querySelectorAll('#nodes tr td:first-child')].map(td => td.textContent)) === '{expected}'",
                    timeout=15_000,
                )
                assert not problems, problems
                # a bookmark may carry the key in its fragment, which no request sends
                fresh = browser.new_page()
                fresh.on("pageerror", lambda error: problems.append(str(error)))
                fresh.goto(f"http://127.0.0.1:{admin}/dashboard/#key={KEY}")
                fresh.wait_for_function(f"{status} === 'live'", timeout=10_000)
                assert "#" not in fresh.url and not problems  # taken out of the address bar
            finally:
                publisher.kill()
                publisher.wait()


LONG_TOPIC = "md." + "INSTRUMENT" * 24  # 243 characters, nowhere a line may break

LONG_PUBLISHER = PUBLISHER.replace(
    'client.publish("md.live", b"%d" % i)', f'client.publish("md.live", b"%d" % i); client.publish("{LONG_TOPIC}", b"x")'
)


@pytest.mark.slow
@pytest.mark.browser
def test_the_dashboard_survives_a_restart_marks_old_numbers_and_fits_420_pixels():
    """The broker goes away and comes back on the same ports: meanwhile the page dims its numbers
    and says since when it has none; afterwards it shows the new process's rates, never a
    negative one (the new counters start from 0, below the old ones). At 420 px wide nothing
    spills sideways, a 240-character topic included."""
    with chromium_browser() as browser:
        admin, port = free_port(), free_port()
        args = ("--admin-port", str(admin), "--admin-api-key", KEY)
        page = browser.new_page(viewport={"width": 420, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        publisher = None
        try:
            with BrokerNode(*args, port=port) as node:
                wait_admin(admin)
                publisher = subprocess.Popen([sys.executable, "-c", LONG_PUBLISHER, node.url], cwd=ROOT)
                page.goto(f"http://127.0.0.1:{admin}/dashboard/#key={KEY}")
                page.wait_for_function(f"{STATUS} === 'live'", timeout=10_000)
                page.wait_for_function(LIVE_RATE, timeout=10_000)
                page.evaluate("""() => {
                    window.shown = [];
                    for (const id of ['published-rate', 'delivered-rate']) {
                        const element = document.getElementById(id);
                        new MutationObserver(() => window.shown.push(element.textContent)).observe(element, {childList: true, characterData: true, subtree: true});
                    }
                }""")
                page.wait_for_function(
                    f"[...document.querySelectorAll('#hot td')].some(td => td.textContent === '{LONG_TOPIC}')", timeout=15_000
                )
                assert page.evaluate("document.documentElement.scrollWidth") <= 420
                assert float(page.evaluate("getComputedStyle(document.getElementById('data')).opacity")) == 1
                time.sleep(2)  # its counters grow well past what the next process will have
                publisher.kill()
                publisher.wait()
                node.kill()
            # gone: the numbers on the page are marked as old
            page.wait_for_function(f"{STATUS}.startsWith('no data since')", timeout=10_000)
            page.wait_for_function("getComputedStyle(document.getElementById('data')).opacity < 0.6", timeout=5_000)
            assert page.evaluate("document.getElementById('data').classList.contains('stale')")
            with BrokerNode(*args, port=port) as node:
                publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, node.url], cwd=ROOT)
                page.wait_for_function(f"{STATUS} === 'live'", timeout=15_000)
                page.wait_for_function(LIVE_RATE, timeout=10_000)
                time.sleep(1.5)
                assert not page.evaluate("document.getElementById('data').classList.contains('stale')")
                shown = page.evaluate("window.shown")
                assert shown and not [text for text in shown if text.startswith(("-", "−"))], shown
                assert re.fullmatch(r"\d+ s", page.text_content("#uptime"))  # the new process's
                assert page.evaluate("document.documentElement.scrollWidth") <= 420
                assert not problems, problems
        finally:
            if publisher is not None and publisher.poll() is None:
                publisher.kill()
                publisher.wait()
