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
    pytest.mark.skipif(
        os.environ.get("BROKER_PURE_PYTHON") == "1", reason="the brokers run compiled in their own processes: covered by the compiled run"
    ),
    pytest.mark.slow,
]

from test_fallback_doc import sse_examples
from test_protocol_doc import EXAMPLES

from redis_support import BrokerNode

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
    events = [
        {"name": name, "event": "\n".join(f"{k}: {v}" for k, v in fields.items()), "value": normal(value)}
        for name, (fields, value) in sse_examples().items()
    ]
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
    output = run_tests(
        [js_client.node, "--test", "--test-concurrency=1", "test/unit.test.mjs", "test/interop.test.mjs", "test/integration.test.mjs"],
        js_client.dir,
        {"BROKER_EXAMPLES": examples_file, **brokers},
    )
    assert "# fail 0" in output and "# skipped 0" in output, output[-3000:]


def test_under_bun(js_client, examples_file, brokers):
    try:
        bun = js_client.bun()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no Bun (npm install bun failed): {exc}")
    output = run_tests(
        [bun, "test", "--timeout", "30000", "test/unit.test.mjs", "test/interop.test.mjs", "test/integration.test.mjs"],
        js_client.dir,
        {"BROKER_EXAMPLES": examples_file, **brokers},
    )
    assert re.search(r"^ 0 fail$", output, re.M) and not re.search(r"^ \d+ skip$", output, re.M), output[-3000:]


@pytest.mark.parametrize("transport", ["websocket", "fallback"])
def test_operator_actions_reach_the_client(js_client, tmp_path, transport):
    """The client names itself (the admin API shows `broker-js/VERSION`), an operator's
    unsubscribe of its user ends its subscription (`onEnd`), and a node in lame-duck mode
    (close 4010) is left at once for the next URL: clients/js/test/operations.test.mjs, driven
    step by step from here."""
    import signal
    import time
    import urllib.request

    import jwt

    key = "ops-admin-key"
    token = jwt.encode({"sub": "ana", "exp": int(time.time()) + 600, "subscribe": [">"], "publish": [">"]}, SECRET, algorithm="HS256")
    from conftest import free_port

    admin = free_port()
    common = ("--auth-jwt-secret", SECRET)
    with (
        BrokerNode(
            *common, "--admin-port", str(admin), "--admin-api-key", key, "--lame-duck-grace-s", "0", "--lame-duck-duration-s", "0.2"
        ) as a,
        BrokerNode(*common) as b,
    ):
        env = {**os.environ, "BROKER_OPS_URLS": f"{a.url},{b.url}", "BROKER_OPS_TOKEN": token, "BROKER_OPS_TRANSPORT": transport}
        proc = subprocess.Popen(
            [js_client.node, "--test-reporter=tap", "test/operations.test.mjs"],
            cwd=js_client.dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def hear(expected: str) -> str:
            while True:
                line = proc.stdout.readline()
                assert line, f"the client script ended before {expected!r}"
                if line.strip().startswith(expected):
                    return line.strip()

        def admin_call(method: str, path: str, body: dict | None = None) -> dict:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=data, method=method, headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)

        try:
            hear("subscribed")
            (row,) = admin_call("GET", "/api/connections?user=ana")["connections"]
            assert row["client"] == "broker-js/0.1.0", row
            assert admin_call("POST", "/api/users/ana/unsubscribe", {"subscription": "ops.t"})["connections"] == 1
            proc.stdin.write("unsubscribed\n")
            proc.stdin.flush()
            hear("ended")
            a.proc.send_signal(signal.SIGUSR2)
            proc.stdin.write("lame duck\n")
            proc.stdin.flush()
            moved = hear("moved in")
            output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "# fail 0" in output, output[-3000:]
            assert int(moved.split()[2]) < 3000, moved  # at once, not after its 5 s backoff
        finally:
            if proc.poll() is None:
                proc.kill()
