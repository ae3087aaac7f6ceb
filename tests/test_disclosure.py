"""What the broker must not give away (docs/security.md, Audit log): a token is never quoted
back in a refusal or written to a log; the topic a client was refused and the payloads it sent
are not logged, nor kept in dead letters; and a value a client chose cannot split a log record
or pose as another field."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import jwt
import msgspec

from broker.errors import ErrorCode
from broker.letterhead import dead_letter_head
from broker.messages import SUBPROTOCOL, Ack, Err, Pub, Req, Sub, encode
from broker.server import logs
from conftest import Harness, RawSocketClient, client_frame, run, send_upgrade, serving, upgrade_request

SECRET = "s3cret-for-tests-only-32-bytes!!"


def token(**claims) -> str:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", int(time.time()) + 60)
    claims.setdefault("subscribe", [">"])
    claims.setdefault("publish", [">"])
    return jwt.encode(claims, SECRET, algorithm="HS256")


def text_lines(records) -> list[str]:
    """The records as the text log writes them, each split at its line breaks."""
    formatter = logs.TextFormatter()
    return [line for record in records for line in formatter.format(record).split("\n")]


def test_no_handshake_refusal_quotes_a_token_back(caplog):
    """A token where the broker does not look for one (Bearer. in a subprotocol entry without
    broker.v1, an Authorization header written without its colon) is refused without quoting
    it, in the response and in the audit log; Bearer. in any case is a token source."""
    secret = token()
    signature = secret.rsplit(".", 1)[1]

    async def main():
        async with serving(auth_jwt_secret=SECRET, log_level="info") as server:
            bodies = []
            for request in (
                upgrade_request("/", [f"Bearer.{secret}"]),
                upgrade_request("/", [f"bearer.{secret}", "chat"]),
                upgrade_request("/", ["broker.v2", secret]),
                upgrade_request("/", [SUBPROTOCOL], {f"Authorization Bearer {secret}": "x"}),
                upgrade_request(f"/{secret}", [SUBPROTOCOL]),
            ):
                status, headers, reader, writer = await send_upgrade(server.port, request)
                bodies.append((status, await reader.read()))
                writer.close()
            status, _, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL, f"Bearer.{secret}"]))
            writer.close()
            assert status == 101  # the capital B is a token source too
            return bodies

    with caplog.at_level(logging.INFO, logger="broker"):
        bodies = run(main())
    assert [status for status, _ in bodies] == [400, 400, 400, 400, 404]
    assert b"(offered broker.v2, 1 other entry not shown)" in bodies[2][1]
    assert b"(offered a bearer token entry only)" in bodies[0][1]
    assert b"(offered chat)" in bodies[1][1]
    for _, body in bodies:
        assert signature.encode() not in body and secret[:40].encode() not in body, body
    lines = text_lines(caplog.records)
    assert sum("handshake_refused" in line for line in lines) == 5
    assert not any(signature in line or secret[:40] in line for line in lines)


def test_refused_topics_payloads_and_tokens_are_not_logged_or_kept(caplog):
    """A client with narrow grants subscribes, publishes and asks where it may not, and sends
    messages that cannot be decoded: each gets its error (naming its topic, to that client
    only); the audit log says who tried what kind of thing, the dead letters keep the type, id
    and topic of bad messages, and neither holds a refused topic, a payload or a token."""
    secret = token(sub="mallory")

    async def main():
        async with serving(auth_jwt_secret=SECRET, log_level="info") as server:
            narrow = token(sub="mallory", subscribe=["md.NASDAQ.*"], publish=["orders.mallory.>"])
            client = await RawSocketClient.connect(server.port, headers={"Authorization": f"Bearer {narrow}"})
            try:
                await client.send(Sub(1, "md.NYSE.SECRET"))
                await client.send(Pub(2, "md.NYSE.SECRET", b"PAYLOAD-MARK"))
                await client.send(Req(3, "svc.SECRET", b"PAYLOAD-MARK"))
                replies = [await client.recv() for _ in range(3)]
                assert [(r.id, r.code) for r in replies] == [(i, ErrorCode.FORBIDDEN) for i in (1, 2, 3)]
                assert "md.NYSE.SECRET" in replies[0].text  # the client is told what it was refused
                # undecodable: a payload in a str, a token after a bad id, a bare payload
                await client.send(["pub", 4, "orders.mallory.x", "PAYLOAD-MARK"])
                await client.send(["auth", -1, secret])
                await client.loop.sock_sendall(client.sock, client_frame(0x2, b"PAYLOAD-MARK"))
                await client.send(Pub(5, "orders.mallory.*", b"PAYLOAD-MARK"))  # refused: a pattern
                replies = [await client.recv() for _ in range(4)]
                assert all(isinstance(r, Err) for r in replies)
                assert server.router.stats.denied == 3
                server.write_dead_letters()
                return list(server.router.requests.dead_letters)
            finally:
                client.close()

    with caplog.at_level(logging.INFO, logger="broker"):
        letters = run(main())
    assert [letter.request_id for letter in letters] == [4, 0, 0, 5]
    heads = [bytes.fromhex(letter.head) for letter in letters]
    assert heads[0] == b"\x94" + msgspec.msgpack.encode(["pub", 4, "orders.mallory.x"])[1:]
    assert heads[1] == b"\x93" + msgspec.msgpack.encode(["auth", -1])[1:]
    assert heads[2] == b"P"
    assert heads[3][1:] == msgspec.msgpack.encode(["pub", 5, "orders.mallory.*"])[1:]
    lines = text_lines(caplog.records)
    denied = [line for line in lines if "event=permission_denied" in line]
    assert (
        len(denied) == 3
        and "action=subscribe id=1" in denied[0]
        and "action=publish id=2" in denied[1]
        and "action=request id=3" in denied[2]
    )
    assert all("user=mallory" in line for line in denied)
    assert sum("event=dead_letter " in line for line in lines) == 4
    signature = secret.rsplit(".", 1)[1]
    for line in lines:
        assert "SECRET" not in line and "PAYLOAD-MARK" not in line and signature not in line, line
        assert b"PAYLOAD-MARK".hex() not in line, line
    for letter in letters:
        assert "SECRET" not in letter.reason and b"PAYLOAD" not in bytes.fromhex(letter.head)


def test_a_dead_letter_keeps_no_more_than_the_fields_before_a_payload():
    """Every kind of head, at once and without decoding the rest of a frame, however long."""
    pack = msgspec.msgpack.encode
    assert dead_letter_head(pack(["pub", 7, "t", "text, not bin"])) == b"\x94" + pack(["pub", 7, "t"])[1:]
    assert dead_letter_head(pack(["req", 1, "svc.x", b"data", 5])) == b"\x95" + pack(["req", 1, "svc.x"])[1:]
    assert dead_letter_head(pack(["auth", 3, "eyJhbGciOiJIUzI1NiJ9.e30.sig"])) == b"\x93" + pack(["auth", 3])[1:]
    assert dead_letter_head(pack(["reply", 3, b"payload"])) == b"\x93" + pack(["reply", 3])[1:]
    assert dead_letter_head(pack(["login", 3, "password"])) == b"\x93" + pack(["login", 3])[1:]
    assert dead_letter_head(pack([["pub", 1, "a.b", b"x"], ["pub", 2, "c", b"y"]])) == b"\x92\x94" + pack(["pub", 1, "a.b"])[1:]
    assert dead_letter_head(pack(["pub", 1, "t" * 300, b"x"])) == b"\x94" + pack(["pub", 1, "t" * 300])[1:32]
    assert dead_letter_head(pack(["pub", 1, b"topic as bin"])) == b"\x93" + pack(["pub", 1])[1:]
    assert dead_letter_head(b"\xc1\x00garbage") == b"\xc1"
    assert dead_letter_head(b"") == b""
    huge = pack(["pub", 1, "t", b"x"] + [0] * 1_000_000)
    started = time.perf_counter()
    assert dead_letter_head(huge) == b"\xdd\x00\x0f\x42\x44" + pack(["pub", 1, "t"])[1:]
    assert time.perf_counter() - started < 0.01


def test_refused_publishes_in_the_sans_io_core_keep_only_their_head():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Pub(9, "md.*", b"PAYLOAD-MARK")))
    s.receive(msgspec.msgpack.encode(["pub", 8, "t", "PAYLOAD-MARK"]))
    h.tick()
    for letter in h.router.requests.dead_letters:
        assert b"PAYLOAD" not in bytes.fromhex(letter.head)


def test_a_field_a_client_chose_cannot_split_a_text_record_or_pose_as_another_field():
    record = logging.LogRecord("broker", logging.INFO, __file__, 1, "disconnect", None, None)
    record.fields = {
        "conn": 1,
        "reason": "bye\nts=2026 level=warning event=forged",
        "peer": "a\rb",
        "user": "eve\u2028x",
        "path": "/x\x1b[2J",
        "quote": 'say "hi"',
        "back": "a\\nb",
        "plain": "ok-1.2:3",
    }
    line = logs.TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x1b" not in line
    assert line.endswith(' back="a\\\\nb" plain=ok-1.2:3')
    assert ' reason="bye\\nts=2026 level=warning event=forged" ' in line
    as_json = json.loads(logs.JsonFormatter().format(record))
    assert as_json["reason"] == record.fields["reason"]


def test_a_newline_in_a_client_close_reason_stays_in_its_disconnect_record(caplog):
    async def main():
        async with serving(log_level="info") as server:
            client = await RawSocketClient.connect(server.port)
            await client.send(Sub(1, "x"))
            assert isinstance(await client.recv(), Ack)
            reason = b"bye\nforged-record"  # no space, quote or =: the old rule left it bare
            await client.loop.sock_sendall(client.sock, client_frame(0x8, (1000).to_bytes(2, "big") + reason))
            while True:
                try:
                    await client._fill()
                except ConnectionError:
                    break
            client.close()
            deadline = time.monotonic() + 3
            while not any(r.getMessage() == "disconnect" for r in caplog.records):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="broker"):
        run(main())
    lines = text_lines(caplog.records)
    assert all(line.startswith("ts=") for line in lines), lines
    (line,) = [line for line in lines if "event=disconnect" in line]
    assert 'reason="bye\\nforged-record"' in line
