"""Errors raised by the broker and the codes it puts on the wire.

`ErrorCode` values travel in `err` replies; `CloseCode` values are WebSocket close codes.
Both tables are part of the protocol contract (docs/protocol.md).
"""

from __future__ import annotations

import enum
import os


class ErrorCode(enum.IntEnum):
    """Codes carried by an `err` reply. The connection stays open after every one of them."""

    BAD_MESSAGE = 1  # not MessagePack, or not an array of the documented shape
    UNKNOWN_TYPE = 2  # the first element names no client message type
    INVALID_TOPIC = 3  # topic or pattern breaks the naming rules
    PATTERN_NOT_ALLOWED = 4  # a publish named a wildcard pattern
    ALREADY_SUBSCRIBED = 5  # the connection already holds this exact subscription
    NOT_SUBSCRIBED = 6  # unsub of a pattern the connection does not hold
    PAYLOAD_TOO_LARGE = 7  # payload longer than max_payload_bytes
    TOO_MANY_SUBSCRIPTIONS = 8  # max_subscriptions reached on this connection
    TOO_MANY_TOPICS = 9  # the broker holds max_topics topics already
    BAD_POSITION = 10  # a `since` position the topic never reached, or one that names another topic
    NO_RESPONDERS = 11  # a `req` to a topic nobody subscribes to, or whose responder left
    REQUEST_TIMEOUT = 12  # no `reply` to a `req` within its timeout
    UNKNOWN_REQUEST = 13  # a `reply` to a request that is not (or no longer) waiting for this connection
    TOO_MANY_REQUESTS = 14  # the connection has max_open_requests requests waiting
    RATE_LIMITED = 15  # past a publish or topic-creation rate limit of the connection or its user, or its auth_message_rate
    FORBIDDEN = 16  # the token's grants do not allow this subscribe, publish or request
    BAD_TOKEN = 17  # an `auth` message's token is invalid, expired, revoked or names another user
    UNAVAILABLE = 18  # the cluster backplane (Redis) could not take the publish in time: it was not published


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker sends."""

    NORMAL = 1000  # the client closed, or asked to
    GOING_AWAY = 1001  # server shutting down, or a ping went unanswered
    PROTOCOL_ERROR = 1002  # broken WebSocket framing
    UNSUPPORTED_DATA = 1003  # text frame or fragmented message
    MESSAGE_TOO_BIG = 1009  # frame larger than max_frame_bytes
    INTERNAL_ERROR = 1011  # a bug in the broker; logged with a traceback
    SERVICE_RESTART = 1012  # shutdown with shutdown_close_code 1012: the broker comes back
    POLICY_VIOLATION = 1008  # persistent rate-limit abuse, or a frame not completed within frame_timeout_s
    SLOW_CONSUMER = 1013  # stayed behind by more than max_pending_bytes
    TOKEN_EXPIRED = 4001  # the token expired and no fresh one came in an `auth` message
    TOKEN_REVOKED = 4003  # the token was revoked: by its jti, its user, or its issue time
    RECONNECT_ELSEWHERE = 4010  # lame-duck mode: this node is leaving; reconnect to another one now and recover


class BrokerError(Exception):
    """Base of every error the broker package raises."""


class HandshakeError(BrokerError):
    """An upgrade request the server refuses: the HTTP status and a one-line explanation, and
    the setting that refused it, if one did (for counters and the audit log)."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None, setting: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}
        self.setting = setting


class ConfigError(BrokerError):
    """A setting is missing, malformed or out of range; the message names it."""


class ListenError(BrokerError):
    """A port (or socket) the broker is to serve on cannot be listened on; the message names it."""


def describe_os_error(exc: OSError) -> str:
    """The system's text for an OSError's errno ("Address already in use"), without the
    wrapping some event loops add around it."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class RequestError(BrokerError):
    """A client request was refused: carries the wire error code and text."""

    def __init__(self, code: int, text: str, request_id: int = 0) -> None:
        super().__init__(f"{_code_name(code)}: {text}")
        self.code = code
        self.text = text
        self.request_id = request_id


class ConnectionClosed(BrokerError):
    """The WebSocket connection is closed; `code` and `reason` come from the close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if reason else f"connection closed ({code})")
        self.code = code
        self.reason = reason


class SubscriptionOverflow(BrokerError):
    """A subscription's local queue filled up because its consumer did not keep up."""


class SubscriptionEnded(BrokerError):
    """The broker ended a subscription (`unsubscribed`: an operator unsubscribed the user)."""

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(f"subscription {pattern!r} ended by the broker: {reason}")
        self.pattern = pattern
        self.reason = reason


class TopicError(RequestError):
    """A topic name or pattern is invalid."""

    def __init__(self, text: str) -> None:
        super().__init__(ErrorCode.INVALID_TOPIC, text)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"error {code}"
