"""`broker health`: the check a container runs against the admin server."""

from __future__ import annotations

import subprocess
import time

from conftest import broker_cli, free_ports


def health(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = broker_cli("health", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_health_answers_from_the_admin_port_the_settings_name():
    port, admin = free_ports(2)
    env = {"BROKER_PORT": str(port), "BROKER_ADMIN_PORT": str(admin), "BROKER_ADMIN_HOST": "0.0.0.0"}
    server = broker_cli("serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while (done := health(env=env)).returncode != 0:
            assert server.poll() is None, "the broker exited"
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.1)
        assert f"http://127.0.0.1:{admin}/healthz: 200" in done.stdout
        ready = health("--ready", env=env)
        assert ready.returncode == 0 and "/readyz: 200" in ready.stdout and '"ready": true' in ready.stdout
        assert health("--url", f"http://127.0.0.1:{admin}/").returncode == 0
    finally:
        server.terminate()
        server.wait(10)
    # nothing answers any more
    gone = health(env=env)
    assert gone.returncode == 1 and "no answer" in gone.stderr


def test_health_says_what_is_wrong_with_its_settings():
    off = health()
    assert off.returncode == 2 and "admin_port is 0" in off.stderr
    bad = health("--url", "ws://127.0.0.1:1")
    assert bad.returncode == 2 and "must start with http://" in bad.stderr
    (port,) = free_ports()
    nothing = health("--url", f"http://127.0.0.1:{port}", "--timeout", "1")
    assert nothing.returncode == 1 and "no answer" in nothing.stderr
