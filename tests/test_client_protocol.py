"""The client's sans-I/O core (broker.client.protocol) driven with plain calls: frames in as
bytes, frames out through a list, no socket and no event loop."""

from __future__ import annotations

import subprocess
import sys

import msgspec

from broker.client.protocol import ClientProtocol
from broker.client.subscription import Gap, Message, Subscription
from broker.errors import ConnectionClosed
from broker.messages import Ack, GapNotice, Topic, encode


class Waiter:
    """A request's waiter without a loop: records what it is given."""

    def __init__(self) -> None:
        self.result = self.error = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result) -> None:
        self.finished, self.result = True, result

    def set_exception(self, exception) -> None:
        self.finished, self.error = True, exception


def frame(*messages: bytes) -> bytes:
    """A server frame: an array of messages."""
    return bytes((0x90 | len(messages),)) + b"".join(messages)


def core_with(sent: list[bytes], soon: list) -> ClientProtocol:
    core = ClientProtocol(
        max_batch_bytes=1 << 20,
        max_batch_messages=1000,
        max_offline_messages=10,
        offline_overflow="raise",
        on_error=lambda error: None,
        on_request=lambda request: None,
        on_violation=lambda text: sent.append(("violation", text)),
    )
    core.call_soon = soon.append
    core.closed = False
    core.opened(sent.append)
    return core


def test_the_client_protocol_imports_no_asyncio_picows_or_uvloop():
    code = (
        "import sys, broker.client.protocol\n"
        "loaded = sorted(m for m in ('asyncio', 'picows', 'uvloop') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_subscription_is_made_delivered_to_and_told_of_gaps_through_plain_calls():
    sent: list = []
    soon: list = []
    core = core_with(sent, soon)
    items: list = []
    sub = Subscription(None, "t.*", items.append, 100)  # type: ignore[arg-type]
    core.subs["t.*"] = sub
    waiter = Waiter()
    rid = core.request(lambda rid: ["sub", rid, "t.*"], waiter, lambda ack: core.activate(sub, ack, None, False))
    assert not sent and soon == [core.flush]  # one frame per turn, sent when the turn ends
    core.flush()
    assert [msgspec.msgpack.decode(frame) for frame in sent] == [["sub", rid, "t.*"]]
    core.receive(frame(encode(Ack(rid, 5, 0))))
    assert waiter.result == Ack(rid, 5, 0) and sub.active
    core.receive(
        frame(
            encode(Topic(3, "t.a", 7)),
            msgspec.msgpack.encode(["msg", [3, 1, b"x", b"y"]]),
            encode(GapNotice("t.a", 7, 3, 4, "lost", "history")),
        )
    )
    assert items == [Message("t.a", 7, 1, b"x"), Message("t.a", 7, 2, b"y"), Gap("t.a", 7, 3, 4, "lost", "history")]
    assert sub.positions == {"t.a": (7, 4)}


def test_a_delivery_for_an_unannounced_topic_id_is_a_violation():
    sent: list = []
    core = core_with(sent, [])
    core.receive(frame(msgspec.msgpack.encode(["msg", [9, 1, b"x"]])))
    assert sent == [("violation", "delivery for topic id 9, which was never announced")]


def test_publishes_not_written_when_the_connection_is_lost_wait_offline_with_msg_ids():
    sent: list = []
    core = core_with(sent, [])
    core.queue(encode(["pub", 0, "t.a", b"1"]))
    core.queue(encode(["pub", 0, "t.a", b"2"]))
    core.lost(ConnectionClosed(1006, "cut"), keep=True)
    assert not sent and not core.connected
    assert [(t, d) for t, d, _ in core.offline] == [("t.a", b"1"), ("t.a", b"2")]
    core.opened(sent.append)
    core.send_offline()
    core.flush()
    batch = msgspec.msgpack.decode(sent[0])
    assert [m[:3] for m in batch] == [["pub", 1, "t.a"], ["pub", 2, "t.a"]] and batch[0][4] != batch[1][4]
