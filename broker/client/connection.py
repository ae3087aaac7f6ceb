"""The client's connection layer: the asyncio shell around the sans-I/O core.

`Connection` (the base of broker.client.client.Client) holds what needs a loop or a socket:
the picows connection and its listener, reconnection with backoff (exponential, full jitter),
token refresh, the heartbeat watchdog, requests awaited with timeouts and the running of
responders' handlers. Everything the protocol says (request ids, the topic table, dispatch,
positions and `since`, the offline queue, batching into frames) is broker.client.protocol's:
the listener hands it every binary frame and the connection's ups and downs.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import random
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Literal

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .. import __version__
from ..errors import BrokerError, ConnectionClosed, RequestError
from ..messages import DEFAULT_MAX_BATCH, SUBPROTOCOL, Ack, Auth, Hb, Reply, Request, encode
from .protocol import ClientProtocol

__all__ = ["Connection"]

DEFAULT_URL = "ws://127.0.0.1:7341/"
# What this client says it is at each connection (docs/protocol.md 1.1, Broker-Client): the
# broker shows it in its admin API's connections and logs.
CLIENT_ID = f"broker-py/{__version__}"

# Close codes that say the client itself is at fault: reconnecting would not help.
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
# The node is leaving (lame-duck mode, docs/protocol.md section 9): reconnect at once, to the
# next URL, and recover there (the broker spreads these closes over time, so no backoff).
RECONNECT_ELSEWHERE = 4010

log = logging.getLogger("broker.client")


def _token_expiry(token: str) -> float | None:
    """The exp claim of a JWT, read without checking it (the broker checks), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, TypeError, AttributeError):
        return None


def _log_error(error: RequestError) -> None:
    """Default handler for errors no request waits for (fire-and-forget publishes)."""
    log.warning("broker refused a request: %s", error)


class _Listener(WSListener):
    def __init__(self, client: Connection) -> None:
        super().__init__()
        self.client = client

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        client = self.client
        if client._listener is not self:
            return  # a connection the client already left
        client._frames += 1  # the connection is alive (the heartbeat watchdog reads this)
        kind = frame.msg_type
        if kind is WSMsgType.BINARY:
            client.protocol.receive(frame.get_payload_as_memoryview())
        elif kind is WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                # picows's stub declares WSCloseCode an Enum; at run time it is an IntEnum
                client._close_info = (int(frame.get_close_code()), frame.get_close_reason() or "")  # type: ignore[call-overload]
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif kind is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.client._listener is self:
            self.client._on_disconnected()

    def pause_writing(self) -> None:
        self.client.protocol.paused = True

    def resume_writing(self) -> None:
        core = self.client.protocol
        core.paused = False
        core.write_held()
        drained = self.client._drained
        if drained is not None and not drained.done() and not core.paused:
            drained.set_result(None)


class Connection:
    """The connection layer of a Client: its options, the picows connection of the moment,
    reconnection, token refresh, the heartbeat watchdog, requests awaited with timeouts and
    the running of responders' handlers. `protocol` is the sans-I/O core it drives."""

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        max_frame_bytes: int = 64 << 20,
        max_queue: int = 100_000,
        max_batch_bytes: int = 256 << 10,
        max_batch_messages: int = DEFAULT_MAX_BATCH,
        max_buffered_bytes: int = 8 << 20,
        on_error: Callable[[RequestError], object] | None = None,
        reconnect: bool = True,
        reconnect_delay: tuple[float, float] = (0.1, 10.0),
        max_reconnect_attempts: int | None = None,
        jitter: Callable[[], float] = random.random,
        max_offline_messages: int = 10_000,
        offline_overflow: Literal["raise", "drop_oldest"] = "raise",
        on_state: Callable[[str, str], object] | None = None,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        refresh_before_s: float = 30.0,
        ssl: ssl_module.SSLContext | None = None,
        heartbeat_s: float | None = 5.0,
        heartbeat_timeout_s: float = 15.0,
    ) -> None:
        """`token`: a JWT, or a callable returning one (awaitable or not), sent in the
        Authorization header of every connection; a callable is also asked for a fresh token
        `refresh_before_s` before the current one expires (or at 80% of its life, if sooner),
        which goes to the broker in an `auth` message, and before each reconnection.

        `heartbeat_s`: on every connection the client asks the broker for a heartbeat (`hb`)
        whenever it has sent nothing else for that long (1 to 3600 s; None: not asked). When
        nothing at all arrived for `heartbeat_timeout_s` (more than heartbeat_s + 1), the
        connection is taken for dead (a path that drops every packet closes nothing): it is
        aborted, and the client reconnects and recovers as after any other loss."""
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("url: at least one URL")
        if len({u[:6].lower() == "wss://" for u in self.urls}) > 1:
            raise ValueError("url: the URLs of one client are all ws:// or all wss://")
        url = self.url = self.urls[0]
        self.token = token
        self.refresh_before_s = refresh_before_s
        self._refresher: asyncio.TimerHandle | None = None
        self.secure = url[:6].lower() == "wss://"
        if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext or None, not {type(ssl).__name__}")
        if ssl is not None and not self.secure:
            raise ValueError(f"ssl is for wss:// URLs, not {url}")
        self.ssl = ssl  # the context of wss:// connections (None: the system's default, made when first needed)
        if heartbeat_s is not None and not 1.0 <= heartbeat_s <= 3600.0:
            raise ValueError("heartbeat_s is None or 1 to 3600 seconds")
        if heartbeat_s is not None and not heartbeat_timeout_s > heartbeat_s + 1.0:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_s + 1")
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._frames = 0  # frames received on any connection (counted per frame, read by the watchdog)
        self._watchdog: asyncio.TimerHandle | None = None
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_frame_bytes = max_frame_bytes
        self.max_queue = max_queue
        self.max_buffered_bytes = max_buffered_bytes  # publishes held while the socket takes no more
        self.on_error = on_error or _log_error
        self.reconnect = reconnect
        if not 0 < reconnect_delay[0] <= reconnect_delay[1]:
            raise ValueError("reconnect_delay is (first, most), 0 < first <= most")
        self.reconnect_delay = reconnect_delay  # the first backoff bound and its ceiling, in seconds
        self.max_reconnect_attempts = max_reconnect_attempts  # None: for as long as it takes
        self.jitter = jitter  # a number in [0, 1): the share of the backoff bound waited
        if max_offline_messages < 0 or offline_overflow not in ("raise", "drop_oldest"):
            raise ValueError("max_offline_messages >= 0 and offline_overflow 'raise' or 'drop_oldest'")
        # the sans-I/O core: everything the protocol says, across connections
        self.protocol = ClientProtocol(
            max_batch_bytes=max_batch_bytes,
            max_batch_messages=max_batch_messages,
            max_offline_messages=max_offline_messages,
            offline_overflow=offline_overflow,
            on_error=lambda error: self.on_error(error),
            on_request=self._answer,
            on_violation=self._protocol_violation,
        )
        self.on_state = on_state  # called with (state, detail): connecting, connected, disconnected, closed
        self.state = "new"
        self.reconnects = 0  # successful reconnections
        self._connected = asyncio.Event()  # set while protocol.connected (for waiting on it; bound to a loop at first use)
        self._reconnecting: asyncio.Task | None = None
        self._closing = False  # close() was called
        self._answering: set[asyncio.Task] = set()
        self._listener: _Listener | None = None  # the current connection's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: WSTransport | None = None
        self._drained: asyncio.Future | None = None
        self._close_info: tuple[int, str] | None = None
        self._closed: asyncio.Future | None = None

    # the connection

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the client was opened in (ConnectionClosed before `open()`)."""
        loop = self._loop
        if loop is None:
            raise ConnectionClosed(1006, "not connected")
        return loop

    @classmethod
    async def connect(cls, url: str | Sequence[str] = DEFAULT_URL, **options):  # -> the class called
        client = cls(url, **options)
        await client.open()
        return client

    async def open(self) -> None:
        """Connect; raises ConnectionClosed when the first connection cannot be made."""
        loop = self._loop = asyncio.get_running_loop()
        closed = self._closed = loop.create_future()
        self._connected = asyncio.Event()
        self.protocol.call_soon = loop.call_soon
        self.protocol.closed = False
        self._set_state("connecting", self.url)
        try:
            await self._connect()
        except BaseException:
            self.protocol.closed = True
            closed.set_result(None)
            self._set_state("closed", self._close_info[1] if self._close_info else "")
            raise
        self._set_state("connected", self.url)

    async def _connect(self) -> None:
        """One connection attempt; on failure ConnectionClosed (1006) with the cause."""
        self._close_info = None
        if self.secure and self.ssl is None:
            self.ssl = ssl_module.create_default_context()
        headers = {"Sec-WebSocket-Protocol": SUBPROTOCOL, "Broker-Client": CLIENT_ID}
        token = None
        try:
            if self.token is not None:
                token = await self._fresh_token()
                headers["Authorization"] = f"Bearer {token}"
            transport, listener = await asyncio.wait_for(
                ws_connect(
                    self._new_listener,
                    self.url,
                    ssl_context=self.ssl,
                    extra_headers=headers,
                    max_frame_size=self.max_frame_bytes,
                    websocket_handshake_timeout=self.connect_timeout,
                    enable_auto_pong=True,
                    logger_name="broker.client",
                    use_aiofastnet=False,
                ),
                self.connect_timeout,
            )
            self._transport = transport
            if listener is None:  # picows returns, without a listener, when the connection ends before the upgrade's answer
                hint = "" if self.secure else " (a broker that serves TLS takes wss:// URLs)"
                raise ConnectionError(f"the connection closed before the WebSocket handshake completed{hint}")
        except BaseException as exc:
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"could not connect to {self.url} within {self.connect_timeout}s"
            else:
                reason = f"could not connect to {self.url}: {str(exc) or type(exc).__name__}"
            self._close_info = (1006, reason)
            if isinstance(exc, (BrokerError, asyncio.CancelledError)) or not isinstance(exc, Exception):
                raise
            raise ConnectionClosed(1006, reason) from exc
        self.protocol.opened(partial(transport.send, WSMsgType.BINARY))
        self._connected.set()
        if self.heartbeat_s is not None:
            self.protocol.queue(encode(Hb(0, int(self.heartbeat_s * 1000))))
            self._watch(listener, self._frames, self.loop.time())
        if token is not None:
            self._schedule_refresh(token)

    def abort(self) -> None:
        """Drop the connection at once, without a close frame, as a network cut does: the
        client then behaves as after any lost connection (with `reconnect`, it reconnects and
        recovers; without, it closes with 1006). Does nothing while not connected."""
        if self._transport is not None and self.protocol.connected:
            self._transport.disconnect(graceful=False)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A fact of the current connection's socket, as asyncio's transports tell them:
        "peername", "sockname", and for wss:// "ssl_object", "cipher", "peercert"; `default`
        while there is no connection."""
        transport = self._transport
        if transport is None or not self.protocol.connected:
            return default
        return transport.underlying_transport.get_extra_info(name, default)

    # liveness

    def _watch(self, listener: WSListener, frames: int, heard: float) -> None:
        """Check, a few times per heartbeat_timeout_s, that something arrived on the connection
        of `listener` since the last check (`frames`, at loop time `heard`)."""
        self._watchdog = self.loop.call_later(self.heartbeat_timeout_s / 4, self._check_alive, listener, frames, heard)

    def _check_alive(self, listener: WSListener, frames: int, heard: float) -> None:
        self._watchdog = None
        if self._listener is not listener or not self.protocol.connected:
            return  # that connection ended
        now = self.loop.time()
        if self._frames != frames:
            self._watch(listener, self._frames, now)
            return
        if now - heard < self.heartbeat_timeout_s:
            self._watch(listener, frames, heard)
            return
        reason = f"nothing from the broker for {self.heartbeat_timeout_s:g} s (no heartbeat)"
        log.warning("connection to %s taken for dead: %s", self.url, reason)
        self._close_info = (1006, reason)
        self.abort()

    # tokens

    async def _fresh_token(self) -> str:
        source = self.token
        token = source() if callable(source) else source
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise BrokerError("the token callback must return a non-empty str")
        return token

    def _schedule_refresh(self, token: str) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        expires = _token_expiry(token)
        if expires is None or not callable(self.token):
            return
        left = expires - time.time()
        delay = max(0.0, min(left - self.refresh_before_s, left * 0.8))
        self._refresher = self.loop.call_later(delay, self._start_refresh)

    def _start_refresh(self) -> None:
        self._refresher = None
        if not self.closed and self.protocol.connected:
            task = self.loop.create_task(self._refresh())
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def authenticate(self, token: str) -> None:
        """Send a fresh token now (the broker answers with an ack, or RequestError code 17)."""
        await self.roundtrip(lambda rid: Auth(rid, token))
        self._schedule_refresh(token)

    async def _refresh(self) -> None:
        """Send a fresh token in an `auth` message; a refusal is reported to on_error (the
        broker closes the connection with 4001 when the old token expires)."""
        try:
            token = await self._fresh_token()
            await self.roundtrip(lambda rid: Auth(rid, token))
        except RequestError as error:
            self.on_error(error)
            return
        except (TimeoutError, ConnectionClosed):
            return
        except Exception:
            log.exception("token refresh failed")
            return
        self._schedule_refresh(token)

    def _new_listener(self) -> _Listener:
        self._listener = _Listener(self)
        return self._listener

    def _set_state(self, state: str, detail: str) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state, detail)
            except Exception:
                log.exception("on_state callback raised")

    async def __aenter__(self):  # -> self
        await self.open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed is None or self._closed.done()

    def _answer(self, request: Request) -> None:
        handler = self.protocol.responders.get(request.topic)
        if handler is None:
            return  # no longer responding: the requester times out
        try:
            result = handler(request)
        except Exception:
            log.exception("request handler for %r raised", request.topic)
            return
        if inspect.isawaitable(result):
            task = self.loop.create_task(self._answer_later(request, result))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        else:
            self._send_reply(request, result)

    async def _answer_later(self, request: Request, result: Awaitable[bytes]) -> None:
        try:
            data = await result
        except Exception:
            log.exception("request handler for %r raised", request.topic)
            return
        self._send_reply(request, data)

    def _send_reply(self, request: Request, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            log.error("request handler for %r returned %s, not bytes: no reply sent", request.topic, type(data).__name__)
            return
        if self.protocol.connected:
            self.protocol.queue(encode(Reply(request.id, bytes(data))))

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the connection's write buffer is below its high-water mark and nothing
        the client holds back waits for it.

        Raises asyncio.TimeoutError after `timeout` seconds (default: request_timeout)."""
        core = self.protocol
        core.flush()
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            while (core.paused or core.held) and self._closed is not None and not self._closed.done():
                drained = self._drained = self.loop.create_future()
                await asyncio.wait([drained, self._closed], return_when=asyncio.FIRST_COMPLETED)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, close with 1000 and wait (at most `timeout`) for the broker.
        Stops reconnecting; publishes still waiting offline are dropped."""
        closed = self._closed
        if closed is None or closed.done():
            return
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if not self.protocol.connected:
            self._close_info = self._close_info or (1000, "closed by the application")
            self._finish()
            return
        self.protocol.flush()
        self.protocol.write_held(force=True)
        transport = self._transport  # the open connection's (protocol.connected)
        if transport is not None:
            transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(asyncio.shield(closed), timeout)
        except TimeoutError:
            if transport is not None:
                transport.disconnect(graceful=False)
            await closed

    async def wait_closed(self) -> tuple[int, str]:
        """Wait until the connection ends; returns the close code and reason the broker sent."""
        if self._closed is not None:  # (never opened: closed already)
            await asyncio.shield(self._closed)
        return self._close_info or (1006, "connection lost")

    # internals

    def check_open(self) -> None:
        """Raise ConnectionClosed, with the code and reason the client closed with, once it is
        closed (or before `open()`)."""
        if self.closed:
            code, reason = self._close_info or (1006, "not connected")
            raise ConnectionClosed(code, reason)

    async def _ready(self) -> None:
        """Wait (at most request_timeout) while the client reconnects."""
        self.check_open()
        if self.protocol.connected:
            return
        closed = self._closed
        assert closed is not None  # open: checked above
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            done, _ = await asyncio.wait([waiter, closed], timeout=self.request_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        self.check_open()
        if not self.protocol.connected:
            raise ConnectionClosed(1006, f"not reconnected within {self.request_timeout}s")

    async def roundtrip(
        self, make: Callable[[int], object], on_ack: Callable[[Ack], None] | None = None, timeout: float | None = None
    ) -> Any:
        """Send the request `make(id)` under a new request id (waiting, at most
        request_timeout, while the client reconnects) and return the broker's answer: an Ack,
        or the Reply of a `req`. A refusal raises RequestError; no answer within `timeout`
        (default request_timeout) raises BrokerError. `on_ack` runs as the ack is read, before
        any later frame is dispatched. The methods of Client are made of this."""
        await self._ready()
        timeout = self.request_timeout if timeout is None else timeout
        future = self.loop.create_future()
        rid = self.protocol.request(make, future, on_ack)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as exc:
            raise BrokerError(f"no reply to request {rid} within {timeout}s") from exc
        finally:
            self.protocol.pending.pop(rid, None)

    def _protocol_violation(self, text: str) -> None:
        log.error("closing: the broker sent something unreadable: %s", text)
        transport = self._transport  # the open connection's: the frame came on it
        if transport is not None:
            transport.send_close(WSCloseCode.UNSUPPORTED_DATA, b"undecodable server message")
            transport.disconnect()

    def _on_disconnected(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        code, reason = self._close_info or (1006, "connection lost")
        if self._transport is not None and self._transport.close_handshake is not None:
            recv = self._transport.close_handshake.recv
            if recv is not None and self._close_info is None:
                code, reason = int(recv.code), recv.reason or ""  # type: ignore[call-overload]  # an IntEnum at run time (picows's stub: Enum)
        self._close_info = (code, reason)
        self._connected.clear()
        stays = not (self._closing or not self.reconnect or code in FATAL_CLOSE_CODES)
        self.protocol.lost(ConnectionClosed(code, reason), keep=stays)
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)
        if not stays or self.closed:
            self._finish()
            return
        self._set_state("disconnected", f"{code}: {reason}" if reason else str(code))
        self._reconnecting = self.loop.create_task(self._reconnect(at_once=code == RECONNECT_ELSEWHERE))

    def _finish(self) -> None:
        """The client is closed for good: subscriptions end, waiters wake."""
        code, reason = self._close_info or (1006, "connection lost")
        self.protocol.finish(None if code == 1000 else ConnectionClosed(code, reason))
        for task in list(self._answering):
            task.cancel()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._set_state("closed", f"{code}: {reason}" if reason else str(code))

    def backoff(self, attempt: int) -> float:
        """The delay before reconnection attempt `attempt` (0, 1, ...): full jitter over an
        exponentially growing bound, min(most, first * 2^attempt)."""
        first, most = self.reconnect_delay
        return self.jitter() * min(most, first * 2**attempt)

    async def _reconnect(self, at_once: bool = False) -> None:
        """Connect again (to the next URL), after a backoff, and make every subscription again
        from where it stopped; `at_once`: the node asked the client to move (4010), the first
        attempt goes without waiting."""
        attempt = 0
        while not self._closing:
            if self.max_reconnect_attempts is not None and attempt >= self.max_reconnect_attempts:
                last = self._close_info[1] if self._close_info else "connection lost"
                self._close_info = (1006, f"gave up after {attempt} reconnection attempts: {last}")
                self._finish()
                return
            if not (at_once and attempt == 0):
                await asyncio.sleep(self.backoff(attempt))
            attempt += 1
            if len(self.urls) > 1:
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            self._set_state("connecting", self.url)
            try:
                await self._connect()
            except ConnectionClosed as exc:
                self._set_state("disconnected", exc.reason)
                continue
            self.reconnects += 1
            self._set_state("connected", self.url)
            self.protocol.resubscribe()
            self.protocol.send_offline()
            self._reconnecting = None
            return
