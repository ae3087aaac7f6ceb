"""TLS served by the broker (wss://): real servers on free ports, real clients, certificates
from a throwaway CA (trustme).

What is checked: publish/subscribe over wss:// with the Python client, including the fan-out
fast path's coalesced frames and the flow control of TLS transports (writes paused and
resumed, reads paused and resumed for the iteration budget, slow consumers); a plaintext client
against the TLS port; bad certificate files at startup; reloading the certificate (in process
and with SIGHUP to `broker serve`) while connections stay open, and a broken reload keeping the
old certificate; through a TCP relay that records every byte, that no payload or topic name
crosses the wire in clear; and that the benchmark harness runs the broker over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme
import websockets
from websockets.exceptions import InvalidMessage

from broker.client import Client, ConnectionClosed
from broker.errors import ConfigError
from broker.messages import SUBPROTOCOL, Ack, Delivery, ServerReader, Sub
from broker.server import Server, logs
from broker.server.connection import OPEN, TLS_WRITE_HIGH_WATER
from broker.settings import load
from conftest import (
    ROOT,
    broker_cli,
    client_frame,
    encode,
    eventually,
    free_ports,
    read_until,
    record_writes,
    run,
    run_cli,
    serving,
    split_frame,
    stop_process,
    upgrade_request,
)


class Issued(NamedTuple):
    cert: bytes  # PEM of the server certificate and its chain
    key: bytes  # PEM of its private key
    der: bytes  # the server certificate as a client sees it (getpeercert(binary_form=True))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


def issue(ca: trustme.CA) -> Issued:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return Issued(chain, cert.private_key_pem.bytes(), ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode()))


class PKI(NamedTuple):
    first: Issued  # from one CA
    second: Issued  # from another CA
    client: ssl.SSLContext  # trusts both CAs, checks the host name
    ca_file: str  # the first CA's certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    context = ssl.create_default_context()
    first_ca.configure_trust(context)
    second_ca.configure_trust(context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    first_ca.cert_pem.write_to_path(str(ca_file))
    return PKI(issue(first_ca), issue(second_ca), context, str(ca_file))


def install(folder: Path, issued: Issued, *, cert: bytes | None = None, key: bytes | None = None) -> dict:
    """Write (or overwrite, with a rename as a deployment does) the certificate and key files
    in `folder`; returns the settings that name them."""
    paths = {"tls_cert_file": folder / "cert.pem", "tls_key_file": folder / "key.pem"}
    for path, data in (
        (paths["tls_cert_file"], issued.cert if cert is None else cert),
        (paths["tls_key_file"], issued.key if key is None else key),
    ):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        tmp.replace(path)
    return {name: str(path) for name, path in paths.items()}


def wss(server) -> str:
    return f"wss://127.0.0.1:{server.port}/"


async def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection to `port` is given (DER)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return der


def certificate_of(client: Client) -> bytes:
    """The certificate the client's open connection was given (DER)."""
    return client.get_extra_info("ssl_object").getpeercert(binary_form=True)


@pytest.fixture
def events():
    """The broker's log events while the test runs: (name, fields) pairs."""
    seen: list[tuple[str, dict]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), getattr(record, "fields", {})))

    handler = Collect(logging.DEBUG)
    level = logs.log.level
    logs.log.addHandler(handler)
    logs.log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logs.log.removeHandler(handler)
        logs.log.setLevel(level)


class TlsStream:
    """A broker.v1 client written by hand on an asyncio TLS stream. It reads only when asked
    to, so it can play a consumer that stops reading (a small SO_RCVBUF and stream limit keep
    the kernel and the stream from hiding much of the backlog)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.messages = ServerReader()
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext, rcvbuf: int | None = None) -> TlsStream:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname="127.0.0.1", limit=16384)
        writer.write(upgrade_request("/", [SUBPROTOCOL]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, message) -> None:
        self.writer.write(client_frame(0x2, encode(message)))

    async def frame(self) -> tuple[int, bytes]:
        while (split := split_frame(self.buffer)) is None:
            chunk = await asyncio.wait_for(self.reader.read(65536), 5)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self.buffer += chunk
        opcode, payload, self.buffer = split
        return opcode, payload

    async def messages_until_close(self) -> tuple[list, int]:
        """Every server message up to the close frame, and the close code."""
        out = []
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x8:
                return out, int.from_bytes(payload[:2], "big")
            out.extend(self.messages.read(payload))

    def close(self) -> None:
        self.writer.transport.abort()


def payloads(messages: list) -> list[bytes]:
    return [p for m in messages if isinstance(m, Delivery) for p in m.data]


# publish and subscribe over wss://


def test_pubsub_over_wss_with_the_python_client(pki, tmp_path, events):
    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            assert server.certificate.sha256 == pki.first.sha256
            start = next(fields for name, fields in events if name == "start")
            assert start["tls"] is True and start["cert_sha256"] == pki.first.sha256
            sub_client = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            pub_client = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sub = await sub_client.subscribe("md.>")
            ack = await pub_client.publish_acked("md.AAPL", b"189.50")
            for i in range(100):
                pub_client.publish("md.MSFT", b"%d" % i)
            got = [await sub.next(5) for _ in range(101)]
            assert [(m.topic, m.data) for m in got] == [("md.AAPL", b"189.50")] + [("md.MSFT", b"%d" % i) for i in range(100)]
            assert got[0].seq == ack.seq
            for conn in server.connections.values():  # the transports the connection code runs on
                assert conn.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
                host, port = conn.transport.get_extra_info("peername")[:2]
                assert conn.peer == f"{host}:{port}" and host == "127.0.0.1"
            assert certificate_of(sub_client) == pki.first.der
            # shutdown closes TLS clients as it closes plain ones
            await server.stop()
            assert await asyncio.wait_for(sub_client.wait_closed(), 5) == (1001, "server shutting down")
            with pytest.raises(ConnectionClosed):
                await sub.next(1)
            await pub_client.close()

    run(main())


def test_tls_1_2_clients_are_served_with_forward_secrecy_and_aead_only(pki, tmp_path):
    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            context = ssl.create_default_context(cafile=pki.ca_file)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            async with Client(wss(server), ssl=context, reconnect=False) as client:
                sub = await client.subscribe("t")
                await client.publish_acked("t", b"over TLS 1.2")
                assert (await sub.next(5)).data == b"over TLS 1.2"
                assert client.get_extra_info("ssl_object").version() == "TLSv1.2"
                cipher = client.get_extra_info("cipher")[0]
                assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
            # TLS 1.2 without forward secrecy or AEAD is refused
            context.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:AES128-GCM-SHA256")
            with pytest.raises(ConnectionClosed) as info:
                await Client.connect(wss(server), ssl=context, reconnect=False, connect_timeout=3)
            assert info.value.reason.endswith(": ConnectionResetError"), info.value.reason  # the broker drops the handshake

    run(main())


def test_client_tls_options(pki, tmp_path):
    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            # wss:// without a context: the system's default, which does not trust a private CA
            with pytest.raises(ConnectionClosed) as info:
                await Client.connect(wss(server), reconnect=False, connect_timeout=3)
            assert "CERTIFICATE_VERIFY_FAILED" in info.value.reason
            context = ssl.create_default_context(cafile=pki.ca_file)
            async with Client(f"wss://localhost:{server.port}/", ssl=context, reconnect=False) as client:
                await client.publish_acked("t", b"x")
        # the host name is checked: a certificate of the right CA for another name is refused
        ca = trustme.CA()
        other = ca.issue_cert("broker.example")
        folder = tmp_path / "other"
        folder.mkdir()
        settings = install(folder, Issued(other.cert_chain_pems[0].bytes(), other.private_key_pem.bytes(), b""))
        async with serving(**settings) as server:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            with pytest.raises(ConnectionClosed) as info:
                await Client.connect(wss(server), ssl=context, reconnect=False, connect_timeout=3)
            assert "CERTIFICATE_VERIFY_FAILED" in info.value.reason and "127.0.0.1" in info.value.reason
        with pytest.raises(ValueError, match="wss://"):
            Client("ws://127.0.0.1:7341/", ssl=pki.client)
        with pytest.raises(TypeError, match="SSLContext"):
            Client("wss://127.0.0.1:7341/", ssl=True)

    run(main())


def test_a_plaintext_client_on_the_tls_port_fails_and_the_server_stays_healthy(pki, tmp_path, events):
    async def main():
        async with serving(handshake_timeout_s=0.5, **install(tmp_path, pki.first)) as server:
            with pytest.raises((InvalidMessage, ConnectionError, EOFError)):
                await websockets.connect(f"ws://127.0.0.1:{server.port}/", subprotocols=[SUBPROTOCOL], open_timeout=3)
            with pytest.raises(ConnectionClosed):
                await Client.connect(f"ws://127.0.0.1:{server.port}/", reconnect=False, connect_timeout=3)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(upgrade_request("/", [SUBPROTOCOL]))
            assert await asyncio.wait_for(reader.read(), 3) == b"", "a plaintext request gets no HTTP answer"
            writer.close()
            # a TCP connection that never starts its TLS handshake is dropped after handshake_timeout_s
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            started = asyncio.get_running_loop().time()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 3) == b""
            assert asyncio.get_running_loop().time() - started < 2
            writer.close()
            assert not server.connections and server.handshakes_refused == 0
            assert not [name for name, _ in events if name == "connect"], "no WebSocket connection was made"
            async with Client(wss(server), ssl=pki.client, reconnect=False) as client:
                sub = await client.subscribe("t")
                await client.publish_acked("t", b"still serving")
                assert (await sub.next(5)).data == b"still serving"

    run(main())


def test_connections_on_the_tls_port_count_from_their_accept(pki, tmp_path):
    """A TCP connection that never starts its TLS handshake holds a descriptor as much as a
    plaintext one: it is counted from its accept, and past max_handshakes_per_ip the excess is
    closed at once (without an answer: the client expects TLS). Failed and abandoned TLS
    handshakes release their counts."""

    async def main():
        async with serving(max_handshakes_per_ip=2, handshake_timeout_s=1, **install(tmp_path, pki.first)) as server:
            guard = server.guard
            quiet = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            await eventually(lambda: guard.handshakes_per_ip == {"127.0.0.1": 2}, 3, "the silent connections counted")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 1) == b""  # closed at once, no answer
            writer.close()
            assert guard.stats.refused == {"max_handshakes_per_ip": 1} and server.refused_by_status == {429: 1}
            for _, quiet_writer in quiet:
                quiet_writer.close()
            await eventually(lambda: guard.total == 0 and guard.handshakes == 0, 3, "the silent connections released")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: its handshake fails
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 3)
            writer.close()
            await eventually(lambda: guard.total == 0 and not server.handshaking, 3, "the failed handshake released")
            async with Client(wss(server), ssl=pki.client, reconnect=False) as client:
                assert guard.total == 1 and guard.handshakes == 0
                await client.publish_acked("t", b"served")
            await eventually(lambda: guard.total == 0, 3, "the client released")

    run(main())


# flow control on TLS transports


def test_a_tls_consumer_that_stops_reading_is_paused_then_catches_up(pki, tmp_path):
    """pause_writing stops the broker's writes to a TLS connection whose peer stopped reading
    (with at most TLS_WRITE_HIGH_WATER and one write in the transport), its queue then grows in
    the broker, and once the peer reads again resume_writing lets everything out, in order."""

    async def main():
        async with serving(slow_consumer_timeout_s=30, **install(tmp_path, pki.first)) as server:
            lagger = await TlsStream.connect(server.port, pki.client, rcvbuf=4096)
            lagger.send(Sub(1, "flow.t"))
            _, payload = await lagger.frame()
            assert isinstance(lagger.messages.read(payload)[0], Ack)
            (conn,) = server.connections.values()
            writes = record_writes(conn)
            publisher = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sent = 0
            while not conn.box.paused:
                assert sent < 2000, "the TLS transport never paused the writer"
                for _ in range(10):
                    publisher.publish("flow.t", b"%06d" % sent + b"x" * 4090)
                    sent += 1
                await publisher.publish_acked("flow.other", b"")  # the broker handled the tick
            assert conn.buffer_size() <= TLS_WRITE_HIGH_WATER + max(map(len, writes))
            written = len(writes)
            for _ in range(10):
                publisher.publish("flow.t", b"%06d" % sent + b"x" * 4090)
                sent += 1
            await publisher.publish_acked("flow.other", b"")
            assert conn.box.paused and conn.box.size > 40_000 and len(writes) == written, "the queue waits in the broker"
            got: list[bytes] = []
            while len(got) < sent:
                _, payload = await lagger.frame()
                got += payloads(lagger.messages.read(payload))
            assert got == [b"%06d" % i + b"x" * 4090 for i in range(sent)]
            assert conn.state == OPEN and not conn.box.paused and conn.box.size == 0
            lagger.close()
            await publisher.close()

    run(main())


def test_a_tls_publisher_past_the_iteration_budget_is_paused_and_resumed(pki, tmp_path):
    """A publisher that sends more than one loop iteration's budget (1 MiB) at once stops
    being read (pause_reading on its TLS transport), waits in the server's queue and is read
    again (resume_reading) in the following iterations; every message arrives, in order."""

    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            subscriber = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sub = await subscriber.subscribe("big.t")
            publisher = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            queued = []
            queue = server.queue
            server.queue = lambda conn: (queued.append(conn.id), queue(conn))
            payloads = [b"%02d" % i + bytes([i]) * 500_000 for i in range(10)]
            for payload in payloads:
                publisher.publish("big.t", payload)
            await publisher.publish_acked("big.done", b"")
            assert queued, "the publisher never had to wait for a following iteration"
            assert [(await sub.next(10)).data for _ in payloads] == payloads
            assert all(conn.reading for conn in server.connections.values())
            await subscriber.close()
            await publisher.close()

    run(main())


def test_a_tls_consumer_that_stays_behind_is_closed_as_a_slow_consumer(pki, tmp_path):
    async def main():
        limits = {"max_payload_bytes": 8192, "max_pending_bytes": 65536, "slow_consumer_timeout_s": 0.3}
        async with serving(**limits, **install(tmp_path, pki.first)) as server:
            lagger = await TlsStream.connect(server.port, pki.client, rcvbuf=4096)
            lagger.send(Sub(1, "slow.t"))
            await lagger.frame()
            (lagging,) = server.connections.values()
            keeper = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sub = await keeper.subscribe("slow.t")
            publisher = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sent = 0
            while lagging.state == OPEN:
                assert sent < 5000, "the consumer that stopped reading was never closed"
                for _ in range(10):
                    publisher.publish("slow.t", b"%06d" % sent + b"y" * 4000)
                    sent += 1
                await publisher.publish_acked("slow.other", b"")
                for i in range(sent - 10, sent):  # its neighbour keeps up all along
                    assert (await sub.next(5)).data == b"%06d" % i + b"y" * 4000
            code, reason = lagging.close_reason
            assert code == 1013 and reason.startswith("slow consumer: "), reason
            _, code = await lagger.messages_until_close()
            assert code == 1013
            await eventually(lambda: lagging.id not in server.connections, 3, "the slow consumer's connection to end")
            assert keeper.state == "connected"
            await keeper.close()
            await publisher.close()
            lagger.close()

    run(main())


# certificate files: startup errors, reload


def encrypted(key_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    )


def test_bad_certificate_settings_stop_the_start_with_an_error_naming_the_setting(pki, tmp_path):
    good = install(tmp_path, pki.first)
    cert, key = good["tls_cert_file"], good["tls_key_file"]
    other = tmp_path / "other-key.pem"
    other.write_bytes(pki.second.key)
    locked = tmp_path / "encrypted-key.pem"
    locked.write_bytes(encrypted(pki.first.key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    both = tmp_path / "both.pem"
    both.write_bytes(pki.first.key + pki.first.cert)
    cases = [
        (
            {"tls_cert_file": str(tmp_path / "missing.pem")},
            f"tls_cert_file: cannot read {tmp_path / 'missing.pem'}: No such file or directory",
        ),
        (
            {"tls_cert_file": cert, "tls_key_file": str(tmp_path / "nokey.pem")},
            f"tls_key_file: cannot read {tmp_path / 'nokey.pem'}: No such file or directory",
        ),
        ({"tls_cert_file": str(garbage), "tls_key_file": key}, f"tls_cert_file: {garbage} holds no PEM certificate"),
        ({"tls_cert_file": cert, "tls_key_file": str(garbage)}, f"tls_key_file: {garbage} holds no PEM private key"),
        ({"tls_cert_file": cert}, f"tls_cert_file: {cert} holds no private key; add it to the file or set tls_key_file"),
        (
            {"tls_cert_file": cert, "tls_key_file": str(other)},
            f"tls_key_file: the private key in {other} does not belong to the certificate in {cert}",
        ),
        (
            {"tls_cert_file": cert, "tls_key_file": str(locked)},
            f"tls_key_file: the private key in {locked} is encrypted and the broker takes no passphrase",
        ),
        ({"tls_cert_file": str(tmp_path)}, f"tls_cert_file: cannot read {tmp_path}: Is a directory"),
    ]
    for settings, message in cases:
        server = Server(load({"port": 0, **settings}, environ={}))
        with pytest.raises(ConfigError) as info:
            run(server.start())
        assert str(info.value).startswith(message), (settings, str(info.value))
        assert server._server is None, "nothing listens"

    async def main():  # the key may stand in the certificate's file, before or after it
        async with serving(tls_cert_file=str(both)) as server:
            assert await served_certificate(server.port, pki.client) == pki.first.der

    run(main())
    with pytest.raises(ConfigError, match="tls_key_file needs tls_cert_file"):
        load({"tls_key_file": key}, environ={})


def test_broker_serve_with_an_unusable_certificate_exits_2(pki, tmp_path):
    settings = install(tmp_path, pki.second, key=pki.first.key)
    (port,) = free_ports()
    proc = broker_cli(
        "serve",
        "--port",
        str(port),
        "--tls-cert-file",
        settings["tls_cert_file"],
        "--tls-key-file",
        settings["tls_key_file"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        stop_process(proc)
    assert proc.returncode == 2
    assert err.decode().strip() == (
        f"broker: tls_key_file: the private key in {settings['tls_key_file']} does not belong to the certificate in {settings['tls_cert_file']}"
        " (tls_key_file given as --tls-key-file)"
    )


def test_reload_serves_the_new_certificate_and_open_connections_go_on(pki, tmp_path, events):
    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            old = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sub = await old.subscribe("t")
            assert certificate_of(old) == pki.first.der
            install(tmp_path, pki.second)  # another CA, another key
            server.reload()
            assert server.certificate.sha256 == pki.second.sha256
            reloaded = [fields for name, fields in events if name == "tls_reloaded"]
            assert reloaded == [{"cert": str(tmp_path / "cert.pem"), "sha256": pki.second.sha256, "previous": pki.first.sha256}]
            assert await served_certificate(server.port, pki.client) == pki.second.der
            new = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            assert certificate_of(new) == pki.second.der
            assert certificate_of(old) == pki.first.der  # the open connection keeps its session
            await new.publish_acked("t", b"from the new connection")
            await old.publish_acked("t", b"from the old connection")
            assert [(await sub.next(5)).data for _ in range(2)] == [b"from the new connection", b"from the old connection"]
            # a client that trusts only the first CA cannot connect any more
            with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
                await Client.connect(wss(server), ssl=ssl.create_default_context(cafile=pki.ca_file), reconnect=False)
            await old.close()
            await new.close()

    run(main())


@pytest.mark.parametrize("breakage", ["garbage certificate", "key of another certificate", "no key file"])
def test_a_reload_that_cannot_load_the_files_keeps_the_old_certificate(pki, tmp_path, events, breakage):
    async def main():
        settings = install(tmp_path, pki.first)
        async with serving(**settings) as server:
            client = await Client.connect(wss(server), ssl=pki.client, reconnect=False)
            sub = await client.subscribe("t")
            if breakage == "garbage certificate":
                install(tmp_path, pki.second, cert=b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
                setting = "tls_cert_file"
            elif breakage == "key of another certificate":  # OpenSSL alone would drop the old key
                install(tmp_path, pki.second, key=pki.first.key)
                setting = "tls_key_file"
            else:
                install(tmp_path, pki.second)
                Path(settings["tls_key_file"]).unlink()
                setting = "tls_key_file"
            server.reload()
            (failed,) = [fields for name, fields in events if name == "tls_reload_failed"]
            assert failed["error"].startswith(f"{setting}: ") and failed["kept"] == pki.first.sha256
            assert server.certificate.sha256 == pki.first.sha256
            assert await served_certificate(server.port, pki.client) == pki.first.der
            async with Client(wss(server), ssl=pki.client, reconnect=False) as new:
                await new.publish_acked("t", b"still the first certificate")
            assert (await sub.next(5)).data == b"still the first certificate"
            install(tmp_path, pki.second)  # fixed: the next reload takes it
            server.reload()
            assert await served_certificate(server.port, pki.client) == pki.second.der
            await client.close()

    run(main())


def test_sighup_reloads_the_certificate_of_broker_serve(pki, tmp_path):
    settings = install(tmp_path, pki.first)
    (port,) = free_ports()
    proc = broker_cli(
        "serve",
        "--port",
        str(port),
        "--tls-cert-file",
        settings["tls_cert_file"],
        "--tls-key-file",
        settings["tls_key_file"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        log = read_until(proc, "event=start")
        assert f"tls=True cert_sha256={pki.first.sha256}" in log

        async def main():
            url = f"wss://127.0.0.1:{port}/"
            old = await Client.connect(url, ssl=pki.client, reconnect=False)
            sub = await old.subscribe("t")
            install(tmp_path, pki.second)
            proc.send_signal(signal.SIGHUP)
            text = await asyncio.to_thread(read_until, proc, "event=tls_reloaded")
            assert f"sha256={pki.second.sha256} previous={pki.first.sha256}" in text
            assert await served_certificate(port, pki.client) == pki.second.der
            await old.publish_acked("t", b"after SIGHUP")
            assert (await sub.next(5)).data == b"after SIGHUP"
            assert certificate_of(old) == pki.first.der
            install(tmp_path, pki.second, cert=b"garbage\n")
            proc.send_signal(signal.SIGHUP)
            text = await asyncio.to_thread(read_until, proc, "event=tls_reload_failed")
            assert "tls_cert_file" in text and f"kept={pki.second.sha256}" in text
            assert await served_certificate(port, pki.client) == pki.second.der
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(old.wait_closed(), 10) == (1001, "server shutting down")
            await eventually(lambda: proc.poll() is not None, 10, "the broker to exit")
            assert proc.returncode == 0

        run(main())
    finally:
        stop_process(proc)


def test_sighup_does_not_stop_a_broker_without_tls():
    """SIGHUP used to end the process (its default action); now it is a reload, and without
    TLS there is nothing to load."""
    (port,) = free_ports()
    proc = broker_cli("serve", "--port", str(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        read_until(proc, "event=start")
        proc.send_signal(signal.SIGHUP)
        read_until(proc, "event=reload")

        async def main():
            async with Client(f"ws://127.0.0.1:{port}/", reconnect=False) as client:
                sub = await client.subscribe("t")
                await client.publish_acked("t", b"after SIGHUP")
                assert (await sub.next(5)).data == b"after SIGHUP"

        run(main())
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)


def test_cli_pub_and_sub_over_wss_with_cafile(pki, tmp_path):
    async def main():
        async with serving(**install(tmp_path, pki.first)) as server:
            url = wss(server)
            sub = asyncio.ensure_future(run_cli("sub", "md.>", "--url", url, "--cafile", pki.ca_file, "--count", "1"))
            await eventually(lambda: any(c.session.subscriptions for c in server.connections.values()), 10, "the subscriber")
            pub = await run_cli("pub", "md.AAPL", "189.50", "--url", url, "--cafile", pki.ca_file)
            assert (pub.returncode, pub.stdout) == (0, "md.AAPL seq=1\n"), pub.stderr
            done = await sub
            assert (done.returncode, done.stdout) == (0, "md.AAPL 1 189.50\n"), done.stderr
            refused = await run_cli("pub", "md.AAPL", "x", "--url", url)  # the system's CAs do not know this one
            assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr

    run(main())


# no plaintext on the wire


class Relay:
    """A TCP relay in front of a server: it forwards every connection, both ways, and records
    every byte it forwards: `streams` holds (clients to server, server to clients) per
    connection."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.streams: list[tuple[bytearray, bytearray]] = []
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        """Stop listening and wait for the relayed connections to end (their clients closed)."""
        self.server.close()
        await eventually(lambda: not self.tasks, 5, "the relayed connections to end")

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        up, down = bytearray(), bytearray()
        self.streams.append((up, down))
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(self._pump(client_reader, server_writer, up), self._pump(server_reader, client_writer, down))
        finally:
            client_writer.close()
            self.tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await reader.read(1 << 16):
                record += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records that make up `stream` (20 change cipher spec, 21
    alert, 22 handshake, 23 application data); fails unless every byte is in a record."""
    kinds, pos = [], 0
    while pos < len(stream):
        assert pos + 5 <= len(stream), "the stream ends inside a record header"
        kind, version, size = stream[pos], stream[pos + 1 : pos + 3], int.from_bytes(stream[pos + 3 : pos + 5], "big")
        assert kind in (20, 21, 22, 23) and version in (b"\x03\x01", b"\x03\x03"), f"not a TLS record at byte {pos}"
        kinds.append(kind)
        pos += 5 + size
    assert pos == len(stream), "the stream ends inside a record"
    return kinds


def client_payloads(stream: bytes) -> list[bytes]:
    """The unmasked payloads of the client frames that follow the upgrade request in `stream`."""
    data = stream[stream.index(b"\r\n\r\n") + 4 :]
    out = []
    while data:
        size, head = data[1] & 0x7F, 2
        if size >= 126:
            head = 4 if size == 126 else 10
            size = int.from_bytes(data[2:head], "big")
        key, payload = data[head : head + 4], data[head + 4 : head + 4 + size]
        out.append(bytes(b ^ key[i % 4] for i, b in enumerate(payload)))
        data = data[head + 4 + size :]
    return out


@pytest.mark.parametrize("tls", [True, False], ids=["wss", "plain-control"])
def test_no_payload_or_topic_crosses_the_wire_in_clear(pki, tmp_path, tls):
    """Messages with a marker payload go to four subscribers through the fan-out fast path
    (many messages per tick: coalesced frames, one write per subscriber per tick). Over TLS every
    byte the relay forwarded, both ways, is inside a TLS record, and neither the marker, nor
    the topic name, nor the upgrade request is among them. The same test against a plain server
    finds every copy of the marker (unmasked from the publisher's frames, as sent to each
    subscriber), which proves the capture."""
    marker = b"PLAINTEXT-MARKER-5d8e1f"
    feed = "secret-feed-93b2"
    per_tick, ticks = 50, 4
    expected = [marker + b"-%03d" % i for i in range(per_tick * ticks)]

    async def main():
        async with serving(**(install(tmp_path, pki.first) if tls else {})) as server, Relay(server.port) as relay:
            url = f"{'wss' if tls else 'ws'}://127.0.0.1:{relay.port}/"
            options = {"ssl": pki.client} if tls else {}
            subscribers = [await Client.connect(url, reconnect=False, **options) for _ in range(4)]
            subs = [await client.subscribe(f"{feed}.>") for client in subscribers]
            writes = [record_writes(conn) for conn in server.connections.values()]
            publisher = await Client.connect(url, reconnect=False, **options)
            for tick in range(ticks):
                for payload in expected[tick * per_tick : (tick + 1) * per_tick]:
                    publisher.publish(f"{feed}.quotes", payload)  # one tick's publishes leave in one frame
                await publisher.publish_acked("sync", b"")
            for sub in subs:
                got = [await sub.next(5) for _ in expected]
                assert [(m.topic, m.data) for m in got] == [(f"{feed}.quotes", p) for p in expected]
            for written in writes:  # what the fast path wrote to each subscriber's transport
                assert sum(data.count(marker) for data in written) == len(expected)
                assert max(data.count(marker) for data in written) >= 10, "several messages in one write"
            for client in [*subscribers, publisher]:
                await client.close()
        return [(bytes(up), bytes(down)) for up, down in relay.streams]

    streams = run(main())
    assert len(streams) == 5
    if tls:
        for up, down in streams:
            assert 23 in tls_records(up) and 23 in tls_records(down)
            for clear in (marker, feed.encode(), b"GET /", SUBPROTOCOL.encode()):
                assert clear not in up and clear not in down
    else:
        sent = b"".join(payload for up, _ in streams for payload in client_payloads(up))
        assert sent.count(marker) == len(expected) and feed.encode() in sent
        assert sum(down.count(marker) for _, down in streams) == 4 * len(expected)


# the benchmark harness over TLS


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_bench_runs_the_broker_over_tls(tmp_path):
    """`bench.run --systems broker-tls`: the broker with a throwaway certificate, the Bun fleet
    and the Python publisher over wss:// trusting its CA; everything delivered."""
    subprocess.run(
        [sys.executable, "-c", "from bench import fleetproc, systems; systems.bun_binary(); fleetproc.install()"],
        cwd=ROOT,
        check=True,
        timeout=180,
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--scenarios",
            "a",
            "--systems",
            "broker-tls",
            "--clients",
            "real",
            "--runs",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0.3",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert row["system"] == "broker-tls" and row["delivered_per_s"] > 0 and row["alive"]
    assert row["lost"] == 0 and row["closes_slow"] == 0 and row["closes_other"] == 0
    assert row["gaps"] == 0 and row["dups"] == 0 and row["unknown"] == 0
