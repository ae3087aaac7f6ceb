"""Request/response: a `req` reaches one responder of its topic; the requester gets the reply,
or NO_RESPONDERS at once, or REQUEST_TIMEOUT; correlated by id (sans-I/O core and a real
server with the Python client)."""

import asyncio

import pytest

from broker.client import Client, RequestError
from broker.errors import ErrorCode
from broker.messages import Ack, Err, Reply, Req, Request, Sub, Unsub, encode
from conftest import Harness, run, serving, url


def responder(h, name, topic="svc.time"):
    s = h.session(name)
    s.receive(encode(Sub(1, topic, None, False, True)))
    assert h.tick()[0][name] == [Ack(1, 0, 0)]
    return s


def test_a_request_reaches_one_responder_and_its_reply_the_requester():
    h = Harness()
    a, b = responder(h, "a"), responder(h, "b")
    client = h.session("c")
    client.receive(encode([Req(7, "svc.time", b"now?", 1000), Req(8, "svc.time", b"again", 1000)]))
    written, _ = h.tick()
    requests = written.get("a", []) + written.get("b", [])
    assert sorted(r.data for r in requests) == [b"again", b"now?"] and all(type(r) is Request for r in requests)
    for name, session in (("a", a), ("b", b)):
        for r in written.get(name, []):
            session.receive(encode(Reply(r.id, b"answer to " + r.data)))
    replies = h.tick()[0]["c"]
    assert sorted((r.id, r.data) for r in replies) == [(7, b"answer to now?"), (8, b"answer to again")]
    assert h.router.requests.next_deadline is None


def test_no_responders_is_answered_at_once():
    h = Harness()
    s = h.session("s")
    s.receive(encode(Sub(1, "svc.time")))  # an ordinary subscriber does not answer requests
    s.receive(encode(Req(3, "svc.time", b"?", 1000)))
    written, _ = h.tick()
    err = written["s"][-1]
    assert type(err) is Err and err.id == 3 and err.code == ErrorCode.NO_RESPONDERS


def test_a_request_without_a_reply_times_out_and_a_late_reply_is_refused():
    h = Harness()
    a = responder(h, "a")
    c = h.session("c")
    c.receive(encode(Req(5, "svc.time", b"?", 250)))
    (request,) = h.tick()[0]["a"]
    assert h.router.requests.next_deadline == pytest.approx(h.now + 0.25)
    h.now += 0.2
    h.router.requests.expire_requests()
    assert h.tick()[0] == {}
    h.now += 0.1
    h.router.requests.expire_requests()
    (err,) = h.tick()[0]["c"]
    assert (err.id, err.code) == (5, ErrorCode.REQUEST_TIMEOUT) and h.router.stats.timeouts == 1
    a.receive(encode(Reply(request.id, b"too late")))
    (err,) = h.tick()[0]["a"]
    assert (err.id, err.code) == (request.id, ErrorCode.UNKNOWN_REQUEST)


def test_a_responder_that_closes_fails_its_requests_at_once():
    h = Harness()
    a = responder(h, "a")
    c = h.session("c")
    c.receive(encode(Req(5, "svc.time", b"?", 60_000)))
    h.tick()
    a.close()
    (err,) = h.tick()[0]["c"]
    assert (err.id, err.code) == (5, ErrorCode.NO_RESPONDERS)
    c.receive(encode(Req(6, "svc.time", b"?", 1000)))
    (err,) = h.tick()[0]["c"]
    assert (err.id, err.code) == (6, ErrorCode.NO_RESPONDERS)


def test_a_reply_only_counts_from_the_responder_the_request_went_to():
    h = Harness()
    responder(h, "a")
    other = h.session("other")
    c = h.session("c")
    c.receive(encode(Req(5, "svc.time", b"?", 1000)))
    (request,) = h.tick()[0]["a"]
    other.receive(encode(Reply(request.id, b"forged")))
    (err,) = h.tick()[0]["other"]
    assert err.code == ErrorCode.UNKNOWN_REQUEST


def test_open_requests_per_connection_are_bounded_and_freed_when_answered():
    h = Harness(max_open_requests=2)
    responder(h, "a")
    c = h.session("c")
    c.receive(encode([Req(1, "svc.time", b"", 1000), Req(2, "svc.time", b"", 1000), Req(3, "svc.time", b"", 1000)]))
    written, _ = h.tick()
    (err,) = written["c"]
    assert (err.id, err.code) == (3, ErrorCode.TOO_MANY_REQUESTS)
    h.now += 2
    h.router.requests.expire_requests()
    h.tick()
    c.receive(encode(Req(4, "svc.time", b"", 1000)))
    assert "c" not in h.tick()[0]  # passed on: it waits for its reply


def test_a_responder_answers_a_concrete_topic_and_can_stop():
    h = Harness()
    s = h.session("s")
    s.receive(encode([Sub(1, "svc.*", None, False, True), Sub(2, "svc.a", None, False, True), Sub(3, "svc.a", None, False, True)]))
    written = h.tick()[0]["s"]
    assert (
        written[0].code == ErrorCode.PATTERN_NOT_ALLOWED and written[1] == Ack(2, 0, 0) and written[2].code == ErrorCode.ALREADY_SUBSCRIBED
    )
    s.receive(encode(Unsub(4, "svc.a")))
    assert h.tick()[0]["s"] == [Ack(4, 0, 0)]
    s.receive(encode(Req(5, "svc.a", b"", 1000)))
    assert h.tick()[0]["s"][0].code == ErrorCode.NO_RESPONDERS


def test_request_and_respond_with_the_python_client():
    async def main():
        async with serving() as server:
            async with Client(url(server)) as service, Client(url(server)) as client:
                await service.respond("svc.echo", lambda req: req.data.upper())

                async def slow(req):
                    await asyncio.sleep(0.05)
                    return b"slow " + req.data

                await service.respond("svc.slow", slow)
                assert await client.request("svc.echo", b"hello") == b"HELLO"
                results = await asyncio.gather(*(client.request("svc.slow", b"%d" % i) for i in range(20)))
                assert results == [b"slow %d" % i for i in range(20)]
                with pytest.raises(RequestError) as info:
                    await client.request("svc.nobody", b"?")
                assert info.value.code == ErrorCode.NO_RESPONDERS
                await service.respond("svc.mute", lambda req: asyncio.sleep(10))
                loop = asyncio.get_running_loop()
                began = loop.time()
                with pytest.raises(RequestError) as info:
                    await client.request("svc.mute", b"?", timeout=0.2)
                assert info.value.code == ErrorCode.REQUEST_TIMEOUT and 0.15 < loop.time() - began < 2
                await service.unrespond("svc.echo")
                with pytest.raises(RequestError) as info:
                    await client.request("svc.echo", b"?")
                assert info.value.code == ErrorCode.NO_RESPONDERS
                assert not server.router.requests.waiting and not server.router.requests.involved

    run(main())


def test_a_request_to_a_pattern_is_refused_as_a_request():
    h = Harness()
    c = h.session("c")
    c.receive(encode(Req(1, "svc.*", b"?")))
    (err,) = h.tick()[0]["c"]
    assert type(err) is Err and err.id == 1 and err.code == ErrorCode.PATTERN_NOT_ALLOWED
    assert err.text == "cannot send a request to pattern 'svc.*'; name a concrete topic"
