"""One client connection's protocol state (sans-I/O): bytes in, replies queued on its outbox.

The I/O shell hands every complete binary message to `receive()`; replies and deliveries leave
through the router, which writes each connection once per tick.

A frame may hold up to `max_batch_messages` subscription changes, each of which can touch many
topics. When the router's budget for this loop iteration is spent, `receive()` stops between
two messages and returns False; the shell stops reading from the connection and calls
`resume()` in a later iteration, which carries on where it stopped. Order is kept: nothing
else of this connection is handled in between.
"""

from __future__ import annotations

from .auth import UNRESTRICTED, Authenticator, AuthError, Identity
from .errors import ErrorCode, RequestError
from .fastpath import Outbox, TopicState, fanout_steps, fast_publish
from .messages import (
    DEFAULT_MAX_BATCH,
    MIN_HEARTBEAT_MS,
    Ack,
    Auth,
    Err,
    Hb,
    Pub,
    Reply,
    Req,
    Sub,
    Unsub,
    Unsubscribed,
    check_payload,
    encode,
    message_heads,
    payload_too_large,
    read_client_frame,
)
from .policy import BY_NAME, CONFLATE, DISCONNECT, DROP, Shed
from .pressure import HARD_LIMIT_FACTOR
from .router import Router
from .since import check_since
from .topics import is_pattern, matches, validate_pattern, validate_topic

# Refusals that are in the audit log (without the topic) rather than among the dead letters,
# whose reasons name it.
_AUDITED = (ErrorCode.RATE_LIMITED, ErrorCode.FORBIDDEN)

# A connection with a subscription that drops or conflates is never stopped at a push: the
# server sheds its queue once per tick instead, and closes it only if what may not be shed
# stays too large.
NO_HARD_LIMIT = 2**62


class SessionLimits:
    """The limits of one connection's protocol state (a subset of the server config): what a
    session refuses with an err reply. Admission and rate limits are broker.limits'."""

    __slots__ = ("max_payload_bytes", "max_subscriptions", "max_patterns", "max_pending_bytes", "max_batch_messages", "policy")

    def __init__(
        self,
        max_payload_bytes: int = 512 << 10,
        max_subscriptions: int = 10_000,
        max_pending_bytes: int = 8 << 20,
        max_batch_messages: int = DEFAULT_MAX_BATCH,
        policy: int = DISCONNECT,
        max_patterns: int = 100,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_subscriptions = max_subscriptions
        # of them, patterns: a topic may match every pattern of a connection, and each distinct
        # pattern is one more node to find when the topic is made and to visit at each fan-out
        self.max_patterns = max_patterns
        self.max_pending_bytes = max_pending_bytes
        self.max_batch_messages = max_batch_messages
        self.policy = policy  # the slow-consumer policy of subscriptions that do not choose one


class Session:
    __slots__ = (
        "router",
        "limits",
        "box",
        "subscriptions",
        "responding",
        "received",
        "published",
        "errors",
        "closed",
        "shedding",
        "identity",
        "authenticator",
        "denied",
        "limiter",
        "_backlog",
        "_next",
        "_drops",
        "_conflates",
        "_policy_of",
        "_held",
        "_effective",
        "_allowed",
        "_allowed_mark",
        "_muted",
        "heartbeat_ms",
        "_frame",
        "_bad",
        "_heads",
        "patterns",
        "parked",
    )

    def __init__(
        self,
        router: Router,
        limits: SessionLimits,
        owner: object = None,
        identity: Identity = UNRESTRICTED,
        authenticator: Authenticator | None = None,
        limiter=None,
    ) -> None:
        self.router = router
        self.limits = limits
        self.identity = identity  # who the token names and what it grants (grants None: anything)
        self.authenticator = authenticator  # checks the tokens of `auth` messages
        self.denied = 0  # requests refused for want of a grant
        # the connection's rate limits (broker.limits.ConnectionLimits), or None: every `pub`
        # and `req` is charged to it or refused with RATE_LIMITED
        self.limiter = limiter
        # With grants, each subscription holds its intersections with them in the index
        # (`_effective`), counted in `_held` since two subscriptions may share one; publishes
        # on the compiled path look topics up in `_allowed`, those this connection may publish to.
        self._held: dict[str, int] = {}
        self._effective: dict[str, list[str]] = {}
        self._allowed: dict[bytes, TopicState] = {}
        self._allowed_mark = 0
        self.box = Outbox(owner, limits.max_pending_bytes, limits.max_pending_bytes * HARD_LIMIT_FACTOR)
        self.subscriptions: dict[str, int] = {}  # pattern -> its slow-consumer policy
        self.responding: set[str] = set()  # topics whose requests this connection answers
        # of those, the ones its grants stopped covering (after `auth`): held, not registered
        self._muted: set[str] = set()
        self.received = 0  # client messages handled
        self.heartbeat_ms = 0  # the heartbeat interval the client asked for (`hb`; 0: none)
        self.patterns = 0  # subscriptions that are patterns (at most limits.max_patterns)
        self.published = 0  # of which publishes
        self.errors = 0  # err replies sent
        self.closed = False
        # receive()/resume() returned False because a subscription waits for the backplane: the
        # shell resumes it when the router says (`request_resume`), not in the next iteration
        self.parked = False
        self._backlog: list | None = None  # decoded messages of a frame not yet applied
        self._next = 0
        # While its messages are applied: the frame, the errors its decoding returned, and
        # (once a publish of it is refused) the first bytes of each message as sent, which a
        # dead letter keeps.
        self._frame: bytes = b""
        self._bad: list = []
        self._heads: list[bytes] | None = None
        self._drops = 0  # subscriptions under the policy drop
        self._conflates = 0  # and under conflate
        self._policy_of: dict[int, int] | None = None  # topic id -> policy, while the subscriptions stay the same
        self.shedding: Shed | None = None  # while a subscription drops or conflates

    @property
    def sheds(self) -> bool:
        """True when some subscription of this connection drops or conflates."""
        return self.shedding is not None

    def policy_of(self, topic_id: int) -> int:
        """The slow-consumer policy of a topic on this connection: the most careful policy of
        the subscriptions that match it (disconnect, then drop, then conflate)."""
        total = len(self.subscriptions)
        if not self._drops and not self._conflates:
            return DISCONNECT
        if self._drops == total:
            return DROP
        if self._conflates == total:
            return CONFLATE
        cache = self._policy_of
        if cache is None:
            cache = self._policy_of = {}
        policy = cache.get(topic_id)
        if policy is None:
            state = self.router.index.states[topic_id] if topic_id < len(self.router.index.states) else None
            policy = CONFLATE + 1
            if state is not None:
                name = state.name
                for pattern, chosen in self.subscriptions.items():
                    if chosen < policy and (pattern == name or (is_pattern(pattern) and matches(pattern, name))):
                        policy = chosen
            if policy > CONFLATE:
                policy = DROP  # no subscription of this connection matches it any more
            cache[topic_id] = policy
        return policy

    def _policy_changed(self, policy: int, delta: int) -> None:
        if policy == DROP:
            self._drops += delta
        elif policy == CONFLATE:
            self._conflates += delta
        self._policy_of = None
        if self._drops or self._conflates:
            if self.shedding is None:
                self.shedding = Shed(self.policy_of, self.router.index.states, self.router.stats)
                self.box.hard_limit = NO_HARD_LIMIT
                self._bound_writes(True)
            else:
                self.shedding.policies_changed()
        elif self.shedding is not None:
            self.shedding.release(self.box)  # what it held waits in the queue like the rest
            self.shedding = None
            self.box.hard_limit = self.limits.max_pending_bytes * HARD_LIMIT_FACTOR
            self._bound_writes(False)

    def _bound_writes(self, shedding: bool) -> None:
        """Tell the connection (the I/O shell, when it has the ability) whether its policies
        shed: then it keeps what its socket does not take in the broker, within reach of them."""
        bound = getattr(self.box.owner, "bound_writes", None)
        if bound is not None:
            bound(shedding)

    @property
    def suspended(self) -> bool:
        """True while part of a frame waits for `resume()`."""
        return self._backlog is not None

    def receive(self, data: bytes | memoryview) -> bool:
        """Handle one client frame: one message or a batch of them.

        Returns False when the loop iteration's budget ran out before the whole frame was
        applied: call `resume()` in a later iteration (and hand over no other frame before)."""
        if self.closed:
            return True
        if self._backlog is not None:
            raise RuntimeError("receive() while an earlier frame waits for resume()")
        router = self.router
        limits = self.limits
        # Fast path: a frame of fire-and-forget publishes to known topics, parsed and stamped in
        # one compiled call. Anything else (or anything unusual) returns -1, nothing applied.
        # With rate limits, a frame with more messages than the connection may publish now
        # takes the general path, which refuses the excess message by message.
        count = -1
        dirty = router.dirty
        before = len(dirty)
        if router.backplane.accepting:
            table = router.topics_by_key
            if self.identity.grants is not None:
                table = self._allowed
                if self._allowed_mark != router.stats.retired:  # a topic retired: its state is gone
                    table.clear()
                    self._allowed_mark = router.stats.retired
            limiter = self.limiter
            if limiter is None:
                count = fast_publish(data, table, limits.max_payload_bytes, limits.max_batch_messages, dirty)
            else:
                count = limiter.fast_publish(data, table, limits.max_payload_bytes, limits.max_batch_messages, dirty)
        if count >= 0:
            self.received += count
            self.published += count
            if len(dirty) > before:  # router.fanned_out, inlined on the path of every frame
                router.index.work += fanout_steps(dirty, before)
            router.published_since_flush()
            return True
        messages, bad, values = read_client_frame(data, limits.max_batch_messages)
        router.decoded(values)
        box = self.box
        for problem in bad:
            if box.over:
                break
            self.reply_error(problem.request_id, problem.code, problem.text)
            router.requests.dead_letter(box, problem.request_id, problem.code, problem.text, problem.data)
        self.received += len(messages)
        self._backlog = messages
        self._next = 0
        self._frame = data if type(data) is bytes else bytes(data)
        self._bad = bad
        return self._apply(messages)

    def resume(self) -> bool:
        """Carry on with a frame that `receive()` left unfinished; False if it stops again."""
        self.parked = False
        messages = self._backlog
        if messages is None:
            return True
        return self._apply(messages)

    def _apply(self, messages: list) -> bool:
        """Apply the messages of the frame in `_backlog` (`messages`), from `_next` on."""
        start = i = self._next
        router = self.router
        box = self.box
        max_payload = self.limits.max_payload_bytes
        limiter = self.limiter
        while i < len(messages):
            if box.over or box.closed or self.closed:
                break  # the connection is being closed: the rest of the frame is not applied
            if i > start and router.busy:
                self._next = i
                return False
            message = messages[i]
            i += 1
            kind = type(message)
            try:
                if kind is Pub:
                    if len(message.data) > max_payload:  # messages.check_payload, inlined on the path of every publish
                        raise payload_too_large(len(message.data), max_payload)
                    grants = self.identity.grants
                    if grants is not None and not grants.may_publish(message.topic):
                        self._forbid(message.id, "publish", f"not allowed to publish to {message.topic[:256]!r}")
                    if limiter is not None:
                        limiter.check(message.id, message.topic, router.topics)
                    self.published += 1
                    router.publish(message.topic, message.data, box, message.id, message.msg_id)
                    if grants is not None:
                        state = router.topics.get(message.topic)
                        if state is not None:
                            self._allowed[state.key] = state
                elif kind is Sub:
                    if not self._subscribe(message):
                        # the backplane gets what it needs first: this message again, later
                        self._next = i - 1
                        self.parked = True
                        return False
                elif kind is Unsub:
                    self._unsubscribe(message)
                elif kind is Req:
                    check_payload(message.data, max_payload)
                    grants = self.identity.grants
                    if grants is not None and not grants.may_publish(message.topic):
                        self._forbid(message.id, "request", f"not allowed to send requests to {message.topic[:256]!r}")
                    if limiter is not None:
                        limiter.check(message.id)
                    router.requests.request(box, message.id, message.topic, message.data, message.timeout_ms, self.identity.user)
                elif kind is Reply:
                    check_payload(message.data, max_payload)
                    router.requests.reply(box, message.id, message.data)
                elif kind is Auth:
                    if limiter is not None:
                        limiter.check_auth(message.id)
                    self._authenticate(message)
                elif kind is Hb:
                    self._heartbeat(message)
            except RequestError as exc:
                self.reply_error(message.id, exc.code, exc.text)
                if kind is Pub and exc.code not in _AUDITED:  # a message that will reach nobody
                    router.requests.dead_letter(box, message.id, exc.code, exc.text, self._head(i - 1))
        self._backlog = None
        self._next = 0
        self._frame = b""
        self._bad = []
        self._heads = None
        return True

    def _head(self, index: int) -> bytes:
        """The first bytes of the frame's message `index` as the client sent them (the frame
        is split once, at its first refused publish)."""
        heads = self._heads
        if heads is None:
            heads = self._heads = message_heads(self._frame, self._bad)
        return heads[index]

    def _subscribe(self, message: Sub) -> bool:
        """Apply a `sub`; False (nothing applied) when it waits for the backplane to get what
        it needs (Router.interest): it is applied again when the connection is resumed."""
        if message.respond:
            self._respond(message)
            return True
        pattern = message.topic
        validate_pattern(pattern, self.router.max_topic_length)
        subscriptions = self.subscriptions
        if pattern in subscriptions:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {pattern!r}")
        if len(subscriptions) + len(self.responding) >= self.limits.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"this connection holds {len(subscriptions)} subscriptions, the limit",
            )
        wildcard = is_pattern(pattern)
        if wildcard and self.patterns >= self.limits.max_patterns:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"this connection holds {self.patterns} pattern subscriptions, the limit (max_patterns)",
            )
        router = self.router
        grants = self.identity.grants
        effective = None
        if grants is not None:
            effective = grants.subscriptions_for(pattern)
            if not effective:
                self._forbid(message.id, "subscribe", f"not allowed to subscribe to {pattern!r}")
            if (message.since is not None or message.last) and not grants.may_recover(effective):
                self._forbid(
                    message.id, "history", f"not allowed to recover the history of {pattern!r} (since, last); subscribe without them"
                )
        if not router.interest(pattern, self.box):  # before `since` is checked against the topic's numbers
            return False
        since = None if message.since is None else check_since(pattern, message.since, router, effective)
        policy = BY_NAME[message.policy] if message.policy else self.limits.policy
        if effective is None:
            router.subscribe(pattern, self.box)
        else:
            self._effective[pattern] = effective
            for held in effective:
                self._hold(held)
        subscriptions[pattern] = policy
        self._policy_changed(policy, 1)
        if wildcard:
            self.patterns += 1
            # a pattern's position is the time it took effect: `since` for a later
            # subscription covers the topics this one never delivered from that time on
            epoch, seq = router.backplane.now_ms(), 0
        else:
            state = router.topics.get(pattern)
            epoch, seq = (state.epoch, state.seq) if state is not None else (0, 0)
        if message.id:
            router.send(self.box, encode(Ack(message.id, epoch, seq)))
        router.recover(pattern, self.box, since, message.last, effective)
        return True

    def _respond(self, message: Sub) -> None:
        topic = message.topic
        if is_pattern(topic):
            validate_pattern(topic, self.router.max_topic_length)
            raise RequestError(ErrorCode.PATTERN_NOT_ALLOWED, f"a responder answers one concrete topic, not {topic!r}")
        validate_topic(topic, self.router.max_topic_length)
        grants = self.identity.grants
        if grants is not None and not grants.may_respond(topic):
            self._forbid(message.id, "respond", f"not allowed to respond to {topic!r}")
        if topic in self.responding:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already responding to {topic!r}")
        if len(self.subscriptions) + len(self.responding) >= self.limits.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"this connection holds {self.limits.max_subscriptions} subscriptions, the limit"
            )
        self.router.requests.add_responder(topic, self.box)
        self.responding.add(topic)
        if message.id:
            self.router.send(self.box, encode(Ack(message.id)))

    def _unsubscribe(self, message: Unsub) -> None:
        pattern = message.topic
        validate_pattern(pattern, self.router.max_topic_length)
        if pattern in self.responding:  # a responder's unsub (it is checked first)
            self.responding.discard(pattern)
            if pattern in self._muted:
                self._muted.discard(pattern)
            else:
                self.router.requests.remove_responder(pattern, self.box)
            if message.id:
                self.router.send(self.box, encode(Ack(message.id)))
            return
        if pattern not in self.subscriptions:
            raise RequestError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {pattern!r}")
        self._drop_subscription(pattern)
        if message.id:
            self.router.send(self.box, encode(Ack(message.id)))

    def _drop_subscription(self, pattern: str) -> None:
        subscriptions = self.subscriptions
        self._policy_changed(subscriptions.pop(pattern), -1)
        if is_pattern(pattern):
            self.patterns -= 1
        effective = self._effective.pop(pattern, None)
        if effective is None:
            remaining = next(iter(subscriptions)) if len(subscriptions) == 1 else None
            self.router.unsubscribe(pattern, self.box, remaining)
        else:
            for held in effective:
                self._release(held)

    def end_subscription(self, pattern: str, reason: str) -> bool:
        """End the subscription `pattern` from the server's side (an operator's action): as
        the client's `unsub` would, then tell the client so (`unsubscribed`, after what was
        queued for it). False when the connection holds no such subscription."""
        if self.closed or pattern not in self.subscriptions:
            return False
        self._drop_subscription(pattern)
        self.router.send(self.box, encode(Unsubscribed(pattern, reason)))
        return True

    # grants

    def _forbid(self, request_id: int, action: str, text: str) -> None:
        """Refuse a request the grants do not allow: `text` (naming the topic) goes to the
        client only; the audit log gets the action and the request id, never the topic."""
        self.denied += 1
        self.router.stats.denied += 1
        audit = getattr(self.box.owner, "audit", None)
        if audit is not None:
            audit("permission_denied", action=action, id=request_id)
        raise RequestError(ErrorCode.FORBIDDEN, text)

    def _hold(self, pattern: str) -> None:
        """Hold `pattern` in the index for one more subscription."""
        count = self._held.get(pattern, 0)
        if not count:
            self.router.subscribe(pattern, self.box)
        self._held[pattern] = count + 1

    def _release(self, pattern: str) -> None:
        count = self._held[pattern] - 1
        if count:
            self._held[pattern] = count
            return
        del self._held[pattern]
        remaining = next(iter(self._held)) if len(self._held) == 1 else None
        self.router.unsubscribe(pattern, self.box, remaining)

    def _authenticate(self, message: Auth) -> None:
        """A fresh token: the same user; its expiry and grants replace the old ones, and every
        subscription is narrowed (or widened) to the new grants."""
        if self.authenticator is None or not self.authenticator.enabled:
            raise RequestError(ErrorCode.BAD_TOKEN, "this server does not authenticate; auth is not needed")
        self.router.token_checked()  # the signature check is the dearest thing a client can ask for
        try:
            identity = self.authenticator.verify(message.token)
        except AuthError as error:
            raise RequestError(ErrorCode.BAD_TOKEN, error.text) from None
        if identity.user != self.identity.user:
            raise RequestError(ErrorCode.BAD_TOKEN, "the token names another user than this connection's")
        old = self.identity.grants
        self.identity = identity
        grants = identity.grants
        if grants is not None and grants != old:  # (a verified token always carries grants)
            self._allowed.clear()
            for pattern in self.subscriptions:
                new = grants.subscriptions_for(pattern)
                previous = self._effective.get(pattern, [])
                for held in new:
                    self._hold(held)
                for held in previous:
                    self._release(held)
                self._effective[pattern] = new
            self._regrant_responders(grants)
        if message.id:
            self.router.send(self.box, encode(Ack(message.id)))

    def _heartbeat(self, message: Hb) -> None:
        interval = message.interval_ms
        if 0 < interval < MIN_HEARTBEAT_MS:
            raise RequestError(ErrorCode.BAD_MESSAGE, f"interval_ms is 0 (no heartbeats) or {MIN_HEARTBEAT_MS} to 3600000, not {interval}")
        self.heartbeat_ms = interval
        if message.id:
            self.router.send(self.box, encode(Ack(message.id)))

    def _regrant_responders(self, grants) -> None:
        """Mute each responder registration the new grants do not cover (no more requests
        reach it; those passed to it and not answered fail), and unmute those they cover again."""
        router = self.router
        for topic in self.responding:
            allowed = grants is None or grants.may_respond(topic)
            if topic in self._muted:
                if allowed:
                    self._muted.discard(topic)
                    router.requests.add_responder(topic, self.box)
            elif not allowed:
                self._muted.add(topic)
                router.requests.withdraw_responder(topic, self.box)

    def reply_error(self, request_id: int, code: int, text: str) -> None:
        self.errors += 1
        self.router.stats.count_error(code)
        self.router.send(self.box, encode(Err(request_id, int(code), text)))

    def close(self) -> None:
        """Leave every subscription and stop accepting frames; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._backlog = None
        self._frame = b""
        self._bad = []
        self._heads = None
        self.box.closed = True
        self.router.requests.forget_requests(self.box)
        for topic in self.responding:
            if topic not in self._muted:
                self.router.requests.remove_responder(topic, self.box)
        self.responding.clear()
        self._muted.clear()
        if self._held:
            self.router.remove_all(self.box, self._held)
            self._held.clear()
            self._effective.clear()
        elif self.subscriptions:
            self.router.remove_all(self.box, self.subscriptions)
        self.subscriptions.clear()
        self.patterns = 0
        self.shedding = None
        self.box.clear()
