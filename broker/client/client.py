"""The client's public API: `Client`, on the connection layer (broker.client.connection)
and its sans-I/O core (broker.client.protocol).

    async with Client("ws://127.0.0.1:7341/") as client:
        sub = await client.subscribe("md.>")
        client.publish("md.AAPL", b"189.5")            # fire-and-forget, batched per tick
        ack = await client.publish_acked("md.AAPL", b"189.6")
        async for message in sub:
            print(message.topic, message.seq, message.data)

Publishes made in the same loop tick leave in one WebSocket frame. Replies are matched to
requests by id; a refused request raises RequestError with the broker's error code.

When the connection drops, the client reconnects (exponential backoff with full jitter) and
subscribes again with `since` set to what each subscription last delivered, so the
application sees every message once and in order, or a Gap saying exactly what is missing.
Fire-and-forget publishes made while it is disconnected wait in a bounded queue.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..errors import BrokerError, ConnectionClosed, ErrorCode, RequestError
from ..messages import (
    MAX_REQUEST_TIMEOUT_MS,
    PolicyName,
    Pub,
    Req,
    Request,
    Sub,
    Unsub,
    encode,
)
from ..topics import validate_pattern, validate_topic
from .connection import Connection
from .protocol import PublishAck, wire_since
from .subscription import Callback, Subscription

__all__ = ["Client"]


class Client(Connection):
    """One connection to a broker. Use `await Client.connect(url)` or `async with Client(url)`.

    `url` is `ws://HOST:PORT/PATH`, or `wss://...` for a broker that serves TLS; or a list of
    them, the nodes of one cluster: each reconnection attempt takes the next one, so a client
    whose node went away moves to another and recovers there. `ssl` is the
    ssl.SSLContext of wss:// connections; without it a wss:// URL uses the system's default
    context (`ssl.create_default_context()`: the system's trusted CAs, the host name checked
    against the certificate), made once, at the first connection. For a broker whose
    certificate comes from a private CA:

        context = ssl.create_default_context(cafile="ca.pem")
        client = await Client.connect("wss://broker.internal:7341/", ssl=context)

    Reconnections use the same context. `ssl` with a ws:// URL is a ValueError."""

    # settings and counters kept by the core

    @property
    def max_batch_bytes(self) -> int:
        """A tick's publishes are split into frames of about this size."""
        return self.protocol.max_batch_bytes

    @property
    def max_batch_messages(self) -> int:
        """And of at most this many messages (the broker's limit)."""
        return self.protocol.max_batch_messages

    @property
    def max_offline_messages(self) -> int:
        return self.protocol.max_offline_messages

    @property
    def offline_overflow(self) -> str:
        return self.protocol.offline_overflow

    @property
    def offline_dropped(self) -> int:
        """Publishes dropped from a full offline queue (drop_oldest)."""
        return self.protocol.offline_dropped

    @property
    def publisher_id(self) -> str:
        """The random prefix of this client's msg_ids."""
        return self.protocol.publisher_id

    def new_msg_id(self) -> str:
        """A msg_id no other publish of this client (or, with overwhelming likelihood, of any
        other client) carries: its random publisher id and a counter."""
        return self.protocol.new_msg_id()

    # requests

    async def subscribe(
        self,
        pattern: str,
        callback: Callback | None = None,
        *,
        max_queue: int | None = None,
        since: tuple[int, int] | tuple[int, dict[str, tuple[int, int]]] | None = None,
        last: bool = False,
        policy: PolicyName = "",
    ) -> Subscription:
        """Subscribe to a topic or pattern; returns once the broker acknowledged it.

        Without a callback, iterate the returned Subscription for messages. With one, the
        callback runs for every message (synchronously, in the loop: keep it short).

        `since` recovers from the broker's history what came after a position: (epoch, seq)
        for a topic; (time_ms, {topic: (epoch, seq)}) for a pattern, where time_ms is the
        `epoch` of an earlier pattern subscription's ack. `last` starts with the latest
        retained message of each matching topic. Ranges that cannot be replayed arrive as
        Gap items (docs/guarantees.md).

        `policy` is what the broker does with this subscription's messages while the
        connection is behind: "disconnect", "drop" (the oldest, each range announced by a Gap)
        or "conflate" (all but each topic's newest, announced by a Gap; the message after it
        has `conflated` set); "" takes the server's setting."""
        validate_pattern(pattern)
        if policy not in ("", "disconnect", "drop", "conflate"):
            raise ValueError(f"policy is one of 'disconnect', 'drop', 'conflate' (or '' for the server's), not {policy!r}")
        on_wire = wire_since(since)
        core = self.protocol
        if pattern in core.subs:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {pattern!r}")
        sub = Subscription(self, pattern, callback, max_queue or self.max_queue, policy)
        core.subs[pattern] = sub
        try:
            await self.roundtrip(
                lambda rid: Sub(rid, pattern, on_wire, last, False, policy), lambda ack: core.activate(sub, ack, since, last)
            )
        except RequestError:
            core.forget(sub)
            raise
        except BaseException:
            core.abandon(sub)
            raise
        return sub

    async def unsubscribe(self, target: Subscription | str) -> None:
        pattern = target.pattern if isinstance(target, Subscription) else target
        sub = self.protocol.subs.get(pattern)
        if sub is None:
            raise RequestError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {pattern!r}")
        self.protocol.forget(sub)
        sub.finish(None)
        if self.protocol.connected:
            await self.roundtrip(lambda rid: Unsub(rid, pattern))
        # while reconnecting there is nothing to undo at the broker: it is not made again

    def publish(self, topic: str, data: bytes) -> None:
        """Fire-and-forget publish. Publishes within one loop tick leave in one frame.

        While the socket takes no more (the transport paused writing), publishes wait in the
        client, up to max_buffered_bytes; past that `publish` raises BrokerError: await
        `drain()` first. While the client is reconnecting the publish waits in the offline queue (at most
        max_offline_messages; when full it raises BrokerError, or with offline_overflow
        'drop_oldest' drops the oldest waiting publish and counts it in offline_dropped)."""
        self.check_open()
        core = self.protocol
        if core.connected:
            if core.paused and core.held_bytes + core.outgoing_bytes >= self.max_buffered_bytes:
                raise BrokerError(
                    f"the connection takes no more for now: {core.held_bytes + core.outgoing_bytes} bytes of"
                    f" publishes wait (max_buffered_bytes); await drain() before publishing more"
                )
            core.queue(encode(["pub", 0, topic, data]))  # the 4-element form: protocol.PUB_NO_ACK
            return
        validate_topic(topic)
        core.hold(topic, data)

    async def publish_acked(self, topic: str, data: bytes, *, msg_id: str | None = None) -> PublishAck:
        """Publish and wait for the broker's ack: returns the epoch and sequence number given.

        The publish carries a msg_id (`msg_id`, or one of the client's own): if the connection
        drops before the ack, it is sent again once the client has reconnected, and the broker
        acknowledges a repeat within its dedupe window with the original sequence number
        instead of publishing it twice. Gives up (ConnectionClosed) after request_timeout."""
        validate_topic(topic)
        if msg_id is None:
            msg_id = self.new_msg_id()
        deadline = self.loop.time() + self.request_timeout
        while True:
            try:
                ack = await self.roundtrip(lambda rid: Pub(rid, topic, data, msg_id))
                return PublishAck(ack.epoch, ack.seq)
            except ConnectionClosed:
                if self.closed or self.loop.time() >= deadline:
                    raise

    async def request(self, topic: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        """Ask one responder of `topic` (see `respond`) and return its reply's data.

        Raises RequestError with NO_RESPONDERS at once when nobody responds to the topic (or
        the responder left before replying), REQUEST_TIMEOUT after `timeout` seconds."""
        validate_topic(topic, need="a request")
        timeout_ms = min(max(1, round(timeout * 1000)), MAX_REQUEST_TIMEOUT_MS)
        reply = await self.roundtrip(lambda rid: Req(rid, topic, data, timeout_ms), timeout=timeout + self.request_timeout)
        return reply.data

    async def respond(self, topic: str, handler: Callable[[Request], bytes | Awaitable[bytes]]) -> None:
        """Answer the requests to the concrete `topic`: `handler(request)` returns (or, as a
        coroutine function, resolves to) the reply's bytes. The Request has `id`, `topic`,
        `data` and `user`, the requester's user as its token names it (None without
        authentication, or for an anonymous requester). A handler that raises is logged
        and its request gets no reply (the requester times out)."""
        validate_topic(topic, need="a responder")
        responders = self.protocol.responders
        if topic in responders:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already responding to {topic!r}")
        responders[topic] = handler
        try:
            await self.roundtrip(lambda rid: Sub(rid, topic, None, False, True))
        except BaseException:
            responders.pop(topic, None)
            raise

    async def unrespond(self, topic: str) -> None:
        """Stop answering the requests to `topic`."""
        if self.protocol.responders.pop(topic, None) is None:
            raise RequestError(ErrorCode.NOT_SUBSCRIBED, f"not responding to {topic!r}")
        if self.protocol.connected:
            await self.roundtrip(lambda rid: Unsub(rid, topic))
