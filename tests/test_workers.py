"""`broker serve --workers N`: the supervisor, its worker processes and their settings.

The processes are real: a supervisor started as `python -m broker serve --workers 2`, its
workers sharing one port with SO_REUSEPORT and joined through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import broker_cli, run

from broker import cli
from broker.client import Client, ConnectionClosed
from broker.cluster import supervisor
from broker.config import load
from broker.errors import ConfigError

SHUTDOWN_TIMEOUT_S = 3.0


# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return client._transport.underlying_transport.get_extra_info("sockname")[1]


async def round_trip(port: int, topic: str) -> None:
    """One connection that publishes and gets the ack: the port serves."""
    client = await connect(port)
    try:
        await client.publish_acked(topic, b"ping")
    finally:
        await client.close()


def serve_args(port: int, redis_url: str, prefix: str, *more: str) -> list[str]:
    return [
        "--workers", "2", "--port", str(port), "--redis-url", redis_url, "--redis-prefix", prefix,
        "--log-format", "json", "--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S), *more,
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
    proc = broker_cli("serve", "--workers", "2", "--port", "0", "--redis-url", "redis://127.0.0.1:1",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
    argv = ["serve", "--config", str(path), "--port=7401", "--reuse-port", "false", "--max-topics", "50"]
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
    assert not any(a.startswith(("--workers", "--work=", "--reuse-port")) for a in command)
    worker_args = cli._parser().parse_args(command[3:])
    worker_flags = {k: v for k, v in vars(worker_args).items() if k in cli.FIELDS}
    env = supervisor.worker_environ(1, environ)
    assert env[supervisor.WORKER_INDEX_ENV] == "1"
    worker = load(worker_flags, environ=env, config_file=worker_args.config)
    assert worker.workers == 1 and worker.reuse_port is True
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

        def worker_of(client: Client) -> int:
            (connect_,) = log.wait("connect", peer=f"127.0.0.1:{local_port(client)}")
            return connect_["worker"]

        async def main():
            subscribers: list[tuple[Client, object]] = []
            on: dict[int, int] = {0: 0, 1: 0}
            try:
                # SO_REUSEPORT spreads connections by their addresses: open some until both
                # workers hold at least two subscribers (8 are nearly always enough)
                while len(subscribers) < 8 or min(on.values()) < 2:
                    assert len(subscribers) < 40, f"connections landed on {on}"
                    client = await connect(port)
                    on[worker_of(client)] += 1
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
                    assert got == sent, f"subscriber {n} (worker {worker_of(client)})"
            finally:
                for client, _ in subscribers:
                    await client.close()

        run(main())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(SHUTDOWN_TIMEOUT_S + supervisor.KILL_GRACE_S + 5) == 0, log.text()
    finally:
        cleanup(proc, log)



@pytest.mark.parametrize("how", ["timeout", "second SIGTERM"])
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
        log.wait("supervisor_stopped", exit_code=1)
    finally:
        cleanup(proc, log)
