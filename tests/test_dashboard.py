"""The dashboard in a real headless Chromium: it loads, asks for the admin key (and asks again
when the key is refused), shows live numbers that change while a publisher runs, and logs no
console errors other than the refused key's 401. Needs Playwright (test extras) and a Chromium
(`apt-get install chromium`, or `playwright install chromium`); skipped, saying which is
missing, where there is none."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from redis_support import BrokerNode, free_port

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


@pytest.mark.parametrize("processes", ["one process", "workers"])
@pytest.mark.slow
@pytest.mark.browser
def test_the_dashboard_shows_live_numbers_in_chromium(processes, request):
    """On one broker, and on the supervisor of `--workers 2` (its events combine the workers')."""
    extra: list[str] = []
    if processes == "workers":
        redis_url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        extra = ["--workers", "2", "--redis-url", redis_url, "--redis-prefix", prefix]
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
        admin = free_port()
        with BrokerNode("--admin-port", str(admin), "--admin-api-key", KEY, *extra) as node:
            deadline = time.monotonic() + 10
            while True:  # the admin server starts right after the WebSocket listener
                try:
                    socket.create_connection(("127.0.0.1", admin), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the admin server did not start"
                    time.sleep(0.05)
            publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, node.url], cwd=ROOT)
            try:
                page = browser.new_page()
                problems: list[str] = []
                page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.goto(f"http://127.0.0.1:{admin}/dashboard")
                status = "document.getElementById('status').textContent"
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
                page.wait_for_function("document.querySelector('#hot td') && document.querySelector('#hot td').textContent === 'md.live'", timeout=10_000)
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
                browser.close()
