"""Wire schema: round trips, and any bytes decode to messages or documented errors."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ErrorCode
from broker.messages import (
    Ack,
    Batch,
    Err,
    GapNotice,
    Msg,
    ProtocolViolation,
    Pub,
    Sub,
    Topic,
    Unsub,
    client_decoder,
    decode_client_frame,
    decode_server_frame,
    encode,
    is_message_array,
)
from conftest import wire

ids = st.integers(0, 2**63 - 1)
texts = st.text(max_size=40)
client_messages = st.one_of(
    st.builds(Sub, ids, texts),
    st.builds(Unsub, ids, texts),
    st.builds(Pub, ids, texts, st.binary(max_size=300)),
)
server_messages = st.one_of(
    st.builds(Ack, ids, st.integers(0, 2**63), st.integers(0, 2**63)),
    st.builds(Err, ids, st.integers(0, 100), texts),
    st.builds(Topic, ids, texts, st.integers(0, 2**64 - 1)),
    st.builds(
        Msg,
        st.lists(
            st.builds(Batch, st.integers(0, 2**32), st.integers(0, 2**64 - 1), st.lists(st.binary(max_size=100), min_size=1, max_size=20)),
            min_size=1,
            max_size=20,
        ),
    ),
)


@given(client_messages)
def test_client_message_round_trip(message):
    data = encode(message)
    assert client_decoder.decode(data) == message
    assert decode_client_frame(data) == ([message], [])
    assert not is_message_array(data)


@given(st.lists(client_messages, min_size=1, max_size=40))
def test_client_batch_round_trip(messages):
    data = encode(messages)
    assert is_message_array(data)
    assert decode_client_frame(data) == (messages, [])


@given(st.lists(server_messages, min_size=1, max_size=10))
def test_server_frame_round_trip(messages):
    assert decode_server_frame(encode([wire(m) for m in messages])) == messages


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_server_frame_or_a_protocol_violation(data):
    try:
        messages = decode_server_frame(data)
    except ProtocolViolation:
        return
    assert all(type(m) in (Ack, Err, Topic, GapNotice, Msg) for m in messages)


DOCUMENTED = {int(code) for code in ErrorCode}


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_give_documented_errors(data):
    good, bad = decode_client_frame(data)
    for message in good:
        assert isinstance(message, (Sub, Unsub, Pub))
    for problem in bad:
        assert problem.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE)
        assert 0 <= problem.request_id < 2**63
        assert problem.text
    assert good or bad


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=5),
    max_leaves=15,
)


@settings(max_examples=500)
@given(st.lists(json_like, max_size=6))
def test_any_msgpack_array_decodes_or_gives_documented_errors(value):
    good, bad = decode_client_frame(msgspec.msgpack.encode(value))
    assert good or bad
    assert all(problem.code in DOCUMENTED for problem in bad)


def test_errors_keep_request_ids_and_good_batch_members():
    frame = encode([Pub(1, "a", b"x"), ["pub", 2, "t"], ["nope", 3], 17, Sub(4, "b")])
    good, bad = decode_client_frame(frame)
    assert good == [Pub(1, "a", b"x"), Sub(4, "b")]
    assert [(p.request_id, p.code) for p in bad] == [
        (2, ErrorCode.BAD_MESSAGE),
        (3, ErrorCode.UNKNOWN_TYPE),
        (0, ErrorCode.BAD_MESSAGE),
    ]


def test_trailing_fields_are_ignored_for_forward_compatibility():
    assert client_decoder.decode(msgspec.msgpack.encode(["sub", 1, "a.b", None, False, False, "", {"future": True}])) == Sub(1, "a.b")


def test_payload_must_be_binary():
    good, bad = decode_client_frame(msgspec.msgpack.encode(["pub", 5, "t", "text"]))
    assert good == [] and bad[0].request_id == 5 and bad[0].code == ErrorCode.BAD_MESSAGE


def test_unknown_server_message_types_are_skipped():
    frame = encode([["ack", 1, 0, 0], ["later", 1, {"x": 2}], ["gap", "t", 5, 2, 3, "why"]])
    assert decode_server_frame(frame) == [Ack(1, 0, 0), GapNotice("t", 5, 2, 3, "why")]
    with pytest.raises(ProtocolViolation):
        decode_server_frame(encode([["ack", "not an id"]]))  # a known type that cannot be read
