"""The TypeScript client (clients/js) under Node 22 and Bun: its unit tests, the interop test
that decodes every example of docs/protocol.md with the package, and its integration tests
against real brokers started here (one with small limits, one with authentication), over
the WebSocket and over the SSE + POST fallback. Skipped, with one line saying why, where npm
or the package registry cannot be had."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

# The brokers these tests talk to are processes of their own (compiled whatever the suite's
# fast path): the suite's second, pure-Python run would repeat exactly the same.
pytestmark = [
    pytest.mark.skipif(os.environ.get("BROKER_PURE_PYTHON") == "1", reason="the brokers run compiled in their own processes: covered by the compiled run"),
    pytest.mark.slow,
]

from redis_support import BrokerNode
from test_fallback_doc import sse_examples
from test_protocol_doc import EXAMPLES

SECRET = "js-client-test-secret-of-32-bytes"


def normal(value):
    """A documented value as the JS test compares it: integers {i: decimal}, bytes {b: hex}."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"i": str(value)}
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, list):
        return [normal(v) for v in value]
    return {k: normal(v) for k, v in value.items()}


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("js") / "examples.json"
    events = [{"name": name, "event": "\n".join(f"{k}: {v}" for k, v in fields.items()), "value": normal(value)} for name, (fields, value) in sse_examples().items()]
    messages = [{"name": e.name, "encoding": e.encoding, "hex": e.data.hex(), "value": normal(e.value)} for e in EXAMPLES.values()]
    path.write_text(json.dumps({"messages": messages, "events": events}))
    return str(path)


@pytest.fixture(scope="module")
def brokers():
    small = ("--history-max-messages", "5", "--max-subscriptions", "5")
    with (
        BrokerNode(*small) as plain,
        BrokerNode("--max-open-requests", "3", "--max-topics", "50") as limits,
        BrokerNode("--auth-jwt-secret", SECRET, "--auth-message-rate", "100") as auth,
    ):
        yield {"BROKER_URL": plain.url, "BROKER_LIMITS_URL": limits.url, "BROKER_AUTH_URL": auth.url, "BROKER_AUTH_SECRET": SECRET}


def run_tests(command: list[str], cwd, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def test_under_node(js_client, examples_file, brokers):
    output = run_tests([js_client.node, "--test", "--test-concurrency=1", "test/unit.test.mjs", "test/interop.test.mjs", "test/integration.test.mjs"],
                       js_client.dir, {"BROKER_EXAMPLES": examples_file, **brokers})
    assert "# fail 0" in output and "# skipped 0" in output, output[-3000:]


def test_under_bun(js_client, examples_file, brokers):
    try:
        bun = js_client.bun()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no Bun (npm install bun failed): {exc}")
    output = run_tests([bun, "test", "--timeout", "30000", "test/unit.test.mjs", "test/interop.test.mjs", "test/integration.test.mjs"],
                       js_client.dir, {"BROKER_EXAMPLES": examples_file, **brokers})
    assert re.search(r"^ 0 fail$", output, re.M) and not re.search(r"^ \d+ skip$", output, re.M), output[-3000:]
