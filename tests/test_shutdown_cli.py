"""The broker as a process: graceful shutdown on SIGTERM/SIGINT, the command line, settings."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from broker import __version__
from broker.client import Client, ConnectionClosed
from broker.cluster.streams import without_password
from broker.errors import ListenError
from broker.messages import SUBPROTOCOL, Ack, ServerReader, Sub
from broker.server import Server
from broker.settings import load
from conftest import (
    ROOT,
    RawSocketClient,
    broker_cli,
    connect_when_ready,
    conns_with,
    eventually,
    free_ports,
    read_until,
    run,
    run_cli,
    send_upgrade,
    serve,
    serving,
    split_frame,
    stop_process,
    upgrade_request,
    url,
)

# helpers


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    await eventually(lambda: proc.poll() is not None, timeout, "the broker to exit after the signal")
    return proc.returncode


def events(log: str) -> list[str]:
    return [word[len("event=") :] for line in log.splitlines() for word in line.split() if word.startswith("event=")]


# graceful shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_clients_with_1001_and_exits_0(sig):
    (port,) = free_ports()
    bound = 3.0
    proc = serve("--port", str(port), "--shutdown-timeout-s", str(bound))
    try:

        async def main():
            client = await connect_when_ready(proc, port)
            sub = await client.subscribe("t")
            await client.publish_acked("t", b"before")
            assert (await sub.next(5)).data == b"before"
            proc.send_signal(sig)
            started = time.monotonic()
            code, reason = await asyncio.wait_for(client.wait_closed(), 5)
            assert (code, reason) == (1001, "server shutting down")
            assert await wait_exit(proc, bound + 2) == 0
            assert time.monotonic() - started < bound
            with pytest.raises(ConnectionClosed) as info:
                await sub.next(1)
            assert info.value.code == 1001
            with pytest.raises(ConnectionClosed):
                await client.publish_acked("t", b"after")

        run(main())
        log = proc.stderr.read().decode()
        assert f"port={port}" in log
        names = events(log)
        assert names[0] == "start" and names[-1] == "stopped"
        assert names.index("start") < names.index("stopping") < names.index("stopped")
        assert "connections=1" in next(line for line in log.splitlines() if "event=stopping" in line)
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_sigterm_right_after_the_start_line_is_graceful():
    """Once `event=start` is logged the broker is up, so SIGTERM from then on must shut it down
    gracefully (exit 0, `event=stopped`). The broker and this test share one CPU and the broker
    runs at low priority, so the test's reaction to the line tends to land right after it."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)

    def on_one_cpu_at_low_priority() -> None:
        os.sched_setaffinity(0, {cpu})
        os.nice(19)

    results = []
    os.sched_setaffinity(0, {cpu})
    try:
        for _ in range(10):
            proc = broker_cli(
                "serve",
                "--port",
                "0",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=on_one_cpu_at_low_priority,
            )
            try:
                log = read_until(proc, "event=start")
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(10)
                log += proc.stderr.read().decode()
                results.append((code, "event=stopped" in log))
            finally:
                stop_process(proc)
    finally:
        os.sched_setaffinity(0, saved)
    assert results == [(0, True)] * 10, f"exit codes after SIGTERM: {[code for code, _ in results]}"


def test_shutdown_is_bounded_when_a_client_never_answers():
    (port,) = free_ports()
    proc = serve("--port", str(port), "--shutdown-timeout-s", "1", "--close-timeout-s", "30")
    try:

        async def main():
            ready = await connect_when_ready(proc, port)
            await ready.close()
            deaf = await RawSocketClient.connect(port, rcvbuf=4096)  # never reads again
            try:
                await deaf.send(Sub(1, "t"))
                assert await deaf.recv() == Ack(1)
                async with Client(f"ws://127.0.0.1:{port}/") as pub:
                    for _ in range(64):  # fill the deaf client's buffers
                        await pub.publish_acked("t", bytes(64 << 10))
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                assert await wait_exit(proc, 5) == 0
                assert time.monotonic() - started < 3
            finally:
                deaf.close()

        run(main())
        names = events(proc.stderr.read().decode())
        assert names.index("stopping") < names.index("shutdown_timeout") < names.index("stopped")
    finally:
        stop_process(proc)


def test_a_second_sigterm_during_the_drain_aborts_the_clients_and_says_what_is_lost():
    """The drain waits for a client that never reads (up to shutdown_timeout_s, 30 s here); a
    second SIGTERM cuts it short: one `shutdown_forced` line with the connections aborted and
    the bytes queued for them, then `stopped` and exit 0, not a silent death by the signal."""
    (port,) = free_ports()
    proc = serve("--port", str(port), "--shutdown-timeout-s", "30", "--close-timeout-s", "30")
    try:

        async def main():
            ready = await connect_when_ready(proc, port)
            await ready.close()
            deaf = await RawSocketClient.connect(port, rcvbuf=4096)  # never reads again
            try:
                await deaf.send(Sub(1, "t"))
                assert await deaf.recv() == Ack(1)
                async with Client(f"ws://127.0.0.1:{port}/") as pub:
                    for _ in range(64):  # fill the deaf client's buffers
                        await pub.publish_acked("t", bytes(64 << 10))
                proc.send_signal(signal.SIGTERM)
                log = await asyncio.get_running_loop().run_in_executor(None, read_until, proc, "event=stopping")
                await asyncio.sleep(0.2)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert await wait_exit(proc, 5) == 0
                assert time.monotonic() - started < 3
                return log
            finally:
                deaf.close()

        log = run(main()) + proc.stderr.read().decode()
        names = events(log)
        assert names.index("stopping") < names.index("shutdown_forced") < names.index("stopped"), log
        (forced,) = [line for line in log.splitlines() if "event=shutdown_forced" in line]
        fields = dict(word.split("=", 1) for word in forced.split() if "=" in word)
        assert fields["signal"] == "SIGTERM" and fields["connections"] == "1", forced
        assert int(fields["queued_bytes"]) > 64 << 10, forced
        assert "shutdown_timeout" not in names
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    "flags, closed",
    [((), (1001, "server shutting down")), (("--shutdown-close-code", "1012"), (1012, "server restarting"))],
)
def test_messages_published_before_sigterm_are_delivered_before_1001(flags, closed):
    (port,) = free_ports()
    proc = serve("--port", str(port), *flags)
    n = 2000
    try:

        async def main():
            subscriber = await connect_when_ready(proc, port)
            publisher = await Client.connect(f"ws://127.0.0.1:{port}/")
            sub = await subscriber.subscribe("flush.t")
            for i in range(n - 1):
                publisher.publish("flush.t", b"%d" % i + bytes(500))
            # same frame as the burst: once it is acked, the broker has taken all of them
            ack = await publisher.publish_acked("flush.t", b"last")
            assert ack.seq == n
            proc.send_signal(signal.SIGTERM)
            got = []
            with pytest.raises(ConnectionClosed) as info:
                async for message in sub:
                    got.append(message)
            assert info.value.code == closed[0]
            assert [m.seq for m in got] == list(range(1, n + 1))
            assert got[-1].data == b"last"
            assert await subscriber.wait_closed() == closed
            assert await wait_exit(proc, 10) == 0

        run(main())
    finally:
        stop_process(proc)


def test_stop_flushes_messages_queued_behind_a_paused_transport():
    """Graceful shutdown must flush what is queued: also frames a subscriber has not been
    written yet because its transport was paused (it lagged, within max_pending_bytes)."""
    n, size = 120, 64 << 10

    async def main():
        # close_timeout_s: reading megabytes through a tiny receive window takes a moment
        async with serving(max_pending_bytes=64 << 20, close_timeout_s=10) as server:
            lagging = await RawSocketClient.connect(server.port, rcvbuf=4096)
            try:
                await lagging.send(Sub(1, "lag"))
                assert await lagging.recv() == Ack(1)
                (conn,) = conns_with(server, {"lag"})
                async with Client(url(server)) as pub:
                    for i in range(n):
                        await pub.publish_acked("lag", i.to_bytes(4, "big") + bytes(size - 4))
                assert conn.box.paused and conn.box.size > 0  # the situation under test
                stopping = asyncio.ensure_future(server.stop())
                await asyncio.sleep(0)
                data = bytearray(lagging.buffer)
                loop = asyncio.get_running_loop()
                while True:  # read to the end of the stream
                    chunk = await asyncio.wait_for(loop.sock_recv(lagging.sock, 1 << 20), 5)
                    if not chunk:
                        break
                    data += chunk
                await stopping
            finally:
                lagging.close()
            seqs, close_code = [], None
            reader = ServerReader()
            data = memoryview(bytes(data))
            while data:
                split = split_frame(data)
                assert split is not None, "the stream ended inside a frame"
                opcode, body, data = split
                if opcode == 0x2:
                    for message in reader.read(body):
                        seqs.extend(range(message.seq, message.seq + len(message.data)))
                elif opcode == 0x8:
                    close_code = int.from_bytes(body[:2], "big")
                    assert not data, "bytes after the close frame"
            assert close_code == 1001
            assert seqs == list(range(1, n + 1)), f"{n - len(seqs)} of {n} queued messages dropped at shutdown"

    run(main())


# command line


def test_version():
    result = subprocess.run([sys.executable, "-m", "broker", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"broker {__version__}"


def test_pub_prints_topic_and_seq():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as client:
                sub = await client.subscribe("cli.t")
                result = await run_cli("pub", "cli.t", "hello", "--url", url(server))
                assert (result.returncode, result.stdout) == (0, "cli.t seq=1\n"), result.stderr
                result = await run_cli("pub", "cli.t", "00ff", "--hex", "--url", url(server))
                assert (result.returncode, result.stdout) == (0, "cli.t seq=2\n"), result.stderr
                result = await run_cli("pub", "cli.t", "--url", url(server), input=b"a\nb\nc\n")
                assert (result.returncode, result.stdout) == (0, "cli.t seq=5\n"), result.stderr
                got = [(await sub.next(5)) for _ in range(5)]
                assert [(m.seq, m.data) for m in got] == [(1, b"hello"), (2, b"\x00\xff"), (3, b"a"), (4, b"b"), (5, b"c")]

    run(main())


def test_pub_refused_exits_1():
    async def main():
        async with serving() as server:
            result = await run_cli("pub", "cli.*", "x", "--url", url(server))
            assert result.returncode == 1
            assert "cli.*" in result.stderr
            (port,) = free_ports()
            result = await run_cli("pub", "cli.t", "x", "--url", f"ws://127.0.0.1:{port}/")
            assert result.returncode == 1 and "could not connect" in result.stderr

    run(main())


async def start_sub_cli(server, *args: str) -> subprocess.Popen:
    proc = broker_cli("sub", *args, "--url", url(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pattern = args[0]
    await eventually(
        lambda: proc.poll() is not None or any(pattern in c.session.subscriptions for c in server.connections.values()),
        10,
        "the sub command to subscribe",
    )
    assert proc.poll() is None, proc.stderr.read().decode()
    return proc


def test_sub_prints_text_or_hex_and_stops_after_count():
    async def main():
        async with serving() as server:
            proc = await start_sub_cli(server, "cli.>", "--count", "3")
            try:
                async with Client(url(server)) as pub:
                    await pub.publish_acked("cli.a", b"hello world")
                    await pub.publish_acked("cli.b", b"\x00\x01\xff")
                    await pub.publish_acked("cli.a", b"tab\there")
                    await pub.publish_acked("cli.a", b"not printed")
                loop = asyncio.get_running_loop()
                out, err = await loop.run_in_executor(None, proc.communicate, None, 15)
                assert proc.returncode == 0, err
                assert out.decode().splitlines() == ["cli.a 1 hello world", "cli.b 1 0001ff", "cli.a 2 7461620968657265"]
                assert "subscribed to cli.>" in err.decode()
            finally:
                stop_process(proc)

    run(main())


def test_sub_json_lines():
    async def main():
        async with serving() as server:
            proc = await start_sub_cli(server, "cli.j", "--count", "2", "--json")
            try:
                async with Client(url(server)) as pub:
                    await pub.publish_acked("cli.j", b"hi")
                    await pub.publish_acked("cli.j", b"\xff\x00")
                loop = asyncio.get_running_loop()
                out, err = await loop.run_in_executor(None, proc.communicate, None, 15)
                assert proc.returncode == 0, err
                lines = [json.loads(line) for line in out.decode().splitlines()]
                epoch = server.router.epoch
                assert lines == [
                    {"topic": "cli.j", "epoch": epoch, "epoch_str": str(epoch), "seq": 1, "text": "hi"},
                    {"topic": "cli.j", "epoch": epoch, "epoch_str": str(epoch), "seq": 2, "hex": "ff00"},
                ]
                assert epoch > 1 << 53  # not exact in JavaScript: epoch_str is
            finally:
                stop_process(proc)

    run(main())


# settings


@pytest.mark.parametrize(
    "args, env, file_text, named",
    [
        (["--port", "notanumber"], {}, None, "port"),
        ([], {"BROKER_PORT": "70000"}, None, "port"),
        ([], {}, "port = 7000\nbogus_setting = 1\n", "bogus_setting"),
        ([], {}, "[broker]\nmax_pending_bytes = -5\n", "max_pending_bytes"),
        (["--log-level", "loud"], {}, None, "log_level"),
        (["--max-payload-bytes", "2000000"], {}, None, "max_payload_bytes"),
    ],
    ids=["flag", "env", "file-unknown-key", "file-bad-value", "literal", "cross-field"],
)
def test_bad_setting_exits_2_naming_it(tmp_path, args, env, file_text, named):
    if file_text is not None:
        path = tmp_path / "broker.toml"
        path.write_text(file_text)
        args = [*args, "--config", str(path)]
    proc = serve(*args, env=env)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 2, err.decode()
    assert named in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize(
    "env, named",
    [
        ({"BROKER_AUTH_JWT_SECRET_FILE": "/nonexistent/secret"}, "auth_jwt_secret_file given as BROKER_AUTH_JWT_SECRET_FILE"),
        ({"BROKER_AUTH_JWT_SECRET": "short"}, "auth_jwt_secret given as BROKER_AUTH_JWT_SECRET"),
        ({"BROKER_TLS_CERT_FILE": "/nonexistent/cert.pem"}, "tls_cert_file given as BROKER_TLS_CERT_FILE"),
    ],
)
def test_a_file_or_key_a_variable_names_that_cannot_be_used_names_the_variable(env, named):
    """Files and keys are read after the settings are validated: their errors name the
    environment variable (or flag, or file key) too."""
    proc = serve("--port", "0", env=env)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 2 and named in err.decode(), err.decode()


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_fatal_start_errors_are_json_lines_with_log_format_json(tmp_path, how):
    """A log pipeline that reads JSON lines sees why the broker did not start: a port in use
    (exit 1) and a bad setting (exit 2) are one JSON line each, event `fatal`."""
    path = tmp_path / "broker.toml"
    path.write_text('log_format = "json"\n')
    given = {"flag": (["--log-format", "json"], {}), "env": ([], {"BROKER_LOG_FORMAT": "json"}), "file": (["--config", str(path)], {})}
    args, env = given[how]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra, code, needle in [
            (["--port", str(port)], 1, f"cannot listen on 127.0.0.1:{port}"),
            (["--port", "0", "--max-payload-bytes", "2000000"], 2, "max_frame_bytes"),
        ]:
            proc = serve(*args, *extra, env=env)
            try:
                _, err = proc.communicate(timeout=30)
            finally:
                stop_process(proc)
            assert proc.returncode == code, err.decode()
            (line,) = err.decode().splitlines()
            record = json.loads(line)
            assert record["level"] == "error" and record["event"] == "fatal" and record["exit_code"] == code
            assert needle in record["error"], record


def test_port_in_use_exits_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve("--port", str(port))
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            stop_process(proc)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()


async def _handshake(port: int) -> None:
    client = await Client.connect(f"ws://127.0.0.1:{port}/")
    await client.close()


def bound_port(args: list[str], env: dict) -> int:
    """Start `broker serve ARGS` with `env`, read the port it listens on, stop it."""
    proc = serve(*args, env=env)
    try:
        log = read_until(proc, "event=start")
        line = next(line for line in log.splitlines() if "event=start" in line)
        port = int(next(word for word in line.split() if word.startswith("port="))[5:])
        # a full WebSocket handshake, not just the log line, before the signal: see
        # test_signal_closes_clients_with_1001_and_exits_0
        run(_handshake(port))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        return port
    finally:
        stop_process(proc)


def test_flags_beat_env_beat_file(tmp_path):
    file_port, env_port, flag_port = free_ports(3)
    path = tmp_path / "broker.toml"
    path.write_text(f"[broker]\nport = {file_port}\n")
    env = {"BROKER_PORT": str(env_port)}
    assert bound_port(["--config", str(path), "--port", str(flag_port)], env) == flag_port
    assert bound_port(["--config", str(path)], env) == env_port
    assert bound_port(["--config", str(path)], {}) == file_port
    # the file can also come from the environment
    assert bound_port([], {"BROKER_CONFIG": str(path)}) == file_port


def test_a_broker_table_beside_other_tables_applies_them_all_and_the_start_line_says_so(tmp_path, redis_url, redis_prefix):
    """[broker] next to [auth], [redis] and [admin]: every table is applied (a client without a
    token is refused, the node joins Redis, the admin port answers) and the start line says
    what is on and where."""
    port, admin = free_ports(2)
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\nport = {port}\nlog_format = "json"\n'
        f'[auth]\njwt_secret = "the-secret-of-32-bytes-or-more-here"\n'
        f'[redis]\nurl = "{redis_url}"\nprefix = "{redis_prefix}"\n'
        f'[admin]\nport = {admin}\napi_key = "k"\n'
    )
    proc = serve("--config", str(path))
    try:
        log = read_until(proc, '"event": "start"')
        start = next(json.loads(line) for line in log.splitlines() if '"event": "start"' in line)
        assert start["port"] == port and start["tls"] is False
        assert (start["auth"], start["auth_keys"], start["auth_anonymous"]) == ("on", "auth_jwt_secret", False)
        assert (start["backplane"], start["redis"], start["redis_prefix"]) == ("redis", redis_url, redis_prefix)
        assert (start["admin"], start["admin_api"]) == (f"127.0.0.1:{admin}", "on")

        async def main():
            status, _, _, writer = await send_upgrade(port, upgrade_request("/", [SUBPROTOCOL]))
            writer.close()
            assert status == 401  # no token
            reader, writer = await asyncio.open_connection("127.0.0.1", admin)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).split(b" ", 2)[1] == b"200"
            writer.close()

        run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)


def test_the_start_line_says_what_is_off():
    proc = serve("--port", "0", "--log-format", "json")
    try:
        log = read_until(proc, '"event": "start"')
        start = next(json.loads(line) for line in log.splitlines() if '"event": "start"' in line)
        assert (start["auth"], start["tls"], start["backplane"], start["admin"]) == ("off", False, "memory", "off")
        assert "auth_keys" not in start and "redis" not in start and "admin_api" not in start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)


def test_a_redis_password_is_not_logged():
    assert without_password("redis://:pw@127.0.0.1:6379/0") == "redis://***@127.0.0.1:6379/0"
    assert without_password("rediss://user:pw@redis.example:6380") == "rediss://***@redis.example:6380"
    assert without_password("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"


@pytest.mark.parametrize("backplane", ["memory", "redis"])
def test_a_start_that_fails_half_way_closes_what_it_opened_and_stop_does_not_fail(backplane, request):
    """The admin port is taken: start() raises an error naming it after the WebSocket port
    was opened; that port is closed again (no client is let in to a broker that does not
    run) and stop() afterwards is a no-op, not a crash."""
    settings = {}
    if backplane == "redis":
        settings = {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}

    async def main():
        ws_port = free_ports()[0]
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            admin = taken.getsockname()[1]
            server = Server(load({"port": ws_port, "admin_port": admin, "log_level": "error", **settings}, environ={}))
            with pytest.raises(ListenError, match=f"cannot listen on the admin port 127.0.0.1:{admin}: Address already in use"):
                await server.start()
            await server.stop()
            await server.stop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", ws_port)
        if server.cluster is not None:
            assert not server.cluster.accepting

    run(main())


@pytest.mark.slow
def test_admin_port_in_use_exits_1_naming_it(redis_url, redis_prefix):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        proc = serve("--port", "0", "--admin-port", str(admin), "--redis-url", redis_url, "--redis-prefix", redis_prefix)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            stop_process(proc)
    assert proc.returncode == 1, err.decode()
    assert f"broker: cannot listen on the admin port 127.0.0.1:{admin}: Address already in use" in err.decode()
    assert "Traceback" not in err.decode()


def test_json_log_lines_write_integers_past_2_53_as_strings():
    """A JSON log line read by JavaScript (or a tool written in it) keeps an epoch exact."""
    import logging

    from broker.server.logs import JsonFormatter

    record = logging.LogRecord("broker", logging.INFO, __file__, 1, "epoch_ended", None, None)
    record.fields = {"epoch": 1 << 60, "seq": 42, "ok": True, "lag": 0.5, "name": "x"}
    line = json.loads(JsonFormatter().format(record))
    assert line["epoch"] == str(1 << 60) and line["seq"] == 42 and line["ok"] is True and line["lag"] == 0.5
