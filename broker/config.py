"""Server settings: defaults < TOML file < environment (BROKER_*) < command-line flags.

Only values that were explicitly given are merged; the result is validated once by msgspec and
any problem comes back as a ConfigError that names the setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .errors import ConfigError

DEFAULT_PORT = 7341
ENV_PREFIX = "BROKER_"

_ENVELOPE_BYTES = 64  # MessagePack and WebSocket framing around one payload and its topic

Positive = Annotated[int, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]

# A setting is described once, in its field's metadata (msgspec.Meta's description, which
# msgspec.json.schema shows too): HELP (the flags' help), the config file tables (SECTIONS) and
# docs/operations.md's settings table are made from it. The metadata is read once, at import;
# validating a Config never looks at it.
TABLE_KEY = "table"  # Meta.extra key: the config file table a setting stands in under its full name


def about(text: str) -> msgspec.Meta:
    """The description of the setting whose type it annotates."""
    return msgspec.Meta(description=text)


def limit(text: str) -> msgspec.Meta:
    """The description of a setting that may also stand in the config file's [limits] table
    (under its full name)."""
    return msgspec.Meta(description=text, extra={TABLE_KEY: "limits"})


def comma_list(text: str) -> tuple[str, ...]:
    """The items of a comma-separated setting, stripped, empty ones left out."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def origin_key(origin: str) -> str:
    """An Origin as allowed_origins lists it and a request sends it, compared: stripped,
    without a final slash, in lower case."""
    return origin.strip().rstrip("/").lower()


def host_key(name: str) -> str:
    """A host name as admin_allowed_hosts lists it and a Host header names it, compared:
    stripped, in lower case, without a final dot."""
    return name.strip().lower().rstrip(".")


# dict=True: the settings that are lists are parsed once, by __post_init__, into attributes
# beside the fields (origins, token_sources, admin_host_names); the fields keep the text given.
# (The ignore: where mypy cannot import msgspec, Struct is Any and its class keywords are
# checked against object's __init_subclass__; where it can, msgspec's stubs accept them.)
class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, dict=True):  # type: ignore[call-arg, unused-ignore]
    host: Annotated[str, about("interface to listen on")] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535), about("TCP port to listen on (0 picks a free one)")] = DEFAULT_PORT
    path: Annotated[str, about("URL path clients connect to")] = "/"
    node_name: Annotated[
        str,
        about(
            "this broker's name in the dashboard, the cluster view and the start line ('': HOST:PORT, the machine's host name and the WebSocket port)"
        ),
    ] = ""
    max_frame_bytes: Annotated[Positive, limit("largest WebSocket frame a client may send; larger ones close with 1009")] = 1 << 20
    max_payload_bytes: Annotated[Positive, limit("largest payload one publish may carry")] = 512 << 10
    max_pending_bytes: Annotated[
        Positive,
        limit(
            "bytes queued for one connection that it may stay behind by; longer than slow_consumer_timeout_s, or 4 times as many at once, closes it as a slow consumer (1013)"
        ),
    ] = 8 << 20
    slow_consumer_timeout_s: Annotated[
        Seconds, about("seconds a connection may stay more than max_pending_bytes behind before it is closed (1013)")
    ] = 2.0
    slow_consumer_policy: Annotated[
        Literal["disconnect", "drop", "conflate"],
        about(
            "what happens to a connection more than max_pending_bytes behind: disconnect (1013, after slow_consumer_timeout_s), drop (its oldest queued messages, with gap notices) or conflate (all but the newest message of each topic, marked); a subscription may choose its own"
        ),
    ] = "disconnect"
    max_outbound_frame_bytes: Annotated[
        Positive,
        about(
            "largest WebSocket frame the broker sends; what a connection receives in one loop iteration is split into frames of at most this size"
        ),
    ] = 1 << 20
    max_batch_messages: Annotated[Positive, limit("messages one client frame may carry")] = 10_000
    max_subscriptions: Annotated[Positive, limit("subscriptions one connection may hold")] = 10_000
    max_patterns: Annotated[
        Positive,
        limit(
            "of them, subscriptions to patterns (with * or >); more are refused with err 8 (one topic may match every pattern of a connection, and each costs work when the topic is made and at every delivery)"
        ),
    ] = 100
    max_topics: Annotated[Positive, limit("concrete topics the broker keeps state for")] = 100_000
    max_topic_length: Annotated[int, msgspec.Meta(gt=0, le=4096), limit("longest topic name or pattern, in characters")] = 255
    history_max_messages: Annotated[
        int, msgspec.Meta(ge=0), about("messages kept per topic for recovery and last values (0: no history)")
    ] = 100
    history_max_bytes: Annotated[Positive, about("bytes of history kept per topic (payloads plus 48 bytes per message)")] = 1 << 20
    history_max_age_s: Annotated[Seconds, about("seconds a message is kept in history")] = 300.0
    history_max_total_bytes: Annotated[Positive, about("bytes of history kept over all topics; past it the oldest messages go first")] = (
        256 << 20
    )
    dedupe_window_s: Annotated[
        Seconds, about("seconds a publish's msg_id is remembered: a repeat within them is acknowledged, not published again")
    ] = 120.0
    dedupe_max_ids: Annotated[Positive, about("msg_ids remembered at most (the oldest are forgotten first)")] = 100_000
    max_open_requests: Annotated[Positive, limit("requests one connection may have waiting for replies")] = 1000
    max_total_pending_bytes: Annotated[
        Positive,
        about(
            "bytes queued for all connections together; past it the broker stops reading from publishers until the total is below three quarters of it"
        ),
    ] = 1 << 30
    dead_letters_max: Annotated[
        Positive, about("client messages the broker could not process that it keeps (the newest), for `broker dead-letters`")
    ] = 1000
    topic_idle_s: Annotated[
        Seconds,
        about(
            "seconds a topic with no subscribers and no publishes is kept before it is forgotten, once its history expired too (its name then starts a new epoch)"
        ),
    ] = 300.0
    dead_letter_file: Annotated[
        str,
        about(
            "where the kept dead letters are written, at most once a second, as JSON lines ('': broker-dead-letters-PORT.jsonl in the system's temporary directory)"
        ),
    ] = ""
    handshake_timeout_s: Annotated[Seconds, limit("seconds a client has to complete the WebSocket handshake")] = 5.0
    ping_interval_s: Annotated[Seconds, about("seconds of silence before the server pings a client")] = 20.0
    ping_timeout_s: Annotated[Seconds, about("seconds a client has to answer a ping before it is disconnected")] = 10.0
    close_timeout_s: Annotated[Seconds, about("seconds a closing connection gets to flush before it is aborted")] = 2.0
    shutdown_timeout_s: Annotated[Seconds, about("seconds graceful shutdown waits for clients before aborting them")] = 10.0
    shutdown_close_code: Annotated[
        Literal[1001, 1012],
        about(
            "1001 (going away: 'server shutting down') or 1012 (service restart: 'server restarting'), the close code clients get at shutdown"
        ),
    ] = 1001
    lame_duck_duration_s: Annotated[
        Seconds,
        about(
            "lame-duck mode (SIGUSR2): seconds over which the clients are told to move to another node (close 4010), spread evenly, before the broker stops"
        ),
    ] = 30.0
    lame_duck_grace_s: Annotated[
        float,
        msgspec.Meta(ge=0),
        about(
            "lame-duck mode (SIGUSR2): seconds between refusing new clients (and /readyz answering 503) and telling the first ones to move, for load balancers to notice"
        ),
    ] = 5.0
    log_level: Annotated[Literal["debug", "info", "warning", "error"], about("debug, info, warning or error")] = "info"
    log_format: Annotated[Literal["text", "json"], about("text (key=value) or json")] = "text"
    # [tls]
    tls_cert_file: Annotated[
        str, about("PEM file with the server certificate (and its chain): with it the broker serves wss:// only; reloaded on SIGHUP")
    ] = ""
    tls_key_file: Annotated[str, about("PEM file with the certificate's private key (default: in tls_cert_file)")] = ""
    # [auth]
    auth_jwt_secret: Annotated[
        str,
        about(
            "HS256 secret of the JWTs clients present, at least 32 bytes; setting any key turns authentication on (a secret: prefer auth_jwt_secret_file, flags are visible to every user)"
        ),
    ] = ""
    auth_jwt_secret_file: Annotated[
        str, about("file holding auth_jwt_secret (its content, without a final line break), instead of the setting")
    ] = ""
    auth_jwt_public_key_file: Annotated[str, about("PEM public key (RSA for RS256, EC P-256 for ES256) of the JWTs clients present")] = ""
    auth_jwks_file: Annotated[str, about("JWKS file of the keys JWTs may be signed with (picked by kid), read again when it changes")] = ""
    auth_audience: Annotated[str, about("the aud a token must name ('': aud not checked)")] = ""
    auth_issuer: Annotated[str, about("the iss a token must carry ('': iss not checked)")] = ""
    auth_leeway_s: Annotated[float, msgspec.Meta(ge=0), about("seconds of clock skew allowed for exp, nbf and iat")] = 30.0
    auth_token_sources: Annotated[
        str,
        about(
            "where a token is taken from, in order: any of header (Authorization: Bearer), subprotocol (a Sec-WebSocket-Protocol entry bearer.TOKEN), query (the URL's query parameter auth_query_param)"
        ),
    ] = "header,subprotocol"
    auth_query_param: Annotated[str, about("the query parameter holding a token when auth_token_sources has query")] = "token"
    auth_anonymous: Annotated[bool, about("with authentication on, let clients without a token in with the anonymous grants")] = False
    auth_anonymous_subscribe: Annotated[str, about("comma-separated patterns a client without a token may subscribe to")] = ""
    auth_anonymous_publish: Annotated[str, about("comma-separated patterns a client without a token may publish to")] = ""
    auth_denylist_file: Annotated[
        str,
        about(
            "file of revocation rules, one per line: a token id (jti), user:NAME, user:NAME before:UNIX_TIME or before:UNIX_TIME; read again when it changes and on SIGHUP, applied to open connections; the admin API appends to it"
        ),
    ] = ""
    auth_user_claim: Annotated[str, about("the claim naming the user (per-user limits, logs)")] = "sub"
    auth_subscribe_claim: Annotated[str, about("the claim listing the patterns a token may subscribe to")] = "subscribe"
    auth_publish_claim: Annotated[str, about("the claim listing the patterns a token may publish and send requests to")] = "publish"
    auth_history_claim: Annotated[
        str, about("the claim listing the patterns whose history (since, last) a token may recover; without it, those it may subscribe to")
    ] = "history"
    auth_respond_claim: Annotated[
        str,
        about(
            "the claim listing the patterns whose requests a token may answer (sub with respond); without it, see auth_respond_follows_subscribe"
        ),
    ] = "respond"
    auth_respond_follows_subscribe: Annotated[
        bool,
        about(
            "a token without the respond claim (and an anonymous client) may answer the requests of the topics it may subscribe to; false: of none"
        ),
    ] = True
    auth_max_token_bytes: Annotated[Positive, about("longest token accepted")] = 8192
    auth_message_rate: Annotated[
        float,
        msgspec.Meta(ge=0),
        about(
            "auth messages per second one connection may send, authenticated or not (0: no limit); past its burst they are refused with err 15, their token unchecked"
        ),
    ] = 1.0
    auth_message_burst: Annotated[
        float, msgspec.Meta(ge=0), about("auth messages one connection may send at once above auth_message_rate")
    ] = 10.0
    # [limits] (with the limits above)
    max_connections: Annotated[
        Positive, limit("connections the broker holds at once, counted from their TCP accept; more are refused with 503")
    ] = 10_000
    max_connections_per_ip: Annotated[
        Positive, limit("connections from one IP address at once, counted from their TCP accept; more are refused with 429")
    ] = 1000
    max_connections_per_user: Annotated[Positive, limit("connections of one user (auth_user_claim) at once; more are refused with 429")] = (
        100
    )
    max_handshakes: Annotated[
        Positive, limit("connections in their handshake (accepted, upgrade not yet done, TLS included) at once; more are refused with 503")
    ] = 1000
    max_handshakes_per_ip: Annotated[
        Positive, limit("connections from one IP address in their handshake at once; more are refused with 429")
    ] = 100
    allowed_origins: Annotated[
        str,
        limit(
            "comma-separated Origin values a browser may connect from ('': any; requests without Origin are not browsers and are let in)"
        ),
    ] = ""
    http_fallback: Annotated[
        bool,
        limit(
            "serve the fallback transport (an event stream plus POSTs, on the same port and path) to clients that cannot open a WebSocket"
        ),
    ] = True
    frame_timeout_s: Annotated[Seconds, limit("seconds a client has to complete a frame it started; slower ones are closed (1008)")] = 10.0
    publish_rate: Annotated[
        float,
        msgspec.Meta(ge=0),
        limit("messages per second one connection may publish (0: no limit); past its burst they are refused with err 15"),
    ] = 1_000_000.0
    publish_burst: Annotated[float, msgspec.Meta(ge=0), limit("messages one connection may publish at once above publish_rate")] = (
        1_000_000.0
    )
    user_publish_rate: Annotated[
        float, msgspec.Meta(ge=0), limit("messages per second all connections of one user may publish together (0: no limit)")
    ] = 0.0
    user_publish_burst: Annotated[float, msgspec.Meta(ge=0), limit("messages one user may publish at once above user_publish_rate")] = 0.0
    new_topic_rate: Annotated[
        float,
        msgspec.Meta(ge=0),
        limit("new topics per second one connection may create by publishing (0: no limit); past its burst refused with err 15"),
    ] = 1000.0
    new_topic_burst: Annotated[float, msgspec.Meta(ge=0), limit("new topics one connection may create at once above new_topic_rate")] = (
        10_000.0
    )
    ip_new_topic_rate: Annotated[
        float,
        msgspec.Meta(ge=0),
        limit(
            "new topics per second the connections from one IP address may create together (0: no limit); past its burst refused with err 15"
        ),
    ] = 1000.0
    ip_new_topic_burst: Annotated[
        float, msgspec.Meta(ge=0), limit("new topics the connections from one IP address may create at once above ip_new_topic_rate")
    ] = 10_000.0
    user_new_topic_rate: Annotated[
        float, msgspec.Meta(ge=0), limit("new topics per second the connections of one user may create together (0: no limit)")
    ] = 1000.0
    user_new_topic_burst: Annotated[
        float, msgspec.Meta(ge=0), limit("new topics one user may create at once above user_new_topic_rate")
    ] = 10_000.0
    rate_limit_close_after: Annotated[
        Positive, limit("messages refused for a rate limit, in a row within 10 s, after which the connection is closed (1008)")
    ] = 10_000
    # [redis] (the cluster backplane; none: the embedded single process)
    redis_url: Annotated[
        str,
        about(
            "Redis (or Redis Cluster, detected) joining broker nodes and worker processes: redis://[user:password@]host:port[/db], rediss:// for TLS ('': one embedded process, no Redis)"
        ),
    ] = ""
    redis_password_file: Annotated[
        str, about("file holding the Redis password (its content, without a final line break), so that redis_url need not hold it")
    ] = ""
    redis_shards: Annotated[
        int, msgspec.Meta(gt=0, le=1024), about("streams topics are hashed over; the same on every node of a cluster")
    ] = 16
    redis_prefix: Annotated[str, about("prefix of every Redis key; nodes with the same prefix form one cluster")] = "broker"
    redis_stream_maxlen: Annotated[
        Positive, about("entries (one per shard per publishing tick) each shard stream keeps, approximately (MAXLEN ~)")
    ] = 10_000
    redis_stream_max_age_s: Annotated[
        float, msgspec.Meta(ge=0), about("with a value above 0: trim the shard streams by age (MINID ~) instead of by length")
    ] = 0.0
    redis_timeout_s: Annotated[
        Seconds, about("seconds a Redis command may take, and publishes may wait for Redis, before they fail with err 18")
    ] = 5.0
    redis_max_buffer_bytes: Annotated[
        Positive, about("bytes of publishes held while Redis is slow or away; past it publishes are refused with err 18")
    ] = 64 << 20
    redis_min_replicas: Annotated[
        int,
        msgspec.Meta(ge=0, le=100),
        about(
            "above 0: acknowledge a publish only once its write reached this many Redis replicas (WAIT); one not confirmed within redis_timeout_s gets err 18 (it may be lost if its master fails)"
        ),
    ] = 0
    redis_read: Annotated[
        Literal["interest", "all"],
        about(
            "interest: read only the shard streams this node's subscriptions need (loading a shard's stream before the first subscription that needs it is answered); all: read every shard at all times"
        ),
    ] = "interest"
    redis_batch_ms: Annotated[
        float,
        msgspec.Meta(ge=0, le=1000),
        about(
            "a node writes to Redis (each shard of a Redis Cluster: each shard) and reads from it at most once per this many ms: what comes meanwhile goes in the next command (fewer commands, that much more latency; 0: a write per loop iteration)"
        ),
    ] = 15.0
    # [admin] (metrics and health over HTTP; off unless admin_port is set)
    admin_host: Annotated[str, about("interface the admin HTTP server (metrics, health) listens on")] = "127.0.0.1"
    admin_port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        about(
            "port of the admin HTTP server: /healthz, /readyz, and with admin_api_key /metrics (Prometheus), the dashboard and the JSON API (0: no admin server)"
        ),
    ] = 0
    admin_api_key: Annotated[
        str,
        about(
            "key everything on the admin port but /healthz and /readyz wants as Authorization: Bearer KEY: /metrics, the dashboard's data, the JSON API ('': only health answers) (a secret: prefer admin_api_key_file)"
        ),
    ] = ""
    admin_api_key_file: Annotated[
        str, about("file holding admin_api_key (its content, without a final line break), instead of the setting")
    ] = ""
    admin_allowed_hosts: Annotated[
        str,
        about(
            "comma-separated host names the admin server answers to in the Host header, besides IP addresses, localhost and admin_host ('*': any name); others get 403 (health excepted)"
        ),
    ] = ""
    # processes
    workers: Annotated[
        int,
        msgspec.Meta(gt=0, le=256),
        about(
            "processes serving the port together (SO_REUSEPORT), joined through redis_url, restarted when one dies or hangs; the supervisor serves admin_port for them all"
        ),
    ] = 1
    hang_timeout_s: Annotated[
        Seconds,
        about(
            "with workers > 1: seconds a worker may leave the supervisor's health probe (one a second) unanswered before it is killed and started again; a starting worker gets redis_timeout_s more to answer the first time"
        ),
    ] = 10.0
    reuse_port: Annotated[bool, about("listen with SO_REUSEPORT (set for worker processes; lets several processes share the port)")] = False

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if len(self.node_name) > 64 or not self.node_name.isprintable():
            raise ValueError("node_name is at most 64 printable characters")
        if self.ping_timeout_s > self.ping_interval_s:
            raise ValueError("ping_timeout_s must not exceed ping_interval_s")
        # A publish of max_payload_bytes must fit in a frame (else it would close with 1009
        # instead of getting err 7), and one message must fit in a subscriber's queue.
        envelope = self.max_payload_bytes + self.max_topic_length + _ENVELOPE_BYTES
        if envelope > self.max_frame_bytes:
            raise ValueError(f"max_frame_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})")
        if envelope > self.max_outbound_frame_bytes:
            raise ValueError(
                f"max_outbound_frame_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})"
            )
        # the lists, parsed once (the rules that use them read these)
        self.token_sources: tuple[str, ...] = comma_list(self.auth_token_sources)
        self.origins: frozenset[str] = frozenset(origin_key(o) for o in comma_list(self.allowed_origins))
        self.admin_host_names: frozenset[str] = frozenset(host_key(h) for h in comma_list(self.admin_allowed_hosts))
        if not self.token_sources or not set(self.token_sources) <= {"header", "subprotocol", "query"}:
            raise ValueError("auth_token_sources lists one or more of header, subprotocol, query")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file needs tls_cert_file")
        if self.max_total_pending_bytes < self.max_pending_bytes:
            raise ValueError("max_total_pending_bytes must be at least max_pending_bytes")
        if envelope > self.max_pending_bytes:
            raise ValueError(f"max_pending_bytes must be at least max_payload_bytes + max_topic_length + {_ENVELOPE_BYTES} ({envelope})")
        if self.workers > 1 and not self.redis_url:
            raise ValueError("workers > 1 needs redis_url: worker processes are joined through Redis (the embedded default is one process)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if not self.redis_prefix or "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ValueError("redis_prefix must be non-empty and without braces (it goes inside the keys' hash tags)")
        for name in SECRETS:
            if getattr(self, name) and getattr(self, name + "_file"):
                raise ValueError(f"set {name} or {name}_file, not both")
        if self.redis_password_file and url_password(self.redis_url):
            raise ValueError("redis_password_file is set and redis_url holds a password too: keep it in the file only")
        for rate in (
            "publish_rate",
            "user_publish_rate",
            "new_topic_rate",
            "ip_new_topic_rate",
            "user_new_topic_rate",
            "auth_message_rate",
        ):
            burst = rate[: -len("rate")] + "burst"
            if getattr(self, rate) and getattr(self, burst) < 1:
                raise ValueError(f"{burst} must be at least 1 when {rate} is set (it is {getattr(self, rate):g})")


FIELDS: tuple[str, ...] = Config.__struct_fields__

# Settings that are secrets. Each may be given as `NAME_FILE`, a file holding it, instead:
# command-line flags are visible to every user of the machine (/proc/PID/cmdline, `ps`), and
# the environment to the broker's user and root (/proc/PID/environ). The Redis password has
# `redis_password_file` (redis_url may then name the user, not the password).
SECRETS = ("auth_jwt_secret", "admin_api_key")
SECRET_FLAGS = (*SECRETS, "redis_url")  # settings whose value may hold a secret


def read_secret(config: Config, name: str) -> str:
    """The value of the secret setting `name` (or of redis_password): the setting, or the
    content of its `_file` setting (without a final line break). Raises ConfigError naming the
    setting when the file cannot be read or is empty."""
    path = config.redis_password_file if name == "redis_password" else getattr(config, name + "_file")
    if not path:
        return "" if name == "redis_password" else getattr(config, name)
    setting = name + "_file"
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid setting: {setting}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if not value:
        raise ConfigError(f"invalid setting: {setting}: {path} is empty")
    return value


def url_password(url: str) -> str:
    """The password a redis:// URL holds ('' when none)."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    return userinfo.partition(":")[2] if at else ""
