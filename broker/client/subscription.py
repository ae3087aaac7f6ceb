"""What the application receives: a Subscription, the Messages it delivers and the Gaps that
say what it will not deliver.

A Subscription is fed by the client's sans-I/O core (broker.client.protocol: `receive` for a
batch of a topic, `gap` for a gap notice) and read by the application, as an async iterator
or through a callback. Its positions (per topic, the last message delivered) are what the
core asks the broker to recover from after a reconnection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..errors import SubscriptionOverflow
from ..messages import Gap, PolicyName

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Callback", "Gap", "Message", "Subscription"]

log = logging.getLogger("broker.client")


class Message(NamedTuple):
    """A delivered message. `conflated`: the broker skipped the messages before it (a Gap with
    cause "conflated" came first) and this was the topic's newest at that moment."""

    topic: str
    epoch: int
    seq: int
    data: bytes
    conflated: bool = False


Callback = Callable[["Message | Gap"], object]


class Subscription:
    """A subscription: an async iterator of Messages (and Gaps), or a callback target.

    Each message reaches it once and in order per topic: `positions` holds, per topic, the
    (epoch, seq) of the last message delivered, and anything at or before it (a replay
    overlapping what arrived live) is skipped. A Gap says which messages will not come."""

    def __init__(self, client: Client, pattern: str, callback: Callback | None, max_queue: int, policy: PolicyName = "") -> None:
        self.client = client
        self.pattern = pattern
        self.policy = policy  # its slow-consumer policy at the broker ("": the server's)
        self.callback = callback
        self.max_queue = max_queue
        self.epoch = 0  # from the subscribe ack (exact topics): the topic's epoch
        self.seq = 0  # and the last sequence number published before the subscription
        self.positions: dict[str, tuple[int, int]] = {}  # topic -> (epoch, last seq delivered)
        self.done = False  # ended: nothing more is delivered
        self.abandoned = False  # subscribe() was cancelled before its ack
        self.active = False  # acknowledged: held at the broker (re-made after a reconnect)
        self._queue: deque[Message | Gap] = deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._conflated: set[str] = set()  # topics whose next message follows a conflated gap
        # topic -> the epoch this subscription was told ended (a gap with last 0): nothing more
        # of that epoch can come, and the connection may be told again (each `sub` recovering
        # the topic reports it, and every subscription matching the topic hears each report)
        self._ended: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """The messages and gaps queued for the iterator and not read yet (at most max_queue;
        always 0 with a callback, which takes each as it arrives)."""
        return len(self._queue)

    def receive(self, topic: str, epoch: int, seq: int, payloads: list[bytes]) -> None:
        """A batch of the topic: deliver what lies after this subscription's position."""
        position = self.positions.get(topic)
        start = 0
        if position is not None and position[0] == epoch:
            start = position[1] + 1 - seq
            if start >= len(payloads):
                return
            if start < 0:
                start = 0
        self.positions[topic] = (epoch, seq + len(payloads) - 1)
        if self._conflated and topic in self._conflated:
            self._conflated.discard(topic)
            self._deliver(Message(topic, epoch, seq + start, payloads[start], True))
            start += 1
        for i in range(start, len(payloads)):
            self._deliver(Message(topic, epoch, seq + i, payloads[i]))

    def gap(self, gap: Gap) -> None:
        """A gap notice of a topic it matches: deliver the part not delivered already."""
        if self._ended and self._ended.get(gap.topic) == gap.epoch:
            return  # handed on already: the rest of this epoch will not come
        position = self.positions.get(gap.topic)
        if position is not None and position[0] == gap.epoch:
            if gap.last and gap.last <= position[1]:
                return  # this subscription delivered all of it already
            if gap.first <= position[1] or (not gap.last and gap.first > position[1] + 1):
                # (an epoch that ended: nothing of it after the position can come any more)
                gap = gap._replace(first=position[1] + 1)
        if gap.last:
            self.positions[gap.topic] = (gap.epoch, gap.last)
        else:
            self._ended[gap.topic] = gap.epoch
        if gap.cause == "conflated":
            self._conflated.add(gap.topic)
        else:
            self._conflated.discard(gap.topic)
        self._deliver(gap)

    def _deliver(self, message: Message | Gap) -> None:
        if self.callback is not None:
            try:
                self.callback(message)
            except Exception:
                log.exception("subscription callback for %r raised", self.pattern)
            return
        if self.done:
            return
        if len(self._queue) >= self.max_queue:
            self.finish(SubscriptionOverflow(f"subscription {self.pattern!r}: more than {self.max_queue} messages unread"))
            self.client.protocol.drop(self)
            return
        self._queue.append(message)
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        """End it: an iterator stops once the queued items are read (raising `error`, if any)."""
        if not self.done:
            self.done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message | Gap:
        if self._waiter is not None:
            raise RuntimeError(f"another coroutine is already waiting on subscription {self.pattern!r}")
        while not self._queue:
            if self.done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def next(self, timeout: float | None = None) -> Message | Gap:
        """The next message (or gap), waiting at most `timeout` seconds (asyncio.TimeoutError after)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self)
