"""docs/protocol.md section 12 (the fallback transport) is checked against the broker: every
`exchange:` is sent to a real server and answered as shown, every `sse-example:` is what the
broker's own code writes for its frame, and the refusal table names the statuses the code
gives, in its order."""

from __future__ import annotations

import ast
import asyncio
import base64
import re

import msgspec
from test_protocol_doc import EXAMPLES, doc_text, section

from broker.server import fallback
from conftest import run, serving

_EXCHANGE = re.compile(
    r"^exchange: (?P<name>\S+)\n```http\n(?P<request>.*?)\n```\n(?:```hex\n(?P<body>[0-9a-f \n]*?)\n```\n)?```http\n(?P<response>.*?)\n```",
    re.MULTILINE | re.DOTALL,
)
_SSE = re.compile(r"^sse-example: (?P<name>\S+)\n```text\n(?P<event>.*?)\n```\nvalue: (?P<value>[^\n]+)$", re.MULTILINE | re.DOTALL)


def fallback_section() -> str:
    return section(doc_text(), "The fallback transport: an event stream and POSTs")


def exchanges() -> list[re.Match]:
    return list(_EXCHANGE.finditer(fallback_section()))


def sse_examples() -> dict[str, tuple[dict[str, str], object]]:
    out = {}
    for m in _SSE.finditer(fallback_section()):
        fields = dict(line.split(": ", 1) for line in m["event"].splitlines())
        out[m["name"]] = (fields, ast.literal_eval(m["value"]))
    return out


def test_every_example_of_the_section_is_well_formed():
    text = fallback_section()
    assert len(re.findall(r"^exchange: ", text, re.MULTILINE)) == len(exchanges()) >= 4
    assert len(re.findall(r"^sse-example: ", text, re.MULTILINE)) == len(sse_examples()) >= 2


def test_the_sse_examples_are_what_the_broker_writes():
    examples = sse_examples()
    frame = EXAMPLES["frame"].data  # section 11's complete server frame
    fields, value = examples["frame_event"]
    assert fallback.Fallback(None).encoded(frame) == [fields["data"].encode()]
    for fields, value in examples.values():
        assert re.fullmatch(r"[0-9a-f]{8}-\d+", fields["id"])
        assert msgspec.msgpack.decode(base64.b64decode(fields["data"])) == value
        assert base64.b64encode(msgspec.msgpack.encode(value)).decode() == fields["data"]


def test_the_exchanges_are_answered_as_shown():
    async def main():
        async with serving(allowed_origins="https://app.example") as server:
            held = []  # the stream of open_stream stays open for the POSTs that follow
            for m in exchanges():
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                held.append(writer)
                body = bytes.fromhex("".join((m["body"] or "").split()))
                writer.write(m["request"].replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
                head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
                lines = head.strip().split("\r\n")
                expected = m["response"].splitlines()
                assert lines[0] == expected[0], m["name"]
                headers = {line.split(": ", 1)[0].lower(): line.split(": ", 1)[1] for line in lines[1:]}
                for line in expected[1:]:
                    name, value = line.split(": ", 1)
                    assert headers.get(name.lower()) == value, (m["name"], name, headers)
                if m["name"] == "open_stream":
                    stream_reader = reader
            # the ack of post_subscribe arrived on the stream as ack_event shows it
            events = (await asyncio.wait_for(stream_reader.read(4096), 5)).decode()
            data = re.findall(r"^data: (.*)$", events, re.MULTILINE)
            assert data[0] == "new" and sse_examples()["ack_event"][0]["data"] in data[1:], events
            for writer in held:
                writer.close()

    run(main())


def test_the_refusal_table_follows_the_code():
    """The statuses of 12.4, in order, are those fallback.py raises, in the order it checks."""
    rows = [row for row in re.findall(r"^\| (\d+) \| ([\d, ]+) \|", fallback_section(), re.MULTILINE)]
    statuses = [status.strip() for _, status in rows]
    assert statuses == [
        "404",
        "503",
        "404",
        "403",
        "400",
        "400",
        "405",
        "406",
        "401, 403",
        "429",
        "409",
        "415",
        "411",
        "413",
        "404",
        "409",
        "404",
    ]
    source = open(fallback.__file__).read()
    raised = {int(s) for s in re.findall(r"Refused\(\s*(\d+)", source)}
    # 503 comes from handshake.Rules.check_path (as 404 for the path), 403 from
    # handshake.Rules.check_origin (the one Origin rule, also the WebSocket's) and from the
    # authenticator with 401, 429 from the limit per user: the rest are fallback.py's own
    documented = {int(code) for status in statuses for code in status.split(",")}
    assert raised == documented - {503, 401, 403, 429}, (raised, documented)
