"""WebSocket handshake validation against a real server, with real clients.

A client must ask for the broker.v1 subprotocol on the configured path; anything else is refused
with an HTTP error whose body says what to do. A TCP client that never completes the handshake
is disconnected after handshake_timeout_s, and one that sends garbage is disconnected at once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

import jwt
import msgspec
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from broker.client import Client
from broker.messages import SUBPROTOCOL, Ack, decode_server_frame
from conftest import client_frame, eventually, recv_message, run, send_upgrade, serving, split_frame, upgrade_request, url

pack = msgspec.msgpack.encode


async def refused(uri: str, **kwargs) -> tuple[int, bytes]:
    """Connect with `websockets`; the handshake must fail: return its HTTP status and body."""
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(uri, open_timeout=3, **kwargs)
        await ws.close()
    response = info.value.response
    return response.status_code, bytes(response.body or b"")


async def works(ws) -> None:
    """The connection speaks the protocol: a subscribe gets its ack."""
    await ws.send(pack(["sub", 1, "hs.check"]))
    assert await recv_message(ws, 3) == Ack(1, 0, 0)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout)
    return data, time.monotonic() - start


# subprotocol


def test_no_subprotocol_is_refused_with_400_naming_broker_v1():
    async def main():
        async with serving() as server:
            status, body = await refused(url(server))
            assert status == 400
            assert SUBPROTOCOL.encode() in body
            assert b"no Sec-WebSocket-Protocol" in body
            assert server.handshakes_refused == 1
            assert server.connections == {}

    run(main())


def test_wrong_subprotocol_only_is_refused_with_400():
    async def main():
        async with serving() as server:
            for offered in (["broker.v2"], ["chat", "mqtt"], ["broker.v10"], ["Broker.V1"], ["broker.v1x"]):
                status, body = await refused(url(server), subprotocols=offered)
                assert status == 400
                assert SUBPROTOCOL.encode() in body
                assert offered[0].encode() in body  # says what was offered
            assert server.handshakes_refused == 5
            assert server.connections == {}
            # refusals leave the server serving
            async with websockets.connect(url(server), subprotocols=[SUBPROTOCOL]) as ws:
                await works(ws)

    run(main())


def test_several_subprotocols_including_broker_v1_selects_it():
    async def main():
        async with serving() as server:
            for offered in (["chat", SUBPROTOCOL, "broker.v2"], [SUBPROTOCOL, "broker.v2"], ["broker.v0", SUBPROTOCOL]):
                async with websockets.connect(url(server), subprotocols=offered) as ws:
                    assert ws.subprotocol == SUBPROTOCOL
                    assert ws.response.status_code == 101
                    assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == [SUBPROTOCOL]
                    await works(ws)
            assert server.handshakes_refused == 0

    run(main())


def test_subprotocol_offered_on_separate_header_lines_is_accepted():
    async def main():
        async with serving() as server:
            request = upgrade_request("/", ["chat", f"broker.v2, {SUBPROTOCOL}"])
            status, headers, _, writer = await send_upgrade(server.port, request)
            try:
                assert status == 101
                assert headers["sec-websocket-protocol"] == [SUBPROTOCOL]
            finally:
                writer.close()
            assert server.handshakes_refused == 0

    run(main())


def test_broker_client_connects():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as client:
                sub = await client.subscribe("hs.x")
                ack = await client.publish_acked("hs.x", b"1")
                assert (await sub.next(3)).seq == ack.seq == 1

    run(main())


# path


def test_wrong_path_is_refused_with_404():
    async def main():
        async with serving() as server:
            base = f"ws://127.0.0.1:{server.port}"
            for path in ("/nope", "/v1", "//", "/index.html?x=1"):
                status, body = await refused(base + path, subprotocols=[SUBPROTOCOL])
                assert status == 404, path
                assert path.split("?")[0].encode() in body
                assert b"connect to /" in body
            assert server.handshakes_refused == 4
            assert server.connections == {}

    run(main())


def test_query_string_on_the_right_path_is_accepted():
    async def main():
        async with serving() as server:
            for query in ("?token=abc", "?a=1&b=2", "?"):
                async with websockets.connect(url(server) + query, subprotocols=[SUBPROTOCOL]) as ws:
                    assert ws.subprotocol == SUBPROTOCOL
                    await works(ws)
            assert server.handshakes_refused == 0

    run(main())


def test_configured_path():
    async def main():
        async with serving(path="/feed") as server:
            base = f"ws://127.0.0.1:{server.port}"
            for path in ("/feed", "/feed?x=1"):
                async with websockets.connect(base + path, subprotocols=[SUBPROTOCOL]) as ws:
                    await works(ws)
            for path in ("/", "/feed/x", "/feedx", "/Feed"):
                status, body = await refused(base + path, subprotocols=[SUBPROTOCOL])
                assert status == 404, path
                assert b"/feed" in body
            assert server.handshakes_refused == 4

    run(main())


def test_wrong_path_is_checked_before_subprotocol():
    async def main():
        async with serving() as server:
            status, _ = await refused(f"ws://127.0.0.1:{server.port}/nope")
            assert status == 404
            assert server.handshakes_refused == 1

    run(main())


@pytest.mark.parametrize("path", ["//evil/", "//evil/?x=1", "//127.0.0.1/"])
def test_path_with_a_double_slash_is_refused_with_404(path):
    """The request path must equal the configured path exactly: `//evil/` is not `/`."""

    async def main():
        async with serving() as server:
            status, _, _, writer = await send_upgrade(server.port, upgrade_request(path, [SUBPROTOCOL]))
            writer.close()
            assert status == 404
            assert server.handshakes_refused == 1
            assert server.connections == {}

    run(main())


# the order of the checks (docs/protocol.md 1.1)

SECRET = "order-test-secret-of-32-bytes-min"


def breaking(
    *, path="/x", method="POST", version="8", protocols=(), origin="https://evil.example", user=None, upgrade=False, head_bytes=0
) -> bytes:
    """An upgrade request that breaks, by default, every rule a request can break: path,
    WebSocket version, subprotocol, Origin, method, the Upgrade header, the token."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        f"Sec-WebSocket-Version: {version}",
    ]
    if upgrade:
        lines.append("Upgrade: websocket")
    lines += [f"Sec-WebSocket-Protocol: {p}" for p in protocols]
    lines.append(f"Origin: {origin}")
    if user is not None:
        claims = {"sub": user, "exp": int(time.time()) + 60, "subscribe": [">"], "publish": [">"]}
        lines.append(f"Authorization: Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}")
    if head_bytes:
        lines.append("X-Padding: " + "p" * head_bytes)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer(port: int, request: bytes, source: str = "127.0.0.1") -> tuple[int, str, asyncio.StreamWriter]:
    """The status and body the server answers `request` with, sent from `source`, and the
    connection's writer (still open after a 101)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    status = int(head.split(b" ")[1])
    body = b"" if status == 101 else await asyncio.wait_for(reader.read(), 3)
    return status, body.decode(), writer


def test_with_several_rules_broken_the_first_in_the_documented_order_answers():
    """Requests that break several rules at once, through the real server: each is answered
    for the first rule it breaks in the order of protocol.md 1.1. Mending the rules one at a
    time walks the whole order: the limits at accept, the head, path, version, subprotocol,
    Origin, method, upgrade, token, the limit per user."""

    async def main():
        async with serving(auth_jwt_secret=SECRET, allowed_origins="https://app.example", max_connections_per_user=1) as server:
            ladder = [
                ({"head_bytes": 17_000}, 431, "the request head is longer than 16384 bytes"),
                ({"head_bytes": 0}, 404, "no WebSocket endpoint at /x; connect to /"),
                ({"path": "/"}, 426, "unsupported WebSocket version 8; use 13"),
                ({"version": "13"}, 400, "unsupported protocol version (no Sec-WebSocket-Protocol header); this server speaks broker.v1"),
                ({"protocols": [SUBPROTOCOL]}, 403, "origin https://evil.example is not allowed (allowed_origins)"),
                ({"origin": "https://app.example"}, 405, "method POST is not allowed; a WebSocket upgrade is a GET"),
                ({"method": "GET"}, 400, "missing 'Upgrade: websocket' header"),
                ({"upgrade": True}, 401, "a token is required"),
                ({"user": "alice"}, 101, ""),
                ({}, 429, "user 'alice' has 1 connection, the limit (max_connections_per_user)"),  # alice's first stays open
            ]
            mended: dict = {}
            writers = []
            for fix, status, text in ladder:
                mended.update(fix)
                got_status, body, writer = await answer(server.port, breaking(**mended), "127.0.0.2")
                writers.append(writer)
                assert (got_status, body[: len(text)]) == (status, text), fix
            for writer in writers:
                writer.close()
        # the limits on connections come first of all, at accept: before the head is read
        async with serving(auth_jwt_secret=SECRET, max_connections_per_ip=1, handshake_timeout_s=1) as server:
            _, quiet = await asyncio.open_connection("127.0.0.1", server.port)
            await eventually(lambda: server.guard.per_ip.get("127.0.0.1") == 1, 3, "the first connection counted")
            status, body, writer = await answer(server.port, breaking())
            assert (status, body) == (429, "1 connection from 127.0.0.1, the limit (max_connections_per_ip)\n")
            writer.close()
            quiet.close()

    run(main())


# handshake timeout and garbage


@pytest.mark.parametrize(
    "sent",
    [b"", upgrade_request("/", [SUBPROTOCOL])[:-4]],  # silent; a request whose blank line never comes
    ids=["silent", "incomplete-request"],
)
def test_client_that_never_completes_the_handshake_is_disconnected_after_the_timeout(sent):
    async def main():
        async with serving(handshake_timeout_s=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(sent)
                data, elapsed = await read_to_eof(reader, 2.0)
            finally:
                writer.close()
            assert data == b""
            assert 0.2 <= elapsed < 2.0
            assert server.connections == {}

    run(main())


def test_handshake_timeout_does_not_affect_connected_clients():
    async def main():
        async with serving(handshake_timeout_s=0.3) as server:
            async with Client(url(server)) as sub_client, Client(url(server)) as pub_client:
                sub = await sub_client.subscribe("hs.t")
                await asyncio.sleep(0.5)
                ack = await pub_client.publish_acked("hs.t", b"late")
                message = await sub.next(3)
                assert (message.seq, message.data) == (ack.seq, b"late")
                assert not sub_client.closed and len(server.connections) == 2

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage\r\n\r\n",
        b"\x00\x01\x02\xff\xfe\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nthis is not a header\r\n\r\n",
    ],
    ids=["text", "binary", "short-request-line", "bad-header"],
)
def test_garbage_instead_of_http_is_refused_and_disconnected(garbage):
    async def main():
        async with serving(handshake_timeout_s=5.0) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(garbage)
                data, elapsed = await read_to_eof(reader, 2.0)
            finally:
                writer.close()
            # refused at once (not by the 5 s handshake timeout) with an HTTP error
            assert elapsed < 1.0
            assert data.startswith(b"HTTP/1.1 400")
            assert server.connections == {}
            async with websockets.connect(url(server), subprotocols=[SUBPROTOCOL]) as ws:
                await works(ws)

    run(main())


def test_binary_garbage_without_line_end_is_disconnected_after_handshake_timeout():
    async def main():
        async with serving(handshake_timeout_s=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                # what a TLS client sends first: no HTTP, no CRLF CRLF
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)))
                data, elapsed = await read_to_eof(reader, 2.0)
            finally:
                writer.close()
            assert data == b""
            assert elapsed < 2.0
            assert server.connections == {}

    run(main())


def _without(request: bytes, header: bytes) -> bytes:
    return b"".join(line for line in request.splitlines(keepends=True) if not line.lower().startswith(header.lower()))


@pytest.mark.parametrize(
    "request_bytes",
    [
        _without(upgrade_request("/", [SUBPROTOCOL]), b"Upgrade:"),
        _without(upgrade_request("/", [SUBPROTOCOL]), b"Sec-WebSocket-Key:"),
        _without(upgrade_request("/", [SUBPROTOCOL]), b"Sec-WebSocket-Version:"),
        upgrade_request("/", [SUBPROTOCOL]).replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
    ],
    ids=["no-upgrade-header", "no-key", "no-version", "version-8"],
)
def test_malformed_upgrade_request_is_refused(request_bytes):
    """RFC 6455 4.2.1/4.2.2: an upgrade request the server cannot honour gets an HTTP error
    (426 with Sec-WebSocket-Version: 13 for an unsupported version), never 101."""

    async def main():
        async with serving() as server:
            status, headers, _, writer = await send_upgrade(server.port, request_bytes)
            writer.close()
            assert status in (400, 426), (status, headers)
            await eventually(lambda: not server.connections, 2.0, "connections to close")

    run(main())


@pytest.mark.parametrize(
    "request_bytes, status, header",
    [
        (upgrade_request("/", [SUBPROTOCOL]).replace(b"GET / ", b"POST / "), 405, ("allow", ["GET"])),
        (upgrade_request("/", [SUBPROTOCOL]).replace(b"HTTP/1.1", b"HTTP/1.0"), 400, None),
        (upgrade_request("/", [SUBPROTOCOL]).replace(b"Upgrade: websocket", b"Upgrade: h2c"), 400, None),
        (upgrade_request("/", [SUBPROTOCOL]).replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400, None),
        (
            _without(upgrade_request("/", [SUBPROTOCOL]), b"Sec-WebSocket-Key:").replace(
                b"\r\n\r\n", b"\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n"
            ),
            400,
            None,
        ),
        (upgrade_request("/", [SUBPROTOCOL]).replace(b"\r\n\r\n", b"\r\nX-Padding: " + b"p" * (20 << 10) + b"\r\n\r\n"), 431, None),
    ],
    ids=["post", "http-1.0", "upgrade-h2c", "no-upgrade-token", "short-key", "head-over-16-kib"],
)
def test_upgrade_request_that_breaks_rfc_6455_gets_the_documented_status(request_bytes, status, header):
    """protocol.md 1.1: the checks of RFC 6455 4.2.1 after the broker's own, each with its status."""

    async def main():
        async with serving() as server:
            got, headers, _, writer = await send_upgrade(server.port, request_bytes)
            writer.close()
            assert got == status, headers
            if header is not None:
                assert headers[header[0]] == header[1]
            assert headers["connection"] == ["close"] and headers["content-type"][0].startswith("text/plain")
            await eventually(lambda: not server.connections, 2.0, "connections to close")
            assert server.handshakes_refused == 1

    run(main())


# upgrade request headers


def test_browser_connection_header_with_several_tokens_is_accepted():
    """Firefox sends `Connection: keep-alive, Upgrade`; that is an upgrade request."""
    request = upgrade_request("/", [SUBPROTOCOL]).replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade")
    assert b"Connection: keep-alive, Upgrade\r\n" in request

    async def main():
        async with serving() as server:
            status, headers, reader, writer = await send_upgrade(server.port, request)
            try:
                assert status == 101
                assert headers["sec-websocket-protocol"] == [SUBPROTOCOL]
                # and the connection speaks the protocol
                writer.write(client_frame(0x2, pack(["sub", 1, "ff.t"])))
                data = b""
                while (split := split_frame(data)) is None:
                    data += await asyncio.wait_for(reader.read(4096), 3)
                opcode, payload, _ = split
                assert opcode == 0x2
                assert decode_server_frame(payload) == [Ack(1, 0, 0)]
                assert server.handshakes_refused == 0
            finally:
                writer.close()

    run(main())


def test_unsupported_websocket_version_gets_426_naming_13():
    """RFC 6455 4.4: an unsupported version gets 426 with `Sec-WebSocket-Version: 13`."""
    request = upgrade_request("/", [SUBPROTOCOL]).replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")

    async def main():
        async with serving() as server:
            status, headers, _, writer = await send_upgrade(server.port, request)
            writer.close()
            assert status == 426
            assert headers["sec-websocket-version"] == ["13"]
            assert server.connections == {}

    run(main())
