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
