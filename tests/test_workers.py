"""`broker serve --workers N`: the supervisor, its worker processes and their settings.

The processes are real: a supervisor started as `python -m broker serve --workers 2`, its
workers sharing one port with SO_REUSEPORT and joined through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import cli
from broker.client import Client, ConnectionClosed
from broker.cluster import group_admin, supervisor
from broker.errors import ConfigError, SubscriptionEnded
from broker.server import admin
from broker.server.app import WorkerRole, worker_of_connection
from broker.settings import load
from conftest import ROOT, broker_cli, free_port, run

SHUTDOWN_TIMEOUT_S = 3.0


# helpers


class Log:
    """The stderr of a supervisor (its lines and its workers', all JSON), read by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def find(self, event: str, **fields) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def wait(self, event: str, count: int = 1, timeout: float = 15.0, **fields) -> list[dict]:
        """Wait until `event` with `fields` was logged `count` times; returns those lines."""
        deadline = time.monotonic() + timeout
        while len(found := self.find(event, **fields)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {event} {fields} within {timeout}s; stderr:\n{self.text()}")
            if self.proc.poll() is not None:
                self._thread.join(2)
                if len(found := self.find(event, **fields)) >= count:
                    return found
                raise AssertionError(f"the supervisor exited with {self.proc.returncode} before {event} {fields}; stderr:\n{self.text()}")
            time.sleep(0.02)
        return found


def start_supervisor(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, Log]:
    proc = broker_cli("serve", *args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, Log(proc)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cleanup(proc: subprocess.Popen, log: Log) -> None:
    """For a test that failed half way: end the supervisor and every worker it started."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for start in log.find("worker_start"):
        if alive(start["pid"]):
            os.kill(start["pid"], signal.SIGKILL)


def live_workers(log: Log) -> dict[int, int]:
    """index -> pid of the workers started and not seen exiting."""
    exited = {e["pid"] for e in log.find("worker_exit")}
    return {s["index"]: s["pid"] for s in log.find("worker_start") if s["pid"] not in exited}


async def connect(port: int, timeout: float = 10.0) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Client.connect(f"ws://127.0.0.1:{port}/", connect_timeout=1, reconnect=False)
        except ConnectionClosed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def local_port(client: Client) -> int:
    return client.get_extra_info("sockname")[1]


async def round_trip(port: int, topic: str) -> None:
    """One connection that publishes and gets the ack: the port serves."""
    client = await connect(port)
    try:
        await client.publish_acked(topic, b"ping")
    finally:
        await client.close()


def worker_of(log: Log, client: Client) -> int:
    """The worker holding `client`'s connection (from its connect log line)."""
    (connect_,) = log.wait("connect", peer=f"127.0.0.1:{local_port(client)}")
    return connect_["worker"]


async def admin_get(port: int, path: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status, await response.text()


async def admin_post(port: int, path: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            return response.status, await response.json()


def samples(text: str) -> dict:
    """{(sample name, labels as a sorted tuple): value} of a Prometheus text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_healthy(admin: int, proc: subprocess.Popen, timeout: float = 15.0) -> dict:
    """Poll the group's /healthz until it answers 200; returns its body."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the supervisor exited with {proc.returncode}"
        try:
            status, body = run(admin_get(admin, "/healthz"))
            if status == 200:
                return json.loads(body)
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the group did not become healthy"
        time.sleep(0.1)


def serve_args(port: int, redis_url: str, prefix: str, *more: str) -> list[str]:
    return [
        "--workers",
        "2",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--redis-prefix",
        prefix,
        "--log-format",
        "json",
        "--shutdown-timeout-s",
        str(SHUTDOWN_TIMEOUT_S),
        *more,
    ]


# settings


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_workers_without_redis_url_is_an_error_naming_it(source, tmp_path):
    args, env = ["--port", str(free_port())], {}
    if source == "flag":
        args += ["--workers", "2"]
    elif source == "env":
        env["BROKER_WORKERS"] = "2"
    else:
        path = tmp_path / "broker.toml"
        path.write_text("workers = 2\n")
        args += ["--config", str(path)]
    proc = broker_cli("serve", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert err.decode().startswith("broker: invalid setting: workers > 1 needs redis_url"), err
    assert b"supervisor_start" not in err


def test_workers_on_port_0_is_an_error_naming_port():
    proc = broker_cli(
        "serve", "--workers", "2", "--port", "0", "--redis-url", "redis://127.0.0.1:1", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert err.decode().startswith("broker: invalid setting: port: 0"), err
    assert "workers > 1" in err.decode()
    assert b"worker_start" not in err


@pytest.mark.parametrize("source", ["flag", "abbreviated flag", "env", "file"])
def test_a_worker_is_one_process_listening_with_reuse_port(source, tmp_path):
    """Whether workers came from a flag, the environment or the file, a worker's command line
    and environment make it a single server with reuse_port, with the supervisor's other
    settings (flags > env > file, as for any setting)."""
    path = tmp_path / "broker.toml"
    workers = "workers = 3\n" if source == "file" else ""
    path.write_text(f'port = 7400\nreuse_port = false\n{workers}[redis]\nurl = "redis://file:6379"\n')
    argv = ["serve", "--config", str(path), "--port=7401", "--reuse-port", "false", "--max-topics", "50", "--admin-port", "7402"]
    environ = {"BROKER_LOG_LEVEL": "warning"}
    if source == "flag":
        argv += ["--workers", "3"]
    elif source == "abbreviated flag":
        argv += ["--work=3"]
    elif source == "env":
        environ["BROKER_WORKERS"] = "3"
    args = cli._parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in cli.FIELDS}
    own = load(flags, environ=environ, config_file=args.config)
    assert (own.workers, own.port, own.redis_url, own.max_topics) == (3, 7401, "redis://file:6379", 50)

    command = supervisor.worker_command(flags, args.config)
    assert command[1:4] == ["-m", "broker", "serve"]
    assert not any(a.startswith(("--workers", "--work=", "--reuse-port", "--admin-port")) for a in command)
    worker_args = cli._parser().parse_args(command[3:])
    worker_flags = {k: v for k, v in vars(worker_args).items() if k in cli.FIELDS}
    env = supervisor.worker_environ(1, "/tmp/w1.sock", environ)
    assert env[supervisor.WORKER_INDEX_ENV] == "1"
    assert supervisor.role_from_environ(env) == WorkerRole(1, "/tmp/w1.sock")
    worker = load(worker_flags, environ=env, config_file=worker_args.config)
    assert worker.workers == 1 and worker.reuse_port is True
    assert worker.admin_port == 0  # the supervisor serves it
    assert (worker.port, worker.redis_url, worker.max_topics, worker.log_level) == (7401, "redis://file:6379", 50, "warning")


def test_restart_backoff_doubles_up_to_10s_and_resets_after_30s_of_running():
    now = [100.0]
    config = load({"workers": 2, "redis_url": "redis://127.0.0.1:1", "port": 7402}, environ={})
    sup = supervisor.Supervisor(config, ["true"], environ={}, clock=lambda: now[0])
    worker = sup.workers[0]
    delays = []
    for _ in range(7):
        delays.append(sup._schedule_restart(worker, ran=0.2))
        assert worker.restart_at == now[0] + delays[-1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert sup._schedule_restart(worker, ran=supervisor.STABLE_S) == 0.5
    assert worker.restart_at == now[0] + 0.5
    assert sup._schedule_restart(worker, ran=1.0) == 1.0
    with pytest.raises(ConfigError, match="port"):
        supervisor.Supervisor(load({"workers": 2, "redis_url": "redis://127.0.0.1:1", "port": 0}, environ={}), ["true"])


# processes


@pytest.mark.slow
def test_supervisor_restarts_a_killed_worker_and_stops_them_all(redis_url, redis_prefix):
    port = free_port()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix))
    try:
        log.wait("worker_start", index=1)
        # a reload passed on while the workers start (before their server handles SIGHUP)
        # does not end them
        os.kill(proc.pid, signal.SIGHUP)
        log.wait("supervisor_reload", workers=2)
        log.wait("start", worker=0)
        log.wait("start", worker=1)
        run(round_trip(port, "t.a"))
        first = live_workers(log)
        assert sorted(first) == [0, 1] and proc.pid not in first.values()
        assert not log.find("worker_exit")

        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        (exit_,) = log.wait("worker_exit", pid=victim)
        assert exit_["signal"] == "SIGKILL" and exit_["restart_in_s"] == 0.5
        log.wait("worker_start", index=0, count=2)
        log.wait("start", worker=0, count=2)
        second = live_workers(log)
        assert second[0] != victim and second[1] == first[1]
        assert not alive(victim)

        async def serves():  # every connection is answered, whichever worker gets it
            for i in range(8):
                await round_trip(port, f"t.{i}")

        run(serves())

        os.kill(proc.pid, signal.SIGHUP)  # passed on: each worker reloads
        log.wait("reload", worker=0)
        log.wait("reload", worker=1)

        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
        took = time.monotonic() - started
        assert took < SHUTDOWN_TIMEOUT_S, f"shutdown took {took:.2f}s"
        log.wait("supervisor_stopped", exit_code=0)
        for pid in second.values():
            assert not alive(pid)
        assert len(log.find("worker_exit", code=0)) == 2
        assert not log.find("worker_kill")
    finally:
        cleanup(proc, log)


def test_a_configuration_error_in_a_worker_stops_the_supervisor_with_2(redis_url, redis_prefix, tmp_path):
    port = free_port()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix, "--auth-jwks-file", str(tmp_path / "missing.json")))
    try:
        assert proc.wait(15) == 2, log.text()
        log.wait("supervisor_stopped", exit_code=2)
        assert "auth_jwks_file" in log.text()
        assert len(log.find("worker_start")) == 2  # not started again
    finally:
        cleanup(proc, log)


def test_a_message_reaches_subscribers_on_every_worker(redis_url, redis_prefix):
    port = free_port()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix))
    try:
        log.wait("start", worker=0)
        log.wait("start", worker=1)

        async def main():
            subscribers: list[tuple[Client, object]] = []
            on: dict[int, int] = {0: 0, 1: 0}
            try:
                # SO_REUSEPORT spreads connections by their addresses: open some until both
                # workers hold at least two subscribers (8 are nearly always enough)
                while len(subscribers) < 8 or min(on.values()) < 2:
                    assert len(subscribers) < 40, f"connections landed on {on}"
                    client = await connect(port)
                    on[worker_of(log, client)] += 1
                    subscribers.append((client, await client.subscribe("md.>")))
                publisher = await connect(port)
                try:
                    acks = [await publisher.publish_acked(f"md.{i % 3}", b"%d" % i) for i in range(20)]
                finally:
                    await publisher.close()
                assert [a.seq for a in acks[:3]] == [1, 1, 1]
                sent = {f"md.{t}": [(i // 3 + 1, b"%d" % i) for i in range(t, 20, 3)] for t in range(3)}
                for n, (client, sub) in enumerate(subscribers):
                    got: dict[str, list] = {topic: [] for topic in sent}
                    for _ in range(20):  # in order per topic (topics are not ordered among themselves)
                        message = await sub.next(10)
                        got[message.topic].append((message.seq, message.data))
                    assert got == sent, f"subscriber {n} (worker {worker_of(log, client)})"
            finally:
                for client, _ in subscribers:
                    await client.close()

        run(main())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
    finally:
        cleanup(proc, log)


@pytest.mark.parametrize("how", ["timeout", "second SIGTERM"])
@pytest.mark.slow
def test_a_worker_that_does_not_stop_is_killed_and_the_exit_code_is_1(redis_url, redis_prefix, how):
    port = free_port()
    args = serve_args(port, redis_url, redis_prefix)
    args[args.index("--shutdown-timeout-s") + 1] = "0.5"
    proc, log = start_supervisor(*args)
    try:
        log.wait("start", worker=0)
        log.wait("start", worker=1)
        workers = live_workers(log)
        os.kill(workers[0], signal.SIGSTOP)  # it cannot handle SIGTERM
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        log.wait("worker_exit", index=1, code=0)
        if how == "second SIGTERM":
            os.kill(proc.pid, signal.SIGTERM)  # do not wait
        assert proc.wait(15) == 1, log.text()
        took = time.monotonic() - started
        (kill,) = log.find("worker_kill")
        assert kill["pid"] == workers[0]
        assert not alive(workers[0])
        if how == "timeout":
            assert 0.5 + supervisor.KILL_GRACE_S <= took < 0.5 + supervisor.KILL_GRACE_S + 3
        else:
            assert took < 3
            (again,) = log.find("supervisor_signal_again")
            assert again["signal"] == "SIGTERM" and again["workers"] == 1
        log.wait("supervisor_stopped", exit_code=1)
    finally:
        cleanup(proc, log)


# one admin port for the group


KEY = "group-admin-key"


def documented_worker_metrics() -> set[str]:
    """The metrics docs/operations.md lists for the supervisor's admin port."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Worker processes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(broker_[a-z_]+)`", section, re.M))


@pytest.mark.slow
def test_one_admin_port_serves_the_whole_group(redis_url, redis_prefix):
    """--workers 2 with --admin-port: the supervisor serves it, with every worker's metrics
    labelled by worker, health and readiness of both, and an API over the whole group."""
    port, admin = free_port(), free_port()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix, "--admin-port", str(admin), "--admin-api-key", KEY))
    try:
        (start,) = log.wait("supervisor_start")
        assert start["admin"] == f"127.0.0.1:{admin}"
        assert wait_healthy(admin, proc) == {"status": "ok", "workers": {"0": "ok", "1": "ok"}}
        for index in (0, 1):  # each worker's own admin server is its Unix socket
            assert log.wait("start", worker=index)[0]["admin"].startswith("unix:")
        assert not log.find("stopped")  # no worker lost a fight over the admin port

        async def main():
            clients: list[tuple[Client, object]] = []
            on: dict[int, list[Client]] = {0: [], 1: []}
            try:
                while min(len(c) for c in on.values()) < 1 or len(clients) < 4:
                    assert len(clients) < 40, f"connections landed on {on}"
                    client = await connect(port)
                    on[worker_of(log, client)].append(client)
                    clients.append((client, await client.subscribe("ga.>")))
                count = len(clients)

                status, text = await admin_get(admin, "/metrics", KEY)
                assert status == 200
                m = samples(text)
                for index in (0, 1):
                    assert m[("broker_connections", (("worker", str(index)),))] == len(on[index])
                    assert m[("broker_worker_up", (("worker", str(index)),))] == 1
                    assert m[("broker_worker_starts_total", (("worker", str(index)),))] == 1
                    assert ("broker_backplane_connected", (("worker", str(index)),)) in m
                assert not any(("worker", "2") in labels for _, labels in m)
                families = {family.name for family in text_string_to_metric_families(text)}
                assert {"broker_worker_up", "broker_worker_starts"} == documented_worker_metrics()
                assert documented_worker_metrics() <= families

                status, text = await admin_get(admin, "/readyz")
                body = json.loads(text)
                assert status == 200 and body["ready"] is True and set(body["workers"]) == {"0", "1"}
                assert all(worker["ready"] and worker["backplane"] for worker in body["workers"].values())

                status, text = await admin_get(admin, "/api/connections", KEY)
                body = json.loads(text)
                assert status == 200 and body["total"] == count and body["missing_workers"] == []
                rows = body["connections"]
                assert len({row["id"] for row in rows}) == count  # one id names one connection in the group
                assert {row["worker"] for row in rows} == {0, 1}
                assert all(worker_of_connection(row["id"]) == row["worker"] for row in rows)
                assert all(row["subscriptions"] == ["ga.>"] for row in rows)
                status, text = await admin_get(admin, "/api/stats", KEY)
                stats = json.loads(text)
                assert stats["connections"] == count and stats["backplane"] == "redis"
                assert (await admin_get(admin, "/api/stats"))[0] == 401  # the key is wanted, as on one process

                status, body = await admin_post(admin, "/api/publish", KEY, {"messages": [{"topic": "ga.t", "text": "to all"}]})
                assert status == 200 and body["results"][0]["seq"] == 1
                for n, (_client, sub) in enumerate(clients):  # every subscriber, on either worker
                    message = await sub.next(10)
                    assert (message.topic, message.seq, message.data) == ("ga.t", 1, b"to all"), n
                status, text = await admin_get(admin, "/api/topics", KEY)
                (topic,) = json.loads(text)["topics"]
                assert (topic["topic"], topic["seq"], topic["subscribers"]) == ("ga.t", 1, count)

                victim = on[1][0]  # closed by the worker that holds it
                victim_id = next(row["id"] for row in rows if row["worker"] == 1 and row["peer"].endswith(f":{local_port(victim)}"))
                status, body = await admin_post(admin, f"/api/connections/{victim_id}/close", KEY)
                assert status == 200 and body == {"closed": victim_id}
                assert await asyncio.wait_for(victim.wait_closed(), 5) == (1008, "closed by an operator")
                status, body = await admin_post(admin, f"/api/connections/{(5 << 40) + 1}/close", KEY)
                assert status == 404

                # the dashboard: its page, and its events summed over both workers
                assert (await admin_get(admin, "/dashboard/"))[0] == 200
                async with aiohttp.ClientSession() as session:
                    async with session.get(
                        f"http://127.0.0.1:{admin}/dashboard/events", headers={"Authorization": f"Bearer {KEY}"}
                    ) as response:
                        deadline = time.monotonic() + 10
                        async for line in response.content:
                            if line.startswith(b"data: ") and json.loads(line[6:])["connections"] == count - 1:
                                break
                            assert time.monotonic() < deadline, "no dashboard event with every connection"
            finally:
                for client, _ in clients:
                    await client.close()

        run(main())
        with open(f"/proc/{proc.pid}/status") as fh:  # the preexec function of its forks needs one thread
            assert "Threads:\t1\n" in fh.read()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
    finally:
        cleanup(proc, log)


def test_a_revocation_through_the_group_admin_port_reaches_every_worker_once(redis_url, redis_prefix, tmp_path):
    """POST /api/revocations on the supervisor's admin port: every worker closes the covered
    connections (4003), the answer sums them, and the denylist file holds the rule once."""
    import jwt

    secret = "a-secret-of-32-bytes-or-more-for-tests"
    denylist = tmp_path / "denylist"
    denylist.write_text("")
    port, admin = free_port(), free_port()
    proc, log = start_supervisor(
        *serve_args(
            port,
            redis_url,
            redis_prefix,
            "--admin-port",
            str(admin),
            "--admin-api-key",
            KEY,
            "--auth-jwt-secret",
            secret,
            "--auth-denylist-file",
            str(denylist),
        )
    )
    try:
        wait_healthy(admin, proc)

        async def main():
            token = jwt.encode(
                {"sub": "mallory", "exp": int(time.time()) + 600, "subscribe": [">"], "publish": [">"]}, secret, algorithm="HS256"
            )
            clients: list[Client] = []
            on: dict[int, int] = {0: 0, 1: 0}
            try:
                subs = []
                while min(on.values()) < 1:
                    assert len(clients) < 40, f"connections landed on {on}"
                    client = await Client.connect(f"ws://127.0.0.1:{port}/", token=token, reconnect=False)
                    clients.append(client)
                    subs.append(await client.subscribe("gr.>"))
                    on[worker_of(log, client)] += 1
                # an operator's action on a user reaches its connections on every worker, and
                # each worker logs it with the address the supervisor got it from
                status, body = await admin_post(admin, "/api/users/mallory/unsubscribe", KEY, {"subscription": "gr.>"})
                assert (status, body) == (200, {"user": "mallory", "subscription": "gr.>", "connections": len(clients)}), body
                for sub in subs:
                    with pytest.raises(SubscriptionEnded):
                        await sub.next(5)
                actions = log.wait("operator_action", count=2)
                assert {a["worker"] for a in actions} == {0, 1} and {a["operator"] for a in actions} == {"127.0.0.1"}
                assert (await admin_post(admin, "/api/users/mallory/unsubscribe", KEY, {"subscription": "a..b"}))[0] == 400
                status, body = await admin_post(admin, "/api/revocations", KEY, {"user": "mallory"})
                assert status == 200 and body["closed"] == len(clients) and body["rule"] == "user:mallory", body
                for client in clients:
                    assert (await asyncio.wait_for(client.wait_closed(), 5))[0] == 4003
                assert [line for line in denylist.read_text().splitlines() if line.strip()] == ["user:mallory"]
            finally:
                for client in clients:
                    await client.close()

        run(main())
    finally:
        cleanup(proc, log)


@pytest.mark.slow
def test_a_hung_worker_is_killed_and_started_again(redis_url, redis_prefix):
    hang_timeout_s = 2.0
    port, admin = free_port(), free_port()
    args = serve_args(
        port, redis_url, redis_prefix, "--admin-port", str(admin), "--admin-api-key", KEY, "--hang-timeout-s", str(hang_timeout_s)
    )
    proc, log = start_supervisor(*args)
    try:
        wait_healthy(admin, proc)
        log.wait("worker_up", index=0)  # the supervisor's own probes got an answer (not only /healthz)
        log.wait("worker_up", index=1)
        hung = live_workers(log)[0]
        os.kill(hung, signal.SIGSTOP)  # alive, holding its share of the port, answering nothing
        stopped = time.time()
        status, text = run(admin_get(admin, "/healthz"))
        assert status == 503 and json.loads(text)["workers"] == {"0": "no answer", "1": "ok"}
        (event,) = log.wait("worker_hung", index=0, timeout=hang_timeout_s + 5)
        # killed hang_timeout_s after the probe that followed its last answer (at most a
        # probe interval before the SIGSTOP), seen within a check interval (and 1 s of slack
        # for a loaded machine)
        took = event["ts"] - stopped
        bound = hang_timeout_s + supervisor.PROBE_INTERVAL_S + supervisor.CHECK_INTERVAL_S
        assert hang_timeout_s - 0.2 <= took <= bound + 1, f"detected after {took:.2f}s"
        assert event["pid"] == hung and event["reason"] == f"a health probe unanswered for {hang_timeout_s:g} s (hang_timeout_s)"
        (exit_,) = log.wait("worker_exit", pid=hung)
        assert exit_["signal"] == "SIGKILL" and exit_["reason"].startswith("hung: ") and exit_["restart_in_s"] == 0.5
        log.wait("worker_up", index=0, count=2)
        assert not alive(hung)
        assert wait_healthy(admin, proc)["workers"] == {"0": "ok", "1": "ok"}
        m = samples(run(admin_get(admin, "/metrics", KEY))[1])
        assert m[("broker_worker_starts_total", (("worker", "0"),))] == 2

        async def serves():  # every new connection is answered again, whichever worker gets it
            for i in range(8):
                await round_trip(port, f"h.{i}")

        run(serves())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
    finally:
        cleanup(proc, log)


@pytest.mark.slow
def test_a_worker_that_cannot_start_says_why_and_is_started_again(redis_url, redis_prefix):
    """The port is held by another program: each worker exits 1 saying so, the group's health
    says they are not running, and they are started again (with backoff) until they can."""
    port, admin = free_port(), free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix, "--admin-port", str(admin)))
    try:
        for index in (0, 1):
            exit_ = log.wait("worker_exit", index=index)[0]
            assert exit_["code"] == 1 and exit_["started"] is False and exit_["restart_in_s"] == 0.5
        # each worker logs JSON here (log_format json): its fatal line is JSON too
        log.wait("fatal", error=f"cannot listen on 127.0.0.1:{port}: Address already in use", exit_code=1)
        status, text = run(admin_get(admin, "/healthz"))
        assert status == 503 and set(json.loads(text)["workers"].values()) <= {"not running", "no answer"}
        log.wait("worker_exit", index=0, count=2)  # started again
        blocker.close()
        assert wait_healthy(admin, proc)["workers"] == {"0": "ok", "1": "ok"}
        run(round_trip(port, "s.t"))
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
    finally:
        blocker.close()
        cleanup(proc, log)


def test_the_admin_port_in_use_stops_the_supervisor_before_any_worker_starts(redis_url, redis_prefix):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        proc, log = start_supervisor(*serve_args(free_port(), redis_url, redis_prefix, "--admin-port", str(admin)))
        try:
            assert proc.wait(15) == 1
            log._thread.join(5)
            # the supervisor logs JSON here (log_format json): its fatal line is JSON too
            (fatal,) = log.find("fatal")
            assert (
                fatal["error"] == f"cannot listen on the admin port 127.0.0.1:{admin}: Address already in use" and fatal["exit_code"] == 1
            )
            assert "Traceback" not in log.text() and not log.find("worker_start")
        finally:
            cleanup(proc, log)


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False

    def kill(self) -> None:
        self.killed = True


def test_hang_bounds_at_start_and_after_the_first_answer():
    """A worker that never answered is hung redis_timeout_s + hang_timeout_s after its start;
    one that answered, when the probe sent a second after its last answer is hang_timeout_s
    late."""
    now = [100.0]
    config = load({"workers": 2, "redis_url": "redis://127.0.0.1:1", "port": 7403, "redis_timeout_s": 3, "hang_timeout_s": 2}, environ={})
    sup = supervisor.Supervisor(config, ["true"], environ={}, clock=lambda: now[0])
    starting, running = sup.workers
    starting.proc, starting.started = FakeProcess(11), 100.0
    running.proc, running.started, running.answered = FakeProcess(12), 100.0, 101.0
    now[0] = 104.0  # the probe after its last answer went out at 102.0
    sup._kill_hung()
    assert not starting.proc.killed and not running.proc.killed
    now[0] = 104.1
    sup._kill_hung()
    assert running.proc.killed and running.hung == "a health probe unanswered for 2 s (hang_timeout_s)"
    now[0] = 105.0
    sup._kill_hung()
    assert not starting.proc.killed
    now[0] = 105.1
    sup._kill_hung()
    assert starting.proc.killed and starting.hung == "no answer within 5 s of its start (redis_timeout_s + hang_timeout_s)"


# combining the workers' answers


def test_metrics_of_the_workers_are_labelled_and_kept_in_one_family_each():
    text = {
        0: "# HELP broker_connections open\n# TYPE broker_connections gauge\nbroker_connections 3.0\n"
        '# HELP broker_errors_total errs\n# TYPE broker_errors_total counter\nbroker_errors_total{code="3"} 1.0\n'
        '# HELP broker_queue_bytes q\n# TYPE broker_queue_bytes histogram\nbroker_queue_bytes_bucket{le="0.0"} 1.0\n'
        'broker_queue_bytes_bucket{le="+Inf"} 3.0\nbroker_queue_bytes_count 3.0\nbroker_queue_bytes_sum 10.0\n',
        1: "# HELP broker_connections open\n# TYPE broker_connections gauge\nbroker_connections 4.0\n",
    }
    families = group_admin.relabel(text)
    assert [f.name for f in families] == ["broker_connections", "broker_errors", "broker_queue_bytes"]
    got = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in families for sample in family.samples}
    assert got[("broker_connections", (("worker", "0"),))] == 3 and got[("broker_connections", (("worker", "1"),))] == 4
    assert got[("broker_errors_total", (("code", "3"), ("worker", "0")))] == 1
    assert got[("broker_queue_bytes_bucket", (("le", "+Inf"), ("worker", "0")))] == 3


def test_stats_topics_connections_and_dashboard_events_of_the_group():
    stats = [
        {"connections": 2, "topics": 5, "published": 10, "errors": {"3": 1}, "backplane": "redis"},
        {"connections": 3, "topics": 4, "published": 1, "errors": {"3": 2, "7": 1}, "backplane": "redis"},
    ]
    assert group_admin.merge_stats(stats) == {
        "connections": 5,
        "topics": 5,
        "published": 11,
        "errors": {"3": 3, "7": 1},
        "backplane": "redis",
    }
    topics = [
        {
            "topics": [{"topic": "a", "epoch": 1, "seq": 9, "subscribers": 1}, {"topic": "b", "epoch": 1, "seq": 2, "subscribers": 0}],
            "total": 2,
        },
        {
            "topics": [{"topic": "a", "epoch": 1, "seq": 10, "subscribers": 2}, {"topic": "c", "epoch": 1, "seq": 5, "subscribers": 1}],
            "total": 3,
        },
    ]
    assert group_admin.merge_topics(topics, 2) == {
        "topics": [{"topic": "a", "epoch": 1, "seq": 10, "subscribers": 3}, {"topic": "c", "epoch": 1, "seq": 5, "subscribers": 1}],
        "total": 3,
    }
    connections = {
        0: {"connections": [{"id": 1, "queue_bytes": 5}], "total": 1},
        1: {"connections": [{"id": (1 << 40) + 1, "queue_bytes": 9}, {"id": (1 << 40) + 2, "queue_bytes": 0}], "total": 2},
    }
    by_id = admin.ConnectionQuery("id", "asc", 0, 2, None, None, None, None)
    assert group_admin.merge_connections(connections, by_id) == {
        "connections": [{"id": 1, "queue_bytes": 5, "worker": 0}, {"id": (1 << 40) + 1, "queue_bytes": 9, "worker": 1}],
        "total": 3,
        "offset": 0,
        "limit": 2,
    }
    # the workers' rows in one order: the page is cut from all of them
    second_by_pending = admin.ConnectionQuery("pending", "desc", 1, 1, None, None, None, None)
    assert group_admin.merge_connections(connections, second_by_pending)["connections"] == [{"id": 1, "queue_bytes": 5, "worker": 0}]
    snapshot = {
        "connections": 1,
        "published": 5,
        "delivered": 7,
        "topics": 3,
        "slow_consumers": 0,
        "pending_bytes": 10,
        "backplane_lag_ms": 2,
        "loop_lag_s": 0.01,
    }
    merged = group_admin.merge_snapshots(
        [
            {**snapshot, "hot": [{"topic": "a", "rate": 5, "seq": 50}]},
            {**snapshot, "backplane_lag_ms": 9, "hot": [{"topic": "a", "rate": 6, "seq": 51}, {"topic": "b", "rate": 1, "seq": 1}]},
        ]
    )
    assert (
        merged["connections"],
        merged["published"],
        merged["delivered"],
        merged["topics"],
        merged["pending_bytes"],
        merged["backplane_lag_ms"],
    ) == (2, 10, 14, 3, 20, 9)
    assert merged["hot"] == [{"topic": "a", "rate": 6, "seq": 51}, {"topic": "b", "rate": 1, "seq": 1}]
    assert group_admin.merge_snapshots([])["backplane_lag_ms"] is None


def test_a_temporary_directory_too_long_for_the_workers_sockets_is_refused_naming_it(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    proc = broker_cli(
        "serve",
        "--workers",
        "2",
        "--port",
        str(free_port()),
        "--redis-url",
        "redis://127.0.0.1:1",
        env={"TMPDIR": str(deep)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert err.decode().startswith("broker: the workers' admin sockets (") and "set TMPDIR to a shorter directory" in err.decode()
    assert b"worker_start" not in err and list(deep.iterdir()) == []


def test_lame_duck_mode_is_passed_on_to_every_worker_and_none_is_started_again(redis_url, redis_prefix):
    """SIGUSR2 to the supervisor: each worker moves its clients away (4010) and exits; the
    supervisor starts none again and exits 0 once they all did."""
    port = free_port()
    proc, log = start_supervisor(*serve_args(port, redis_url, redis_prefix, "--lame-duck-grace-s", "0", "--lame-duck-duration-s", "0.5"))
    try:
        log.wait("start", worker=0)
        log.wait("start", worker=1)

        async def main():
            client = await connect(port)
            os.kill(proc.pid, signal.SIGUSR2)
            assert await asyncio.wait_for(client.wait_closed(), 10) == (4010, "lame duck: reconnect to another node")

        run(main())
        assert proc.wait(15) == 0, log.text()
        exits = log.wait("worker_exit", count=2)
        assert {e["index"] for e in exits} == {0, 1} and all(e["code"] == 0 and e["reason"] == "lame duck" for e in exits)
        assert len(log.find("worker_start")) == 2 and log.find("supervisor_lame_duck")
        assert len(log.find("lame_duck")) == 2  # each worker's own line
    finally:
        cleanup(proc, log)
