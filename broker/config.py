"""Server settings: defaults < TOML file < environment (BROKER_*) < command-line flags.

Only values that were explicitly given are merged; the result is validated once by msgspec and
any problem comes back as a ConfigError that names the setting.
"""

from __future__ import annotations

import os
import tomllib
from typing import Annotated, Any, Literal, Mapping

import msgspec

from .errors import ConfigError

DEFAULT_PORT = 7341
ENV_PREFIX = "BROKER_"

_ENVELOPE_BYTES = 64  # MessagePack and WebSocket framing around one payload and its topic

Positive = Annotated[int, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = DEFAULT_PORT
    path: str = "/"
    max_frame_bytes: Positive = 1 << 20
    max_payload_bytes: Positive = 512 << 10
    max_pending_bytes: Positive = 8 << 20
    slow_consumer_timeout_s: Seconds = 2.0
    slow_consumer_policy: Literal["disconnect", "drop", "conflate"] = "disconnect"
    max_outbound_frame_bytes: Positive = 1 << 20
    max_batch_messages: Positive = 10_000
    max_subscriptions: Positive = 10_000
    max_topics: Positive = 100_000
    max_topic_length: Annotated[int, msgspec.Meta(gt=0, le=4096)] = 255
    history_max_messages: Annotated[int, msgspec.Meta(ge=0)] = 100
    history_max_bytes: Positive = 1 << 20
    history_max_age_s: Seconds = 300.0
    history_max_total_bytes: Positive = 256 << 20
    dedupe_window_s: Seconds = 120.0
    dedupe_max_ids: Positive = 100_000
    max_open_requests: Positive = 1000
    max_total_pending_bytes: Positive = 1 << 30
    dead_letters_max: Positive = 1000
    topic_idle_s: Seconds = 300.0
    dead_letter_file: str = ""
    handshake_timeout_s: Seconds = 5.0
    ping_interval_s: Seconds = 20.0
    ping_timeout_s: Seconds = 10.0
    close_timeout_s: Seconds = 2.0
    shutdown_timeout_s: Seconds = 10.0
    shutdown_close_code: Literal[1001, 1012] = 1001
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if self.ping_timeout_s > self.ping_interval_s:
            raise ValueError("ping_timeout_s must not exceed ping_interval_s")
        # A publish of max_payload_bytes must fit in a frame (else it would close with 1009
        # instead of getting err 7), and one message must fit in a subscriber's queue.
        envelope = self.max_payload_bytes + self.max_topic_length + _ENVELOPE_BYTES
        if envelope > self.max_frame_bytes:
            raise ValueError(
                f"max_frame_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})"
            )
        if envelope > self.max_outbound_frame_bytes:
            raise ValueError(
                f"max_outbound_frame_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})"
            )
        if self.max_total_pending_bytes < self.max_pending_bytes:
            raise ValueError("max_total_pending_bytes must be at least max_pending_bytes")
        if envelope > self.max_pending_bytes:
            raise ValueError(
                f"max_pending_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})"
            )


FIELDS: tuple[str, ...] = Config.__struct_fields__

HELP = {
    "host": "interface to listen on",
    "port": "TCP port to listen on (0 picks a free one)",
    "path": "URL path clients connect to",
    "max_frame_bytes": "largest WebSocket frame a client may send; larger ones close with 1009",
    "max_payload_bytes": "largest payload one publish may carry",
    "max_pending_bytes": "bytes queued for one connection that it may stay behind by; longer than slow_consumer_timeout_s, or 4 times as many at once, closes it as a slow consumer (1013)",
    "slow_consumer_timeout_s": "seconds a connection may stay more than max_pending_bytes behind before it is closed (1013)",
    "slow_consumer_policy": "what happens to a connection more than max_pending_bytes behind: disconnect (1013, after slow_consumer_timeout_s), drop (its oldest queued messages, with gap notices) or conflate (all but the newest message of each topic, marked); a subscription may choose its own",
    "max_outbound_frame_bytes": "largest WebSocket frame the broker sends; what a connection receives in one loop iteration is split into frames of at most this size",
    "max_batch_messages": "messages one client frame may carry",
    "max_subscriptions": "subscriptions one connection may hold",
    "max_topics": "concrete topics the broker keeps state for",
    "max_topic_length": "longest topic name or pattern, in characters",
    "history_max_messages": "messages kept per topic for recovery and last values (0: no history)",
    "history_max_bytes": "bytes of history kept per topic (payloads plus 48 bytes per message)",
    "history_max_age_s": "seconds a message is kept in history",
    "history_max_total_bytes": "bytes of history kept over all topics; past it the oldest messages go first",
    "dedupe_window_s": "seconds a publish's msg_id is remembered: a repeat within them is acknowledged, not published again",
    "dedupe_max_ids": "msg_ids remembered at most (the oldest are forgotten first)",
    "max_open_requests": "requests one connection may have waiting for replies",
    "topic_idle_s": "seconds a topic with no subscribers, no history and no publishes is kept before it is forgotten (its name then starts a new epoch)",
    "dead_letters_max": "client messages the broker could not process that it keeps (the newest), for `broker dead-letters`",
    "dead_letter_file": "where the kept dead letters are written, at most once a second, as JSON lines ('': broker-dead-letters-PORT.jsonl in the system's temporary directory)",
    "max_total_pending_bytes": "bytes queued for all connections together; past it the broker stops reading from publishers until the total is below three quarters of it",
    "handshake_timeout_s": "seconds a client has to complete the WebSocket handshake",
    "ping_interval_s": "seconds of silence before the server pings a client",
    "ping_timeout_s": "seconds a client has to answer a ping before it is disconnected",
    "close_timeout_s": "seconds a closing connection gets to flush before it is aborted",
    "shutdown_timeout_s": "seconds graceful shutdown waits for clients before aborting them",
    "shutdown_close_code": "1001 (going away: 'server shutting down') or 1012 (service restart: 'server restarting'), the close code clients get at shutdown",
    "log_level": "debug, info, warning or error",
    "log_format": "text (key=value) or json",
}


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Merge every source and validate once. `flags` holds only the flags actually given."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        merged.update(_read_file(path))
    for name in FIELDS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            merged[name] = value
    if flags:
        merged.update({k: v for k, v in flags.items() if k in FIELDS})
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc)}") from exc


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    section = data.get("broker", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [broker] must be a table")
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return dict(section)


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # msgspec says "Expected `int`, got `str` - at `$.port`": lead with the setting's name.
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        return f"{where.rstrip('`')}: {message}"
    return text
