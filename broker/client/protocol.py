"""The client's sans-I/O core: request ids and their waiters, the topic table, the
subscriptions with their positions and `since`, dispatch of what the broker sends, the offline
queue with its msg_ids, and the frames to send.

It never touches a socket, a timer or an event loop (it imports no asyncio and no picows; a
test checks): the connection layer (broker.client.connection) hands it every binary frame
received (`receive`) and the connection's ups and downs (`opened`, `lost`), sets `paused` as
the transport asks, and gives it two hooks: `send_frame` writes one frame now, `call_soon`
runs `flush` at the end of the loop's turn, so that the publishes of one turn leave in one
frame. A request's waiter is anything with `done`, `set_result` and `set_exception` (the
connection layer passes an asyncio.Future). clients/js/src/protocol.ts is the same core in
TypeScript.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec

from ..errors import BrokerError, ConnectionClosed, RequestError, SubscriptionEnded
from ..messages import (
    MAX_SINCE_TOPICS,
    Ack,
    Err,
    Gap,
    GapNotice,
    Msg,
    ProtocolViolation,
    Pub,
    Reply,
    Request,
    Sub,
    Topic,
    Unsub,
    Unsubscribed,
    decode_server_frame,
    encode,
)
from ..topics import is_pattern
from .index import SubscriptionIndex

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = ["ClientProtocol", "PublishAck", "Waiter", "since_of", "wire_since"]

log = logging.getLogger("broker.client")

# How every fire-and-forget publish the client encodes begins: ["pub", 0, ...]
PUB_NO_ACK = b"\x94\xa3pub\x00"
_pub_decoder = msgspec.msgpack.Decoder(Pub)


class PublishAck(NamedTuple):
    epoch: int
    seq: int


class Waiter(Protocol):
    """Who waits for a request's answer (an asyncio.Future in the connection layer)."""

    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


def wire_since(since: Any) -> list | None:
    """The `since` of a subscribe call as the `sub` message carries it."""
    if since is None:
        return None
    head, rest = since
    return [head, {t: list(p) for t, p in rest.items()} if isinstance(rest, dict) else rest]


def since_of(sub: Subscription) -> list:
    """Where a subscription made again after a reconnection starts: after what it delivered."""
    if is_pattern(sub.pattern):
        # The broker takes the positions of at most MAX_SINCE_TOPICS topics; topics left out
        # are replayed from the subscription's time and the overlap is skipped here.
        positions: dict[str, list[int]] = {}
        for topic, position in sub.positions.items():
            if len(positions) == MAX_SINCE_TOPICS:
                break
            positions[topic] = list(position)
        return [sub.epoch, positions]
    last = sub.positions.get(sub.pattern)
    if last is not None:
        return list(last)
    return [sub.epoch, sub.seq] if sub.epoch else [0, 0]


def _unattached(_: object) -> None:
    """`send_frame` and `call_soon` until the connection layer sets them: frames are only
    written while connected and queued once the client is open, so this is never reached."""
    raise RuntimeError("the client's core is not attached to a connection")


class _Resubscribing:
    """The waiter of a subscription made again after a reconnection: nobody awaits it; a
    refusal ends the subscription with the broker's error."""

    __slots__ = ("core", "rid", "sub", "finished")

    def __init__(self, core: ClientProtocol, rid: int, sub: Subscription) -> None:
        self.core = core
        self.rid = rid
        self.sub = sub
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any) -> None:
        self.finished = True
        self.core.pending.pop(self.rid, None)

    def set_exception(self, exception: BaseException) -> None:
        self.finished = True
        self.core.pending.pop(self.rid, None)
        if isinstance(exception, RequestError):
            # the broker refused the subscription again: it ends with that error
            self.core.forget(self.sub)
            self.sub.finish(exception)


class ClientProtocol:
    """The state of one client across its connections, and every rule about it."""

    def __init__(
        self,
        *,
        max_batch_bytes: int,
        max_batch_messages: int,
        max_offline_messages: int,
        offline_overflow: str,
        on_error: Callable[[RequestError], object],
        on_request: Callable[[Request], object],
        on_violation: Callable[[str], object],
    ) -> None:
        self.max_batch_bytes = max_batch_bytes  # a turn's messages are split into frames of about this size
        self.max_batch_messages = max_batch_messages  # and of at most this many messages (the broker's limit)
        self.max_offline_messages = max_offline_messages
        self.offline_overflow = offline_overflow
        self.on_error = on_error  # an `err` no request waits for (a fire-and-forget publish)
        self.on_request = on_request  # a `request` to one of the client's responders
        self.on_violation = on_violation  # the broker sent something unreadable: close the connection
        self.send_frame: Callable[[bytes], object] = _unattached  # the current connection's writer
        self.call_soon: Callable[[Callable[[], None]], object] = _unattached  # runs a callable at the end of the turn
        self.connected = False  # a connection is open and frames can be sent
        self.closed = True  # not opened yet, or closed for good
        self.paused = False  # the transport takes no more for now: frames wait in `held`
        self.next_id = 0
        self.pending: dict[int, Waiter] = {}  # request id -> its waiter
        self.on_ack: dict[int, Callable[[Ack], None]] = {}  # run synchronously when an ack is read
        self.subs: dict[str, Subscription] = {}
        self.index: SubscriptionIndex[Subscription] = SubscriptionIndex()
        self.topics: dict[int, tuple[str, int]] = {}  # topic id -> (name, epoch), from `topic` messages
        self.responders: dict[str, Callable[[Request], Any]] = {}  # topic -> the handler of its requests
        self.outgoing: list[bytes] = []  # the messages of the frame being filled
        self.outgoing_bytes = 0
        self._flush_scheduled = False
        self.held: deque[list[bytes]] = deque()  # frames not written while the transport is paused
        self.held_bytes = 0
        self.offline: deque[tuple[str, bytes, str]] = deque()  # publishes waiting for a connection: (topic, data, msg_id)
        self.inflight: dict[int, tuple[str, bytes, str]] = {}  # offline publishes sent, not yet acked
        self.offline_dropped = 0  # publishes dropped from a full offline queue (drop_oldest)
        self.publisher_id = random.getrandbits(64).to_bytes(8, "big").hex()  # prefix of its msg_ids
        self._msg_ids = 0

    # the connection

    def opened(self, send_frame: Callable[[bytes], object]) -> None:
        """A connection is open: `send_frame` writes to it. Topic ids are the connection's."""
        self.topics = {}
        self.paused = False
        self.send_frame = send_frame
        self.connected = True

    def lost(self, error: ConnectionClosed, keep: bool) -> None:
        """The connection ended: requests waiting for a reply fail with `error`; fire-and-forget
        publishes not written yet, and offline ones sent but not acknowledged, wait for the
        next connection (`keep` False: the client will not reconnect, they are dropped)."""
        self.connected = False
        # Not written yet: fire-and-forget publishes wait for the next connection (ahead of
        # later ones); requests among them fail below with the others.
        waiting = [m for out in self.held for m in out] + self.outgoing
        unsent = [_pub_decoder.decode(m) for m in waiting if m.startswith(PUB_NO_ACK)]
        self.outgoing = []
        self.outgoing_bytes = 0
        self.held.clear()
        self.held_bytes = 0
        if keep:
            # offline publishes sent but not acknowledged go first (with their msg_ids), then
            # those never written (given msg_ids now)
            held = list(self.inflight.values()) + [(m.topic, m.data, self.new_msg_id()) for m in unsent]
            self.offline.extendleft(reversed(held))
        self.inflight.clear()
        for waiter in list(self.pending.values()):
            if not waiter.done():
                waiter.set_exception(error)
        self.on_ack.clear()

    def finish(self, error: BaseException | None) -> None:
        """The client is closed for good: every subscription ends (with `error`, if any)."""
        self.closed = True
        for sub in list(self.subs.values()):
            sub.finish(error)
        self.offline.clear()

    # frames out

    def queue(self, encoded: bytes) -> None:
        """Add one encoded message to the frame being filled (sent at the end of the turn)."""
        out = self.outgoing
        if out and (self.outgoing_bytes + len(encoded) > self.max_batch_bytes or len(out) >= self.max_batch_messages):
            self._send_batch()  # keep every frame within the broker's max_frame_bytes and max_batch_messages
        self.outgoing.append(encoded)
        self.outgoing_bytes += len(encoded)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.call_soon(self.flush)

    def flush(self) -> None:
        """Send the frame being filled."""
        self._flush_scheduled = False
        self._send_batch()

    def _send_batch(self) -> None:
        out = self.outgoing
        if not out or not self.connected:
            return
        size = self.outgoing_bytes
        self.outgoing = []
        self.outgoing_bytes = 0
        if self.paused or self.held:
            self.held.append(out)  # written, in order, when the transport resumes
            self.held_bytes += size
            return
        self._write(out)

    def write_held(self, force: bool = False) -> None:
        """Write the frames held while the transport was paused (`force`: even if it still is)."""
        held = self.held
        while held and (force or not self.paused) and self.connected:
            out = held.popleft()
            self.held_bytes -= sum(map(len, out))
            self._write(out)

    def _write(self, out: list[bytes]) -> None:
        """One frame: the message, or the batch of messages."""
        if len(out) == 1:
            frame = out[0]
        else:
            n = len(out)
            head = bytes((0x90 | n,)) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 65536 else b"\xdd" + n.to_bytes(4, "big"))
            frame = head + b"".join(out)
        self.send_frame(frame)

    def request(self, make: Callable[[int], object], waiter: Waiter, on_ack: Callable[[Ack], None] | None = None) -> int:
        """Queue the request `make(id)` under a new id; its answer goes to `waiter`, and an ack
        to `on_ack` first, as it is read. The caller removes `pending[id]` when done waiting."""
        self.next_id += 1
        rid = self.next_id
        self.pending[rid] = waiter
        if on_ack is not None:
            self.on_ack[rid] = on_ack
        self.queue(encode(make(rid)))
        return rid

    # subscriptions

    def activate(self, sub: Subscription, ack: Ack, since: Any, last: bool) -> None:
        """The ack of a subscription's first `sub`. Runs as the ack is read, before any later
        frame: the subscription receives exactly the messages the broker sends after its ack,
        even if another local subscription already receives the topic."""
        pattern = sub.pattern
        if sub.abandoned:
            if not self.closed:
                self.queue(encode(Unsub(0, pattern)))
            return
        sub.epoch, sub.seq = ack.epoch, ack.seq
        sub.active = True
        if since is not None:
            if isinstance(since[1], dict):
                sub.positions.update(since[1])
            else:
                sub.positions[pattern] = since
        elif ack.epoch and not is_pattern(pattern):
            # what the connection gets of the topic at or before the ack (a replay another
            # subscription asked for) is not this one's; with `last`, the latest retained
            # message, which the broker sends right after the ack, is
            sub.positions[pattern] = (ack.epoch, ack.seq - 1 if last and ack.seq else ack.seq)
        self.index.add(pattern, sub)

    def abandon(self, sub: Subscription) -> None:
        """subscribe() gave up before the ack (cancelled, timed out): the broker may hold, or
        still make, the subscription; undo it there."""
        sub.abandoned = True
        if self.index.remove(sub.pattern, sub) and not self.closed:
            self.queue(encode(Unsub(0, sub.pattern)))
        self.forget(sub)

    def forget(self, sub: Subscription) -> None:
        """Deliver nothing more to `sub` and do not make it again."""
        if self.subs.get(sub.pattern) is sub:
            del self.subs[sub.pattern]
            self.index.remove(sub.pattern, sub)

    def drop(self, sub: Subscription) -> None:
        """Unsubscribe at the broker after a local overflow (no reply is awaited)."""
        if self.subs.get(sub.pattern) is sub:
            self.forget(sub)
            if not self.closed:
                self.queue(encode(Unsub(0, sub.pattern)))

    def resubscribe(self) -> None:
        """Make every subscription again, each from where it stopped delivering, and every
        responder registration."""
        for topic in self.responders:
            self.queue(encode(Sub(0, topic, None, False, True)))
        for sub in list(self.subs.values()):
            if not sub.active or sub.done:
                continue
            self.next_id += 1
            rid = self.next_id
            self.on_ack[rid] = partial(self._resubscribed, sub)
            self.pending[rid] = _Resubscribing(self, rid, sub)
            self.queue(encode(Sub(rid, sub.pattern, since_of(sub), False, False, sub.policy)))

    @staticmethod
    def _resubscribed(sub: Subscription, ack: Ack) -> None:
        sub.epoch, sub.seq = ack.epoch, ack.seq

    # publishing

    def new_msg_id(self) -> str:
        """A msg_id no other publish of this client (or, with overwhelming likelihood, of any
        other client) carries: its random publisher id and a counter."""
        self._msg_ids += 1
        return f"{self.publisher_id}-{self._msg_ids}"

    def hold(self, topic: str, data: bytes) -> None:
        """Queue a publish until the client is connected again, with a msg_id of its own, so
        sending it again after another lost connection cannot publish it twice."""
        offline = self.offline
        if len(offline) >= self.max_offline_messages:
            if self.offline_overflow == "raise" or not offline:
                raise BrokerError(f"not connected and {len(offline)} publishes already wait (max_offline_messages)")
            offline.popleft()
            self.offline_dropped += 1
            log.warning("offline queue full: dropped the oldest waiting publish (%d so far)", self.offline_dropped)
        offline.append((topic, data, self.new_msg_id()))

    def send_offline(self) -> None:
        """Send the publishes that waited, each acknowledged (so that one lost with another
        connection is known and sent again, under the same msg_id)."""
        while self.offline and self.connected:
            topic, data, msg_id = item = self.offline.popleft()
            self.next_id += 1
            rid = self.next_id
            self.inflight[rid] = item
            self.on_ack[rid] = partial(self._acked_offline, rid)
            self.queue(encode(Pub(rid, topic, data, msg_id)))

    def _acked_offline(self, rid: int, ack: Ack) -> None:
        self.inflight.pop(rid, None)

    # frames in

    def receive(self, data: memoryview | bytes) -> None:
        """One binary frame from the broker."""
        try:
            messages = decode_server_frame(data)
        except ProtocolViolation as exc:
            self.on_violation(str(exc))
            return
        for message in messages:
            if type(message) is Msg:
                for topic_id, seq, payloads in message.batches:
                    known = self.topics.get(topic_id)
                    if known is None:
                        self.on_violation(f"delivery for topic id {topic_id}, which was never announced")
                        return
                    topic, epoch = known
                    for sub in self.index.lookup(topic):
                        sub.receive(topic, epoch, seq, payloads)
            elif type(message) is GapNotice:
                gap = Gap(message.topic, message.epoch, message.first, message.last, message.reason, message.cause)
                for sub in self.index.lookup(message.topic):
                    sub.gap(gap)
            elif type(message) is Topic:
                self.topics[message.id] = (message.topic, message.epoch)
            elif type(message) is Request:
                self.on_request(message)
            elif type(message) is Reply:
                waiter = self.pending.get(message.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            elif type(message) is Ack:
                hook = self.on_ack.pop(message.id, None)
                if hook is not None:
                    hook(message)
                waiter = self.pending.get(message.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            elif type(message) is Unsubscribed:
                ended = self.subs.get(message.topic)
                if ended is not None:  # ended by the broker: not made again on a reconnection
                    self.forget(ended)
                    ended.finish(SubscriptionEnded(message.topic, message.reason))
            elif type(message) is Err:
                self.on_ack.pop(message.id, None)
                self.inflight.pop(message.id, None)
                error = RequestError(message.code, message.text, message.id)
                waiter = self.pending.get(message.id)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)
                else:
                    self.on_error(error)
