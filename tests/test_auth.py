"""Authentication and topic grants (docs/security.md): every handshake rule without sockets,
every kind of bad token, each token source and key kind, then on a real server the grant that
must not leak, token expiry and refresh, revocation of open connections, and `auth`."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.auth import Authenticator, Grants
from broker.client import Client
from broker.errors import BrokerError, ConnectionClosed, ErrorCode
from broker.messages import SUBPROTOCOL, Ack, Auth, Delivery, Err, Hb, Pub, Reply, Req, Request, Sub, Unsub, encode
from broker.server.handshake import HandshakeError, Rules, parse_request
from broker.settings import load
from conftest import RawSocketClient, client_frame, eventually, run, send_upgrade, serving, upgrade_request, url

SECRET = "s3cret-for-tests-only-32-bytes!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def token(key=SECRET, alg="HS256", headers=None, **claims) -> str:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", int(time.time()) + 60)
    claims.setdefault("subscribe", [">"])
    claims.setdefault("publish", [">"])
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def authenticator(**settings) -> Authenticator:
    settings.setdefault("auth_jwt_secret", SECRET)
    return Authenticator(load(settings, environ={}))


def request(path="/", protocols=(SUBPROTOCOL,), headers=None):
    head = upgrade_request(path, list(protocols), headers)
    return parse_request(head[: head.index(b"\r\n\r\n")])


def refused(rules: Rules, req, closing=False) -> tuple[int, str]:
    with pytest.raises(HandshakeError) as info:
        rules.check(req, closing)
    return info.value.status, info.value.text


# the handshake's rules, without sockets


def test_every_handshake_rule_in_its_order():
    rules = Rules("/", SUBPROTOCOL, authenticator(), frozenset({"https://app.example"}))
    good = {"Authorization": f"Bearer {token()}"}
    assert refused(rules, request("/x", headers=good)) == (404, "no WebSocket endpoint at /x; connect to /")
    assert refused(rules, request(headers=good), closing=True)[0] == 503
    bad_version = request(headers=good)
    bad_version.headers["sec-websocket-version"] = ["8"]
    assert refused(rules, bad_version)[0] == 426
    assert refused(rules, request(protocols=(), headers=good))[0] == 400
    assert (
        refused(rules, request(protocols=("broker.v2", f"bearer.{token()}"), headers=good))[1]
        == "unsupported protocol version (offered broker.v2); this server speaks broker.v1"
    )
    assert refused(rules, request(headers={**good, "Origin": "https://evil.example"})) == (
        403,
        "origin https://evil.example is not allowed (allowed_origins)",
    )
    no_upgrade = request(headers=good)
    del no_upgrade.headers["upgrade"]
    assert refused(rules, no_upgrade)[0] == 400
    with pytest.raises(HandshakeError) as info:
        rules.check(request())
    assert info.value.status == 401 and info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert "a token is required" in info.value.text
    accepted = rules.check(request(headers={**good, "Origin": "https://app.example"}))
    assert accepted.identity.user == "alice" and accepted.identity.grants == Grants((">",), (">",))
    assert rules.check(request(headers=good)).identity.user == "alice"  # no Origin: not a browser


def test_without_a_key_everyone_is_let_in_unrestricted():
    rules = Rules("/", SUBPROTOCOL, Authenticator(load({}, environ={})))
    identity = rules.check(request()).identity
    assert identity.user is None and identity.grants is None and identity.expires is None


def scoped(**claims) -> str:
    """A token for a server that checks aud "broker" and iss "issuer"."""
    claims.setdefault("aud", "broker")
    claims.setdefault("iss", "issuer")
    key = claims.pop("key", SECRET)
    alg = claims.pop("alg", "HS256")
    return token(key, alg, **claims)


BAD_TOKENS = {
    "expired": (lambda: scoped(exp=int(time.time()) - 3600), "token expired"),
    "not yet valid": (lambda: scoped(nbf=int(time.time()) + 3600), "token not yet valid (nbf)"),
    "issued in the future": (lambda: scoped(iat=int(time.time()) + 3600), "token issued in the future (iat)"),
    "iat not a number": (lambda: scoped(iat="yesterday"), "invalid token"),
    "nbf not a number": (lambda: scoped(nbf="tomorrow"), "invalid token"),
    "wrong audience": (lambda: scoped(aud="other"), "token audience does not match"),
    "wrong issuer": (lambda: scoped(iss="someone-else"), "token issuer does not match"),
    "no exp": (lambda: scoped(exp=None), "token lacks the exp claim"),
    "alg none": (
        lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "aud": "broker", "iss": "issuer"}, None, algorithm="none"),
        "token algorithm 'none' is not accepted",
    ),
    "bad signature": (lambda: scoped(key="another-secret-of-32-bytes-long!"), "bad token signature"),
    "malformed": (lambda: "not.a.jwt", "malformed token"),
    "garbage": (lambda: "%%%", "malformed token"),
    "oversized": (lambda: scoped(pad="x" * 9000), "token longer than 8192 bytes"),
    "RS256 unknown here": (lambda: scoped(key=RSA_KEY, alg="RS256"), "no key accepts RS256 tokens"),
    "bad grant": (lambda: scoped(subscribe=["md..x"]), "the subscribe claim holds an invalid pattern 'md..x'"),
    "grant not a list": (
        lambda: scoped(publish={"a": 1}),
        'the publish claim must be a list of topic patterns, or {"allow": [...], "deny": [...]}',
    ),
    "bad deny": (lambda: scoped(subscribe={"allow": [">"], "deny": ["a..b"]}), "the subscribe claim holds an invalid pattern 'a..b'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_bad_token_is_refused_at_the_handshake_with_its_reason(case):
    make, reason = BAD_TOKENS[case]
    rules = Rules("/", SUBPROTOCOL, authenticator(auth_audience="broker", auth_issuer="issuer", auth_leeway_s=5))
    assert rules.check(request(headers={"Authorization": f"Bearer {scoped()}"})).identity.user == "alice"
    bad = make()
    status, text = refused(rules, request(headers={"Authorization": f"Bearer {bad}"}))
    assert (status, text) == (401, reason)
    assert bad not in text


def test_a_token_is_checked_in_the_order_security_md_states(tmp_path):
    """A token that breaks every rule, mended one rule at a time: each refusal names the first
    rule still broken, in the order of security.md (length, header, algorithm, key,
    signature, exp present, iat, nbf, exp passed, iss, aud, revocation, grant claims)."""
    from broker.auth import AuthError

    denylist = tmp_path / "denied.txt"
    denylist.write_text("t-revoked\n")
    checker = authenticator(auth_audience="broker", auth_issuer="issuer", auth_leeway_s=5, auth_denylist_file=str(denylist))
    now = int(time.time())
    good = {"aud": "broker", "iss": "issuer", "exp": now + 60, "iat": now, "jti": "t-ok"}
    broken = {
        "pad": "x" * 9000,
        "alg": "none",
        "key": RSA_KEY,
        "signed": "another-secret-of-32-bytes-long!",
        "exp": None,
        "iat": now + 3600,
        "nbf": now + 3600,
        "expired": now - 3600,
        "iss": "someone-else",
        "aud": "other",
        "jti": "t-revoked",
        "subscribe": ["md..x"],
    }
    steps = [
        ("pad", "token longer than 8192 bytes"),
        ("alg", "token algorithm 'none' is not accepted"),
        ("key", "no key accepts RS256 tokens"),
        ("signed", "bad token signature"),
        ("exp", "token lacks the exp claim"),
        ("iat", "token issued in the future (iat)"),
        ("nbf", "token not yet valid (nbf)"),
        ("expired", "token expired"),
        ("iss", "token issuer does not match"),
        ("aud", "token audience does not match"),
        ("jti", "token revoked"),
        ("subscribe", "the subscribe claim holds an invalid pattern 'md..x'"),
    ]

    def make(faults: dict) -> str:
        claims = {**good, **{k: v for k, v in faults.items() if k in ("pad", "iat", "nbf", "iss", "aud", "jti", "subscribe")}}
        if "exp" in faults:
            claims["exp"] = None  # (token() leaves out a claim given as None)
        elif "expired" in faults:
            claims["exp"] = faults["expired"]
        if "alg" in faults:
            return jwt.encode(claims, None, algorithm="none")
        if "key" in faults:
            return token(RSA_KEY, "RS256", **claims)
        return token(faults.get("signed", SECRET), **claims)

    for fault, reason in steps:
        with pytest.raises(AuthError) as info:
            checker.verify(make(broken))
        assert info.value.text == reason, fault
        del broken[fault]
    assert checker.verify(make(broken)).user == "alice"


def test_algorithm_confusion_hs256_signed_with_the_public_key_is_refused():
    """With an RSA public key configured (and no secret), a token that claims HS256 and is
    signed with the PEM of that public key must not pass."""
    import hashlib
    import hmac

    path = _write(pem(RSA_KEY))
    rules = Rules("/", SUBPROTOCOL, Authenticator(load({"auth_jwt_public_key_file": path}, environ={})))
    assert rules.check(request(headers={"Authorization": f"Bearer {token(RSA_KEY, 'RS256')}"})).identity.user == "alice"
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60, "subscribe": [">"]}).encode())
    signature = _b64(hmac.new(pem(RSA_KEY), f"{header}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{body}.{signature}"
    assert refused(rules, request(headers={"Authorization": f"Bearer {forged}"})) == (401, "no key accepts HS256 tokens")


def test_es256_keys_and_a_jwks_file_read_again_when_it_changes(tmp_path):
    ec_path = _write(pem(EC_KEY))
    rules = Rules("/", SUBPROTOCOL, Authenticator(load({"auth_jwt_public_key_file": ec_path}, environ={})))
    assert rules.check(request(headers={"Authorization": f"Bearer {token(EC_KEY, 'ES256')}"})).identity.user == "alice"
    assert refused(rules, request(headers={"Authorization": f"Bearer {token(RSA_KEY, 'RS256')}"}))[0] == 401
    jwks = tmp_path / "keys.json"
    jwks.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "k1", "RS256")]}))
    auth = Authenticator(load({"auth_jwks_file": str(jwks)}, environ={}))
    rules = Rules("/", SUBPROTOCOL, auth)
    assert (
        rules.check(request(headers={"Authorization": f"Bearer {token(RSA_KEY, 'RS256', headers={'kid': 'k1'})}"})).identity.user == "alice"
    )
    newer = token(EC_KEY, "ES256", headers={"kid": "k2"})
    assert refused(rules, request(headers={"Authorization": f"Bearer {newer}"})) == (401, "no key accepts ES256 tokens with kid 'k2'")
    jwks.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "k1", "RS256"), _jwk(EC_KEY, "k2", "ES256")]}))
    auth.refresh()
    assert rules.check(request(headers={"Authorization": f"Bearer {newer}"})).identity.user == "alice"


def test_each_token_source_and_only_the_configured_ones():
    good = token()
    rules = Rules("/", SUBPROTOCOL, authenticator())  # default: header, subprotocol
    assert rules.check(request(headers={"Authorization": f"Bearer {good}"})).identity.user == "alice"
    assert rules.check(request(protocols=(SUBPROTOCOL, f"bearer.{good}"))).identity.user == "alice"
    assert refused(rules, request(path=f"/?token={good}"))[0] == 401
    assert refused(rules, request(headers={"Authorization": f"Basic {good}"})) == (401, "the Authorization header must be 'Bearer <token>'")
    rules = Rules("/", SUBPROTOCOL, authenticator(auth_token_sources="query", auth_query_param="jwt"))
    assert rules.check(request(path=f"/?a=1&jwt={good}")).identity.user == "alice"
    assert refused(rules, request(headers={"Authorization": f"Bearer {good}"}))[0] == 401


def test_anonymous_access_is_explicit_and_has_its_own_grants():
    rules = Rules("/", SUBPROTOCOL, authenticator(auth_anonymous=True, auth_anonymous_subscribe="public.>"))
    identity = rules.check(request()).identity
    assert identity.user is None and identity.grants == Grants(("public.>",), ())
    assert refused(Rules("/", SUBPROTOCOL, authenticator()), request())[0] == 401


def test_grants_narrow_a_wider_subscription_to_their_intersection():
    grants = Grants(("md.NASDAQ.*", "news.>"), ("orders.alice.>",))
    assert grants.subscriptions_for("md.>") == ["md.NASDAQ.*"]
    assert grants.subscriptions_for(">") == ["md.NASDAQ.*", "news.>"]
    assert grants.subscriptions_for("md.NYSE.*") == []
    assert grants.may_publish("orders.alice.1") and not grants.may_publish("orders.bob.1")


def test_rights_allow_less_deny_and_narrow_subscriptions_to_what_they_grant():
    from broker.grants import NOTHING, Rights, rights_of

    rights = rights_of({"allow": ["md.>", "news.>"], "deny": ["md.INTERNAL.>", "md.*.SECRET"]}, "subscribe")
    assert rights.allows("md.NYSE.X") and not rights.allows("md.INTERNAL.X") and not rights.allows("md.NYSE.SECRET")
    assert rights.narrow("md.>") == ["md.> !md.*.SECRET !md.INTERNAL.>"]
    assert rights.narrow("md.NYSE.*") == ["md.NYSE.* !md.NYSE.SECRET"]
    assert rights.narrow("md.INTERNAL.>") == [] and rights.narrow("md.INTERNAL.X") == [] and rights.narrow("md.NYSE.SECRET") == []
    assert rights.narrow("md.NYSE.X") == ["md.NYSE.X"] and rights.narrow(">") == ["md.> !md.*.SECRET !md.INTERNAL.>", "news.>"]
    assert rights_of(["a.>"], "publish") == Rights(("a.>",)) and rights_of(None, "respond") is None
    assert rights_of({"deny": ["a"]}, "publish").narrow(">") == []  # deny alone grants nothing
    history = Rights(("md.>",), ("md.INTERNAL.>",))
    assert history.covers("md.> !md.INTERNAL.>") and history.covers("md.NYSE.X") and history.covers("md.NYSE.*")
    assert not history.covers("md.>") and not history.covers("news.>") and not history.covers("md.> !md.INTERNAL.X")
    # the history and respond rights follow subscribe unless given
    grants = Grants(rights, NOTHING)
    assert grants.may_recover(rights.narrow("md.>")) and grants.may_respond("md.NYSE.X") and not grants.may_respond("md.INTERNAL.X")
    grants = Grants(rights, NOTHING, Rights(("md.NASDAQ.*",)), NOTHING)
    assert grants.may_recover(["md.NASDAQ.*"]) and not grants.may_recover(["md.NASDAQ.*", "news.>"])
    assert not grants.may_respond("md.NYSE.X")


# on a real server
# on a real server


def auth_headers(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def test_a_grant_narrower_than_the_subscription_never_leaks_and_publishes_are_checked_on_every_path():
    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            feed = await Client.connect(url(server), token=token(sub="feed"))
            narrow = await RawSocketClient.connect(
                server.port, headers=auth_headers(token(sub="bob", subscribe=["md.NASDAQ.*"], publish=["orders.bob.>"]))
            )
            try:
                await narrow.send(Sub(1, "md.>"))
                assert isinstance(await narrow.recv(), Ack)
                for i in range(3):
                    await feed.publish_acked("md.NYSE.X", b"nyse%d" % i)
                    await feed.publish_acked("md.NASDAQ.X", b"nasdaq%d" % i)
                got = [await narrow.recv() for _ in range(3)]
                assert [(m.topic, m.data) for m in got] == [("md.NASDAQ.X", [b"nasdaq%d" % i]) for i in range(3)]
                # a subscription the grants do not touch at all: refused with its id
                await narrow.send(Sub(2, "md.NYSE.X"))
                reply = await narrow.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (2, ErrorCode.FORBIDDEN)
                # publishing outside the grant: the general path and the compiled one (a batch
                # of fire-and-forget publishes to a topic the broker knows) are both refused
                await narrow.send(Pub(3, "md.NYSE.X", b"forged"))
                reply = await narrow.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (3, ErrorCode.FORBIDDEN)
                await narrow.loop.sock_sendall(narrow.sock, client_frame(0x2, encode([Pub(0, "md.NYSE.X", b"forged")] * 5)))
                refusals = [await narrow.recv() for _ in range(5)]
                assert all(isinstance(r, Err) and r.code == ErrorCode.FORBIDDEN for r in refusals)
                await narrow.send(Pub(4, "orders.bob.1", b"ok"))
                assert isinstance(await narrow.recv(), Ack)
                await narrow.loop.sock_sendall(narrow.sock, client_frame(0x2, encode([Pub(0, "orders.bob.1", b"fast")] * 3)))
                await narrow.send(Pub(5, "orders.bob.1", b"sync"))
                assert await narrow.recv() == Ack(5, server.router.topics["orders.bob.1"].epoch, 5)
                nyse = server.router.topics["md.NYSE.X"]
                assert nyse.seq == 3, "a forged publish reached the topic"
                assert server.router.stats.denied == 7
                # recovery through a narrowed pattern replays only granted topics
                await narrow.send(Sub(6, "md.*.X", [0, {"md.NYSE.X": [nyse.epoch, 0]}]))
                assert isinstance(await narrow.recv(), Ack)
                await feed.publish_acked("md.NASDAQ.X", b"after")
                seen = []
                while not seen or seen[-1] != b"after":
                    message = await narrow.recv()
                    assert not (isinstance(message, Delivery) and message.topic == "md.NYSE.X")
                    if isinstance(message, Delivery):
                        seen.extend(message.data)
            finally:
                narrow.close()
                await feed.close()

    run(main())


def test_a_since_map_tells_nothing_of_topics_outside_the_grants():
    """A topic the connection may not see is answered as one that does not exist: a position
    far ahead of it is no error, it gets no gap and no replay, and the replies to a `sub`
    naming it and to one naming a topic that does not exist are the same, on every path
    (pattern map, exact topic, last)."""

    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            feed = await Client.connect(url(server), token=token(sub="feed"))
            narrow = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="bob", subscribe=["md.NASDAQ.*"])))
            try:
                for i in range(8):
                    await feed.publish_acked("md.NYSE.SECRET", b"s%d" % i)
                await feed.publish_acked("md.NASDAQ.X", b"n")
                epoch = server.router.topics["md.NYSE.SECRET"].epoch

                async def answers(*messages) -> list:
                    for message in messages:
                        await narrow.send(message)
                    await narrow.send(Unsub(98, "md.>"))
                    await narrow.send(Hb(99, 0))  # a marker: everything before it came
                    out = []
                    while True:
                        reply = await narrow.recv()
                        if reply == Ack(99):
                            return out
                        if getattr(reply, "id", None) != 98:
                            out.append(reply)

                existing = await answers(Sub(1, "md.>", [0, {"md.NYSE.SECRET": [epoch, 1_000_000], "md.NASDAQ.X": [epoch, 0]}]))
                missing = await answers(Sub(1, "md.>", [0, {"md.NYSE.NOPE": [epoch, 1_000_000], "md.NASDAQ.X": [epoch, 0]}]))
                assert [type(m) for m in existing] == [Ack, Delivery] == [type(m) for m in missing], (existing, missing)
                assert existing[1] == missing[1] and existing[1].topic == "md.NASDAQ.X"
                behind = await answers(Sub(1, "md.>", [0, {"md.NYSE.SECRET": [epoch, 2]}]))
                assert [type(m) for m in behind] == [Ack, Delivery] and behind[1].topic == "md.NASDAQ.X"
                # an exact topic, with since or last: refused alike, whether it exists or not
                for since, last in (([epoch, 1_000_000], False), (None, True), ([epoch, 0], False)):
                    secret = await answers(Sub(2, "md.NYSE.SECRET", since, last))
                    nope = await answers(Sub(2, "md.NYSE.NOPE", since, last))
                    assert [(m.id, m.code) for m in secret] == [(2, ErrorCode.FORBIDDEN)] == [(m.id, m.code) for m in nope]
                    assert secret[0].text.replace("SECRET", "NOPE") == nope[0].text
            finally:
                narrow.close()
                await feed.close()

    run(main())


def test_deny_entries_cut_topics_out_of_a_grant_on_every_path():
    """subscribe {"allow": ["md.>"], "deny": ["md.INTERNAL.>"]}: a `sub` of md.> gets every md
    topic but those under md.INTERNAL (existing then or created later, live or recovered), a
    `sub` of md.INTERNAL.> is refused; publish denies hold on the general and compiled paths."""

    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            feed = await Client.connect(url(server), token=token(sub="feed"))
            reader = await RawSocketClient.connect(
                server.port,
                headers=auth_headers(
                    token(
                        sub="reader",
                        subscribe={"allow": ["md.>"], "deny": ["md.INTERNAL.>"]},
                        publish={"allow": ["md.>"], "deny": ["md.INTERNAL.>"]},
                    )
                ),
            )
            try:
                await feed.publish_acked("md.INTERNAL.X", b"secret-before")
                await feed.publish_acked("md.NYSE.X", b"before")
                await reader.send(Sub(1, "md.>", None, True))  # with the latest value of each
                reply = await reader.recv()
                assert isinstance(reply, Ack) and reply.id == 1
                assert (await reader.recv()).data == [b"before"]
                await reader.send(Sub(2, "md.INTERNAL.>"))
                await reader.send(Sub(3, "md.INTERNAL.X"))
                assert [(r.id, r.code) for r in (await reader.recv(), await reader.recv())] == [
                    (2, ErrorCode.FORBIDDEN),
                    (3, ErrorCode.FORBIDDEN),
                ]
                for topic in ("md.INTERNAL.X", "md.INTERNAL.NEW", "md.NEW"):
                    await feed.publish_acked(topic, topic.encode())
                message = await reader.recv()
                assert (message.topic, message.data) == ("md.NEW", [b"md.NEW"])
                await reader.send(Pub(4, "md.INTERNAL.X", b"forged"))
                reply = await reader.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (4, ErrorCode.FORBIDDEN)
                await reader.loop.sock_sendall(reader.sock, client_frame(0x2, encode([Pub(0, "md.INTERNAL.X", b"forged")] * 3)))
                assert [r.code for r in [await reader.recv() for _ in range(3)]] == [ErrorCode.FORBIDDEN] * 3
                await reader.send(Pub(5, "md.NYSE.X", b"mine"))
                assert isinstance(await reader.recv(), Ack)
                assert (await reader.recv()).data == [b"mine"]  # it subscribes md.> too
                assert server.router.topics["md.INTERNAL.X"].seq == 2
            finally:
                reader.close()
                await feed.close()

    run(main())


def test_history_and_respond_are_rights_of_their_own():
    """A token whose history claim is narrower than its subscribe claim recovers only within
    it (a `sub` with since or last outside it is refused and subscribes nothing; without them
    it is accepted); one with "respond": [] answers no requests though it may subscribe; a
    responder is told the requester's user."""

    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            narrow = await RawSocketClient.connect(
                server.port,
                headers=auth_headers(
                    token(
                        sub="carol",
                        subscribe=["md.>", "svc.>"],
                        history=["md.NASDAQ.*"],
                        respond=[],
                    )
                ),
            )
            service = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="svc", subscribe=["svc.>"])))
            asker = await Client.connect(url(server), token=token(sub="dave"))
            try:
                await asker.publish_acked("md.NASDAQ.X", b"n")
                await narrow.send(Sub(1, "md.>", None, True))
                reply = await narrow.recv()
                assert (reply.id, reply.code) == (1, ErrorCode.FORBIDDEN) and "history" in reply.text
                await narrow.send(Sub(2, "md.NASDAQ.*", [0, {}]))  # within the history right
                reply = await narrow.recv()
                assert isinstance(reply, Ack) and reply.id == 2
                replayed = await narrow.recv()
                assert (replayed.topic, replayed.data) == ("md.NASDAQ.X", [b"n"])
                await narrow.send(Sub(3, "md.>"))  # no since, no last: subscribe alone
                reply = await narrow.recv()
                assert isinstance(reply, Ack) and reply.id == 3
                await narrow.send(Sub(4, "svc.x", respond=True))
                reply = await narrow.recv()
                assert (reply.id, reply.code) == (4, ErrorCode.FORBIDDEN) and reply.text == "not allowed to respond to 'svc.x'"
                # a token without the claim responds as before (respond follows subscribe)
                await service.send(Sub(1, "svc.x", respond=True))
                assert await service.recv() == Ack(1)
                answer = asyncio.ensure_future(asker.request("svc.x", b"q", timeout=5))
                request = await service.recv()
                assert isinstance(request, Request) and (request.topic, request.data, request.user) == ("svc.x", b"q", "dave")
                await service.send(Reply(request.id, b"a"))
                assert await answer == b"a"
            finally:
                narrow.close()
                service.close()
                await asker.close()

    run(main())


def test_a_server_may_make_responding_need_the_respond_claim():
    async def main():
        async with serving(
            auth_jwt_secret=SECRET, auth_respond_follows_subscribe=False, auth_anonymous=True, auth_anonymous_subscribe=">"
        ) as server:
            reader = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="reader", subscribe=["svc.>"])))
            service = await Client.connect(url(server), token=token(sub="svc", subscribe=[], respond=["svc.>"]))
            anonymous = await RawSocketClient.connect(server.port)
            try:
                for client in (reader, anonymous):
                    await client.send(Sub(1, "svc.x", respond=True))
                    reply = await client.recv()
                    assert (reply.id, reply.code) == (1, ErrorCode.FORBIDDEN)
                users = []
                await service.respond("svc.x", lambda request: users.append(request.user) or b"ok")
                async with Client(url(server), token=token(sub="erin")) as asker:
                    assert await asker.request("svc.x", b"q") == b"ok"
                assert users == ["erin"]
            finally:
                reader.close()
                anonymous.close()
                await service.close()

    run(main())


@pytest.mark.slow
def test_an_expired_token_closes_the_connection_unless_refreshed_in_time():
    async def main():
        async with serving(auth_jwt_secret=SECRET, auth_leeway_s=0, ping_interval_s=0.4, ping_timeout_s=0.2) as server:
            issued = []

            def fresh() -> str:
                issued.append(time.time())
                return token(sub="carol", exp=int(time.time()) + 2)

            refreshed = await Client.connect(url(server), token=fresh, refresh_before_s=1.0, reconnect=False)
            static = await Client.connect(url(server), token=token(sub="dave", exp=int(time.time()) + 2), reconnect=False)
            try:
                got = []
                await refreshed.subscribe("tick", lambda m: got.append(m))
                await eventually(lambda: static.closed, 6, "the static token's connection to be closed")
                assert await static.wait_closed() == (4001, "token expired")
                await asyncio.sleep(1.0)
                assert not refreshed.closed and len(issued) >= 3, issued
                await static_publisher(server, "tick")
                await eventually(lambda: len(got) == 1, 3, "the refreshed connection to still receive")
            finally:
                await refreshed.close()
                await static.close()

    run(main(), timeout=30)


async def static_publisher(server, topic: str) -> None:
    async with Client(url(server), token=token(sub="pub")) as pub:
        await pub.publish_acked(topic, b"x")


def test_revoking_a_token_id_closes_its_open_connections_and_refuses_it_at_the_handshake(tmp_path):
    denylist = tmp_path / "denied.txt"
    denylist.write_text("# revoked token ids\n")

    async def main():
        async with serving(auth_jwt_secret=SECRET, auth_denylist_file=str(denylist)) as server:
            revoked = token(sub="eve", jti="t-123")
            kept = token(sub="frank", jti="t-456")
            a = await Client.connect(url(server), token=revoked, reconnect=False)
            b = await Client.connect(url(server), token=kept, reconnect=False)
            try:
                denylist.write_text("# revoked token ids\nt-123\n")
                await eventually(lambda: a.closed, 3, "the revoked connection to be closed")
                assert await a.wait_closed() == (4003, "token revoked")
                assert not b.closed
                status, headers, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], auth_headers(revoked)))
                writer.close()
                assert status == 403
                with pytest.raises(ConnectionClosed):
                    await Client.connect(url(server), token=revoked, reconnect=False)
            finally:
                await a.close()
                await b.close()

    run(main())


def test_denylist_rules_by_id_user_and_time():
    from broker.revocation import Denylist, RuleError, rule_line

    rules = Denylist.parse(["# revoked", "t-1", "jti:user:odd", "user:bob", "user:Jane Doe before:100", "before:50", ""])
    assert rules.revoked("t-1", "x", 1e9) and rules.revoked("user:odd", "x", 1e9) and not rules.revoked("t-2", "x", 1e9)
    assert rules.revoked(None, "bob", 1e9)  # every token of bob's
    assert rules.revoked(None, "Jane Doe", 99) and not rules.revoked(None, "Jane Doe", 100)
    assert rules.revoked(None, "carol", 49) and not rules.revoked(None, "carol", 50)
    assert rules.revoked(None, "carol", None)  # no iat: nothing shows it was issued after the time
    assert not Denylist().revoked("t-1", "bob", None)
    for bad in ("before:soon", "user: before:5", "before:-1", "user:x before:nan"):
        with pytest.raises(RuleError, match="line 2"):
            Denylist.parse(["ok", bad])
    assert rule_line(user="alice", before=1767225600) == "user:alice before:1767225600"
    assert rule_line(before=1.5) == "before:1.5" and rule_line(jti="t-9") == "jti:t-9"
    for args in ({}, {"jti": "a", "user": "b"}, {"user": "a\nbefore:1"}):
        with pytest.raises(ValueError):
            rule_line(**args)


@pytest.mark.slow
def test_revoking_a_user_or_everything_issued_before_a_time_reaches_open_connections(tmp_path):
    """A denylist line `user:NAME` revokes every token of that user, `before:T` (alone or after
    a user) those issued before T (and those without iat): open connections holding one are
    closed with 4003, handshakes and `auth` messages with one refused; later tokens work."""
    denylist = tmp_path / "denied.txt"
    denylist.write_text("# revoked\n")
    now = int(time.time())

    async def main():
        async with serving(
            auth_jwt_secret=SECRET, auth_denylist_file=str(denylist), auth_anonymous=True, auth_anonymous_subscribe=">"
        ) as server:
            old = now - 100
            clients = {
                "mallory": await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="mallory", iat=now))),
                "alice-old": await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="alice", iat=old))),
                "alice-new": await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="alice", iat=now))),
                "bob-old": await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="bob", iat=old))),
                "bob-no-iat": await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="bob"))),
                "anonymous": await RawSocketClient.connect(server.port),
            }
            try:
                denylist.write_text(f"# revoked\nuser:mallory\nuser:alice before:{now - 10}\n")
                for name in ("mallory", "alice-old"):
                    assert (await clients[name].read_close())[1:] == (4003, "token revoked")
                for name in ("alice-new", "bob-old", "bob-no-iat", "anonymous"):
                    await clients[name].send(Sub(1, "still.here"))
                    assert await clients[name].recv() == Ack(1)
                # refused at the handshake and in auth; a fresh token of alice's passes both
                for bad in (token(sub="mallory", iat=now + 5), token(sub="alice", iat=old)):
                    status, _, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], auth_headers(bad)))
                    writer.close()
                    assert status == 403
                await clients["alice-new"].send(Auth(2, token(sub="alice", iat=old)))
                reply = await clients["alice-new"].recv()
                assert isinstance(reply, Err) and (reply.code, reply.text) == (ErrorCode.BAD_TOKEN, "token revoked")
                await clients["alice-new"].send(Auth(3, token(sub="alice", iat=now)))
                assert await clients["alice-new"].recv() == Ack(3)
                # everything issued before a time, whoever's; anonymous connections hold no token
                denylist.write_text(f"before:{now - 10}\n")
                for name in ("bob-old", "bob-no-iat"):
                    assert (await clients[name].read_close())[1:] == (4003, "token revoked")
                for name in ("alice-new", "anonymous"):
                    await clients[name].send(Sub(4, "still.here.too"))
                    assert await clients[name].recv() == Ack(4)
            finally:
                for client in clients.values():
                    client.close()

    run(main())


def test_auth_replaces_the_grants_of_the_same_user_only(caplog):
    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            first = token(sub="gina", subscribe=["a.>"])
            client = await RawSocketClient.connect(server.port, headers=auth_headers(first))
            feed = await Client.connect(url(server), token=token(sub="feed"))
            try:
                await client.send(Sub(1, ">"))
                assert isinstance(await client.recv(), Ack)
                await client.send(Auth(2, token(sub="someone-else")))
                reply = await client.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (2, ErrorCode.BAD_TOKEN)
                assert reply.text == "the token names another user than this connection's"
                await client.send(Auth(3, token(sub="gina", exp=int(time.time()) - 100)))
                reply = await client.recv()
                assert isinstance(reply, Err) and reply.code == ErrorCode.BAD_TOKEN and reply.text == "token expired"
                await client.send(Auth(4, token(sub="gina", subscribe=["b.>"])))
                assert await client.recv() == Ack(4)
                await feed.publish_acked("a.1", b"old grant")
                await feed.publish_acked("b.1", b"new grant")
                message = await client.recv()
                assert (message.topic, message.data) == ("b.1", [b"new grant"])
            finally:
                client.close()
                await feed.close()

    with caplog.at_level(logging.INFO, logger="broker"):
        run(main())


def test_auth_that_narrows_the_grants_mutes_responders_it_no_longer_covers():
    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            service = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="svc", subscribe=["svc.>"])))
            asker = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="asker")))
            try:
                await service.send(Sub(1, "svc.bob", respond=True))
                assert await service.recv() == Ack(1)
                await asker.send(Req(1, "svc.bob", b"before"))
                passed = await service.recv()
                assert isinstance(passed, Request) and passed.data == b"before"
                await service.send(Auth(2, token(sub="svc", subscribe=["svc.alice"])))
                assert await service.recv() == Ack(2)
                # the request passed before fails for its requester; its reply is refused
                failed = await asker.recv()
                assert isinstance(failed, Err) and (failed.id, failed.code) == (1, ErrorCode.NO_RESPONDERS)
                await service.send(Reply(passed.id, b"late"))
                refused = await service.recv()
                assert isinstance(refused, Err) and refused.code == ErrorCode.UNKNOWN_REQUEST
                await asker.send(Req(2, "svc.bob", b"after"))
                reply = await asker.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (2, ErrorCode.NO_RESPONDERS)
                # widened again, it answers again; an unsub while muted is acknowledged
                await service.send(Auth(3, token(sub="svc", subscribe=["svc.>"])))
                assert await service.recv() == Ack(3)
                await asker.send(Req(3, "svc.bob", b"again"))
                passed = await service.recv()
                assert isinstance(passed, Request) and passed.data == b"again"
                await service.send(Reply(passed.id, b"ok"))
                assert await asker.recv() == Reply(3, b"ok")
                await service.send(Auth(4, token(sub="svc", subscribe=["svc.alice"])))
                assert await service.recv() == Ack(4)
                await service.send(Unsub(5, "svc.bob"))
                assert await service.recv() == Ack(5)
                await service.send(Auth(6, token(sub="svc", subscribe=["svc.>"])))
                assert await service.recv() == Ack(6)
                await asker.send(Req(4, "svc.bob", b"gone"))
                reply = await asker.recv()
                assert isinstance(reply, Err) and (reply.id, reply.code) == (4, ErrorCode.NO_RESPONDERS)
            finally:
                service.close()
                asker.close()

    run(main())


def test_refusals_are_logged_without_the_token(caplog):
    async def main():
        async with serving(auth_jwt_secret=SECRET, log_level="info") as server:
            bad = token(key="another-secret-of-32-bytes-long!")
            status, _, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], auth_headers(bad)))
            writer.close()
            assert status == 401
            return bad

    with caplog.at_level(logging.INFO):
        bad = run(main())
    lines = [r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str) for r in caplog.records]
    refusal = [line for line in lines if "handshake_refused" in line]
    assert refusal and "bad token signature" in refusal[0] and "127.0.0.1" in refusal[0]
    assert not any(bad in line or bad.split(".")[2] in line for line in lines)


def test_the_client_refuses_a_callback_that_gives_no_token():
    async def main():
        async with serving(auth_jwt_secret=SECRET) as server:
            with pytest.raises(BrokerError, match="non-empty str"):
                await Client.connect(url(server), token=lambda: "", reconnect=False)

    run(main())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(key, kid: str, alg: str) -> dict:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    entry = json.loads(algorithm.to_jwk(key.public_key()))
    entry.update(kid=kid, alg=alg, use="sig")
    return entry


_files: list[str] = []


def _write(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False, suffix=".pem") as fh:
        fh.write(data)
    _files.append(fh.name)
    return fh.name


def test_denials_are_counted_and_audited_within_a_bound(caplog):
    async def main():
        async with serving(auth_jwt_secret=SECRET, log_level="info") as server:
            client = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="henry", subscribe=["a"], publish=[])))
            try:
                await client.loop.sock_sendall(client.sock, client_frame(0x2, encode([Sub(i + 1, f"x.{i}") for i in range(20)])))
                replies = [await client.recv() for _ in range(20)]
                assert [(r.id, r.code) for r in replies] == [(i + 1, ErrorCode.FORBIDDEN) for i in range(20)]
                assert server.router.stats.denied == 20
            finally:
                client.close()

    with caplog.at_level(logging.INFO, logger="broker"):
        run(main())
    denied = [r for r in caplog.records if r.getMessage() == "permission_denied"]
    assert 1 <= len(denied) <= 10
    fields = denied[0].fields
    assert fields["user"] == "henry" and fields["action"] == "subscribe" and fields["id"] == 1 and fields["peer"].startswith("127.0.0.1:")
    assert "reason" not in fields  # the refused topic is told to the client only


def test_the_per_user_limits_count_the_user_the_token_names():
    async def main():
        async with serving(auth_jwt_secret=SECRET, max_connections_per_user=2, user_publish_rate=1, user_publish_burst=3) as server:
            first = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="ivy")))
            second = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="ivy")))
            other = await RawSocketClient.connect(server.port, headers=auth_headers(token(sub="jack")))
            try:
                status, _, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], auth_headers(token(sub="ivy"))))
                writer.close()
                assert status == 429
                # the user's publish bucket is shared by both of ivy's connections
                for i, client in enumerate((first, second, first, second)):
                    await client.send(Pub(i + 1, "t", b"x"))
                replies = [await first.recv(), await second.recv(), await first.recv(), await second.recv()]
                codes = sorted(getattr(r, "code", 0) for r in replies)
                assert codes == [0, 0, 0, ErrorCode.RATE_LIMITED]
                await other.send(Pub(9, "t", b"y"))
                assert isinstance(await other.recv(), Ack)
            finally:
                for client in (first, second, other):
                    client.close()

    run(main())


def test_unusable_auth_settings_stop_the_start_with_the_setting_named(tmp_path):
    from broker.errors import ConfigError

    bad_pem = tmp_path / "key.pem"
    bad_pem.write_text("not a key")
    cases = {
        "auth_jwks_file": {"auth_jwks_file": str(tmp_path / "missing.json")},
        "auth_jwt_public_key_file": {"auth_jwt_public_key_file": str(bad_pem)},
        "auth_denylist_file": {"auth_jwt_secret": SECRET, "auth_denylist_file": str(tmp_path / "missing.txt")},
        "need a key": {"auth_anonymous": True},
    }
    for expected, settings in cases.items():
        with pytest.raises(ConfigError, match=expected):
            Authenticator(load(settings, environ={}))


def test_an_hs256_secret_shorter_than_32_bytes_stops_the_start_and_a_file_may_hold_it(tmp_path):
    from broker.errors import ConfigError

    for short in ("s", "x" * 31):
        with pytest.raises(
            ConfigError, match=f"invalid setting: auth_jwt_secret: an HS256 secret must be at least 32 bytes .*not {len(short)}"
        ):
            Authenticator(load({"auth_jwt_secret": short}, environ={}))
    path = tmp_path / "secret"
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="invalid setting: auth_jwt_secret_file: an HS256 secret must be at least 32 bytes"):
        Authenticator(load({"auth_jwt_secret_file": str(path)}, environ={}))
    jwks = tmp_path / "keys.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "h1", "alg": "HS256", "k": _b64(b"k" * 16)}]}))
    with pytest.raises(ConfigError, match="auth_jwks_file: .*the HS256 key 'h1' has 16 bytes; it must have at least 32"):
        Authenticator(load({"auth_jwks_file": str(jwks)}, environ={}))
    path.write_text(SECRET + "\n")
    rules = Rules("/", SUBPROTOCOL, Authenticator(load({"auth_jwt_secret_file": str(path)}, environ={})))
    assert rules.check(request(headers={"Authorization": f"Bearer {token()}"})).identity.user == "alice"

    async def main():
        async with serving(auth_jwt_secret_file=str(path)) as server:
            async with Client(url(server), token=token(sub="from-file")) as client:
                await client.publish_acked("t", b"x")

    run(main())


def test_a_flood_of_bad_tokens_cannot_flood_the_log(caplog):
    async def main():
        async with serving(auth_jwt_secret=SECRET, log_level="info") as server:
            for _ in range(30):
                status, _, _, writer = await send_upgrade(server.port, upgrade_request("/", [SUBPROTOCOL], auth_headers("bad.token.here")))
                writer.close()
                assert status == 401
            assert server.handshakes_refused == 30

    with caplog.at_level(logging.INFO, logger="broker"):
        run(main())
    refused = [r for r in caplog.records if r.getMessage() == "handshake_refused"]
    assert 1 <= len(refused) <= 5, len(refused)
    assert refused[0].fields["reason"] == "malformed token" and refused[0].fields["status"] == 401
