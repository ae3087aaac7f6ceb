"""Fast path: both implementations behave the same and produce the same bytes."""

import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker._fastpath_py as pure
from broker import fastpath
from broker.messages import Msg, server_decoder


def split_frame(frame: bytes) -> bytes:
    assert frame[0] == 0x82  # FIN + binary, no mask
    size = frame[1]
    assert size < 128
    if size == 126:
        return frame[4:] if int.from_bytes(frame[2:4], "big") == len(frame) - 4 else pytest.fail("bad length")
    if size == 127:
        assert int.from_bytes(frame[2:10], "big") == len(frame) - 10
        return frame[10:]
    assert size == len(frame) - 2
    return frame[2:]


def test_compiled_fast_path_is_active_in_a_normal_install():
    if os.environ.get("BROKER_PURE_PYTHON"):
        assert fastpath.IMPLEMENTATION == "python"
    else:
        assert fastpath.IMPLEMENTATION == "cython"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_frame_header_sizes(fastpath_impl, size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = fastpath_impl.encode_frame(payload)
    assert split_frame(frame) == payload
    assert frame == pure.encode_frame(payload)
    assert fastpath_impl.frame_header(size) == pure.frame_header(size)


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536])
@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_encode_batch_bytes_match(fastpath_impl, count, seq):
    payloads = [bytes([i % 251]) * (i % 7) for i in range(count)]
    prefix = pure.batch_prefix("md.x", 1_700_000_000_000)
    frame = fastpath_impl.encode_batch(prefix, seq, payloads)
    assert frame == pure.encode_batch(prefix, seq, payloads)
    assert server_decoder.decode(split_frame(frame)) == Msg("md.x", 1_700_000_000_000, seq, payloads)


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=300),
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**64 - 1),
    st.lists(st.binary(max_size=70_000), max_size=5) | st.lists(st.binary(max_size=300), max_size=40),
)
def test_batch_parity_property(topic, epoch, seq, payloads):
    from broker import _fastpath as compiled

    prefix = pure.batch_prefix(topic, epoch)
    assert compiled.batch_prefix(topic, epoch) == prefix
    frame = compiled.encode_batch(prefix, seq, payloads)
    assert frame == pure.encode_batch(prefix, seq, payloads)
    assert server_decoder.decode(split_frame(frame)) == Msg(topic, epoch, seq, payloads)
    assert msgspec.msgpack.encode(Msg(topic, epoch, seq, payloads)) == split_frame(frame)


def test_encode_batch_rejects_non_bytes(fastpath_impl):
    with pytest.raises(TypeError):
        fastpath_impl.encode_batch(b"\x95", 1, ["text"])


def test_outbox_push_take_and_limit(fastpath_impl):
    box = fastpath_impl.Outbox("owner", 10)
    assert box.owner == "owner" and box.pending == 0
    assert box.push(b"12345") is False
    assert box.push(b"123456") is True  # 11 > 10: reported once
    assert box.push(b"x") is False  # past its limit the outbox takes nothing more
    assert box.over and box.size == 11
    assert box.take() == b"12345123456"
    assert box.size == 0 and box.take() == b""
    box = fastpath_impl.Outbox("owner", 10)
    box.push(b"only")
    single = box.frames[0]
    assert box.take() is single  # one frame goes out without a copy
    box.transport_bytes = 100
    assert box.pending == 100
    box.closed = True
    assert box.push(b"late") is False and box.size == 0


def test_fan_out_touches_each_outbox_once_and_reports_slow_ones(fastpath_impl):
    a, b, c = (fastpath_impl.Outbox(name, 12) for name in "abc")
    c.closed = True
    touched, slow = [], []
    fastpath_impl.fan_out(b"frame1", (a, b, c), touched, slow)
    b.transport_bytes = 5
    fastpath_impl.fan_out(b"frame2", (a, b, c), touched, slow)
    assert touched == [a, b]
    assert slow == [b]
    assert a.take() == b"frame1frame2" and not a.over
    assert c.size == 0
    fastpath_impl.fan_out(b"frame3", (b,), touched, slow)
    assert slow == [b]  # reported once
    assert b.take() == b"frame1frame2"  # and given nothing after


def test_wrong_types_raise_in_both_implementations(fastpath_impl):
    with pytest.raises(TypeError):
        fastpath_impl.encode_frame(None)
    with pytest.raises(TypeError):
        fastpath_impl.Outbox(None, 10).push(None)
    with pytest.raises(ValueError):
        fastpath_impl.frame_header(-1)
    with pytest.raises((TypeError, AttributeError)):
        fastpath_impl.fan_out(b"x", (object(),), [], [])


# fast_publish: the compiled parser and the pure one agree, and both agree with the general path

from broker.messages import Pub, Sub, decode_client_frame  # noqa: E402

KNOWN = ["md.a", "md.b", "x" * 40, "y" * 300]


def states(impl):
    by_key = {}
    for name in KNOWN:
        state = impl.TopicState(name, 7)
        by_key[state.key] = state
    return by_key


def outcome(impl, data, max_payload=1000, max_count=50):
    by_key = states(impl)
    dirty = []
    count = impl.fast_publish(data, by_key, max_payload, max_count, dirty)
    return count, [(s.name, s.seq, s.first, list(s.pending), s.dirty) for s in dirty]


frames = st.lists(
    st.tuples(
        st.sampled_from(KNOWN + ["unknown"]),
        st.sampled_from([0, 0, 0, 5]),
        st.sampled_from([0, 1, 255, 256, 1000, 1001, 70000]),
    ),
    min_size=1,
    max_size=60,
).map(lambda items: [Pub(i, t, bytes(n)) for t, i, n in items])


@settings(max_examples=300, deadline=None)
@given(frames, st.booleans())
def test_fast_publish_parity_and_agreement_with_general_path(messages, single):
    from broker import _fastpath as compiled

    data = msgspec.msgpack.encode(messages[0] if single else messages)
    got = outcome(compiled, data, max_payload=70000)
    assert got == outcome(pure, data, max_payload=70000)
    count, stamped = got
    decoded, bad = decode_client_frame(data)
    simple = not bad and all(
        type(m) is Pub and m.id == 0 and m.topic in KNOWN and len(m.data) <= 70000 for m in decoded
    ) and len(decoded) <= 50
    assert (count >= 0) == simple
    if count >= 0:
        assert count == len(decoded)
        flat = {name: pending for name, _, _, pending, _ in stamped}
        for name in KNOWN:
            assert flat.get(name, []) == [m.data for m in decoded if m.topic == name]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x90",
        b"\xc1",
        msgspec.msgpack.encode(Sub(0, "md.a")),
        msgspec.msgpack.encode(["pub", 0, "md.a", b"x", "extra"]),
        msgspec.msgpack.encode(["pub", False, "md.a", b"x"]),
        msgspec.msgpack.encode(["pub", 0, "md.a", "text"]),
        msgspec.msgpack.encode([["pub", 0, "md.a", b"x"]]) + b"\x00",  # trailing bytes
        msgspec.msgpack.encode([["pub", 0, "md.a", b"x"]])[:-1],  # truncated
        b"\xdc\x00\x01" + msgspec.msgpack.encode(["pub", 0, "md.a", b"x"]),  # non-canonical array16
        b"\x94\xa3pub\xcc\x00\xa4md.a\xc4\x01x",  # non-canonical id
    ],
)
def test_fast_publish_leaves_unusual_frames_to_the_general_path(fastpath_impl, data):
    assert outcome(fastpath_impl, data)[0] == -1
    assert outcome(fastpath_impl, data) == (-1, [])


def test_fast_publish_limits(fastpath_impl):
    batch = msgspec.msgpack.encode([Pub(0, "md.a", b"12345")] * 3)
    assert outcome(fastpath_impl, batch, max_payload=5, max_count=3)[0] == 3
    assert outcome(fastpath_impl, batch, max_payload=4, max_count=3)[0] == -1
    assert outcome(fastpath_impl, batch, max_payload=5, max_count=2)[0] == -1
