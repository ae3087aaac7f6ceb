"""docs/protocol.md is checked against the code: its hex examples, its code tables, its message
field tables and its limits table.

Example format in the document (see its Examples section):

    example: NAME
    encoding: msgpack | websocket-frame
    ```hex
    93 a3 73 ...
    ```
    value: <Python literal>
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from broker import _fastpath_py
from broker.config import DEFAULT_PORT, Config
from broker.errors import CloseCode, ErrorCode
from broker.messages import (
    SUBPROTOCOL,
    Ack,
    Auth,
    Batch,
    Err,
    GapNotice,
    Hb,
    Heartbeat,
    Msg,
    Pub,
    Reply,
    Req,
    Request,
    Sub,
    Topic,
    Unsub,
    Unsubscribed,
    client_batch_decoder,
    client_decoder,
    decode_server_frame,
    is_message_array,
)
from broker.topics import DEFAULT_MAX_TOPIC_LENGTH, MAX_TOKENS
from conftest import split_frames, wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

_EXAMPLE = re.compile(
    r"^example: (?P<name>\S+)\n"
    r"encoding: (?P<encoding>msgpack|websocket-frame)\n"
    r"```hex\n(?P<hex>[0-9a-f \n]*?)\n```\n"
    r"value: (?P<value>.+)$",
    re.MULTILINE,
)

CLIENT_TYPES = {"sub": Sub, "unsub": Unsub, "pub": Pub, "req": Req, "reply": Reply, "auth": Auth, "hb": Hb}
SERVER_TYPES = {
    "ack": Ack,
    "err": Err,
    "topic": Topic,
    "gap": GapNotice,
    "request": Request,
    "reply": Reply,
    "beat": Heartbeat,
    "unsubscribed": Unsubscribed,
    "msg": Msg,
}


class Example(NamedTuple):
    name: str
    encoding: str
    data: bytes
    value: Any


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def examples(text: str | None = None) -> dict[str, Example]:
    """Every example of the document, by name."""
    text = doc_text() if text is None else text
    found: dict[str, Example] = {}
    for m in _EXAMPLE.finditer(text):
        name = m["name"]
        assert name not in found, f"example {name!r} appears twice"
        data = bytes.fromhex("".join(m["hex"].split()))
        found[name] = Example(name, m["encoding"], data, ast.literal_eval(m["value"]))
    return found


def section(text: str, title: str) -> str:
    """The body of the `## N. title` section, up to the next heading of level 2."""
    m = re.search(rf"^## (?:\d+\. )?{re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"section {title!r} not found in {DOC}"
    return m.group(1)


def subsection(text: str, heading: str) -> str:
    """The body of the `#### heading` subsection, up to the next heading."""
    m = re.search(rf"^#### {re.escape(heading)}\n(.*?)(?=^#|\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"subsection {heading!r} not found in {DOC}"
    return m.group(1)


def table_rows(body: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in `body`, header and rule left out."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) >= 2 and set(rows[1][0]) <= set("-: "), f"not a table: {rows[:2]}"
    return rows[2:]


def strict_equal(a: Any, b: Any) -> bool:
    """Equality that also compares types, so True != 1 and b'x' != 'x'."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    return a == b


def typed_decode(data: bytes):
    """Decode with the broker's own decoders: a client frame (one message or batch) or a server message."""
    value = msgspec.msgpack.decode(data)
    if is_message_array(data):
        return client_batch_decoder.decode(data)
    if value[0] in CLIENT_TYPES:
        return client_decoder.decode(data)
    (message,) = decode_server_frame(b"\x91" + data)
    return wire(message)


def pieces_of(messages: list) -> list[bytes]:
    """The pieces the broker queues for a list of decoded server messages."""
    out = []
    for message in messages:
        if isinstance(message, Msg):
            out += [_fastpath_py.encode_batch(b.topic_id, b.seq, list(b.data)) for b in message.batches]
        elif isinstance(message, Topic):
            out.append(_fastpath_py.encode_topic(message.id, message.topic, message.epoch))
        else:
            out.append(msgspec.msgpack.encode(message))
    return out


EXAMPLES = examples()


def test_every_example_is_well_formed():
    text = doc_text()
    names = re.findall(r"^example: (\S+)", text, re.MULTILINE)
    assert names, "no examples found"
    assert sorted(names) == sorted(EXAMPLES), "an `example:` line is not followed by the documented format"


def test_examples_cover_every_message_type_a_batch_and_a_frame():
    msgpack_values = [e.value for e in EXAMPLES.values() if e.encoding == "msgpack"]
    kinds = {v[0] for v in msgpack_values if isinstance(v[0], str)}
    assert kinds >= set(CLIENT_TYPES) | set(SERVER_TYPES)
    batches = [v for v in msgpack_values if isinstance(v[0], list)]
    assert any(len(b) == 2 and all(m[0] == "pub" for m in b) for b in batches), "no batch of two pubs"
    assert any(v[0] == "msg" and any(len(b) == 4 for b in v[1:]) for v in msgpack_values), "no msg batch with two payloads"
    frames = [e for e in EXAMPLES.values() if e.encoding == "websocket-frame"]
    assert any(any(m[0] == "msg" for m in e.value) for e in frames), "no complete WebSocket frame with a msg"


@pytest.mark.parametrize("name", sorted(n for n, e in EXAMPLES.items() if e.encoding == "msgpack"))
def test_msgpack_example(name):
    example = EXAMPLES[name]
    decoded = msgspec.msgpack.decode(example.data)
    assert strict_equal(decoded, example.value), f"{name}: doc says {example.value!r}, bytes decode to {decoded!r}"
    assert msgspec.msgpack.encode(example.value) == example.data, f"{name}: value does not re-encode to the bytes"
    # The broker's own schema accepts it and writes the very same bytes (a message that
    # leaves out its optional trailing fields is written with their defaults).
    typed = typed_decode(example.data)
    if is_message_array(example.data):
        assert len(typed) == len(decoded) and all(written_with_defaults(v, m) for v, m in zip(decoded, typed))
    elif isinstance(typed, msgspec.Struct):
        assert written_with_defaults(decoded, typed)
    else:  # a server message, as the broker writes it
        assert msgspec.msgpack.encode(typed) == example.data


def written_with_defaults(value: list, message) -> bool:
    """`message` is written as `value` followed by the defaults of the fields `value` omits."""
    written = msgspec.msgpack.decode(msgspec.msgpack.encode(message))
    fields = type(message).__struct_fields__
    defaults = dict(zip(fields[len(fields) - len(type(message).__struct_defaults__) :], type(message).__struct_defaults__))
    omitted = fields[len(value) - 1 :]
    return strict_equal(written[: len(value)], value) and all(strict_equal(w, defaults[f]) for w, f in zip(written[len(value) :], omitted))


@pytest.mark.parametrize("name", sorted(n for n, e in EXAMPLES.items() if e.encoding == "websocket-frame"))
def test_frame_example(name, fastpath_impl):
    example = EXAMPLES[name]
    ((opcode, payload),) = split_frames(example.data)
    assert example.data[0] == 0x82 and opcode == 0x2, "FIN + binary opcode"
    decoded = msgspec.msgpack.decode(payload)
    assert strict_equal(decoded, example.value)
    assert msgspec.msgpack.encode(example.value) == payload
    messages = decode_server_frame(payload)
    assert msgspec.msgpack.encode([wire(m) for m in messages]) == payload
    # The broker builds exactly these bytes from the pieces it queues.
    assert fastpath_impl.assemble(pieces_of(messages), 1 << 20) == example.data
    assert fastpath_impl.encode_frame(payload) == example.data


def test_error_code_table_lists_exactly_error_code():
    rows = table_rows(section(doc_text(), "Error codes"))
    documented = {row[1].strip("`"): int(row[0]) for row in rows}
    assert len(documented) == len(rows), "a name appears twice"
    assert documented == {member.name: member.value for member in ErrorCode}


def test_close_code_table_lists_exactly_close_code():
    rows = table_rows(section(doc_text(), "Close codes"))
    codes = [int(row[0]) for row in rows]
    assert len(set(codes)) == len(codes), "a code appears twice"
    named = {row[1].strip("`"): int(row[0]) for row in rows if row[1] not in ("—", "-", "")}
    unnamed = {int(row[0]) for row in rows if row[1] in ("—", "-", "")}
    assert named == {member.name: member.value for member in CloseCode}
    # Seen by clients without the broker choosing them: 1006 (no close frame) and 1007 (the
    # answer to a client close frame with a reason that is not UTF-8).
    assert unnamed == {1006, 1007}


@pytest.mark.parametrize("struct", [Sub, Unsub, Pub, Req, Reply, Auth, Hb, Ack, Err, Topic, GapNotice, Request, Heartbeat, Unsubscribed])
def test_field_tables_match_the_structs(struct):
    tag = struct.__struct_config__.tag
    body = subsection(doc_text(), next(h for h in _headings() if h.startswith(f"`{tag}`")))
    rows = table_rows(body)
    assert rows[0][1:3] == ["type", "str"] and rows[0][3] == f'`"{tag}"`'
    assert [row[1] for row in rows[1:]] == list(struct.__struct_fields__)
    assert [int(row[0]) for row in rows] == list(range(len(rows)))
    defaults = struct.__struct_defaults__
    with_default = struct.__struct_fields__[len(struct.__struct_fields__) - len(defaults) :]
    for row, field in zip(rows[1:], struct.__struct_fields__):
        assert ("default" in row[2]) == (field in with_default), f"{tag}.{field}: default marking"
    signature = "`[" + ", ".join([f'"{tag}"', *struct.__struct_fields__]) + "]`"
    assert signature in body


def test_msg_batch_table_matches_the_batch_fields():
    body = subsection(doc_text(), next(h for h in _headings() if h.startswith("`msg`")))
    rows = table_rows(body)
    assert [row[1] for row in rows] == list(Batch._fields)
    assert [int(row[0]) for row in rows] == list(range(len(rows)))
    assert '`["msg", batch, batch, ...]`' in body
    assert "`[" + ", ".join([*Batch._fields[:-1], "data", "data", "..."]) + "]`" in body


def _headings() -> list[str]:
    return re.findall(r"^#### (.+)$", doc_text(), re.MULTILINE)


def test_limits_table_matches_the_config_defaults():
    defaults = Config()
    rows = table_rows(section(doc_text(), "Limits"))
    checked = set()
    for row in rows:
        names = re.findall(r"`(\w+)`", row[0])
        values = [float(re.match(r"[\d.]+", part.strip()).group()) for part in row[1].split("/")]
        if not names:
            assert row[0] == "tokens per topic" and values == [MAX_TOKENS]
            continue
        assert len(names) == len(values), row
        for name, value in zip(names, values):
            assert getattr(defaults, name) == value, f"{name}: doc says {value}, default is {getattr(defaults, name)}"
            checked.add(name)
    assert {"max_frame_bytes", "max_payload_bytes", "max_pending_bytes", "max_subscriptions", "max_topics"} <= checked
    assert defaults.max_topic_length == DEFAULT_MAX_TOPIC_LENGTH


def test_transport_facts():
    text = doc_text()
    assert f"`{SUBPROTOCOL}`" in text
    assert f"port **{DEFAULT_PORT}**" in text
    assert f"path **`{Config().path}`**" in text


def test_the_trailing_element_examples_of_2_1_hold():
    body = section(doc_text(), "Encoding")
    valid = re.search(r"`(\[\"unsub\".*?)` is a valid\s+`unsub`, and `(\[\"sub\".*?)` a valid `sub`", body)
    refused = re.search(r"in\s+`(\[\"sub\".*?)` the fourth element is `since`, so that one is refused", body)
    assert valid and refused, "the examples of 2.1 moved"
    literal = lambda text: ast.literal_eval(text.replace("null", "None").replace("false", "False"))
    assert type(client_decoder.decode(msgspec.msgpack.encode(literal(valid[1])))) is Unsub
    assert type(client_decoder.decode(msgspec.msgpack.encode(literal(valid[2])))) is Sub
    with pytest.raises(msgspec.ValidationError):
        client_decoder.decode(msgspec.msgpack.encode(literal(refused[1])))
