"""The HTTP side of the WebSocket handshake (RFC 6455 section 4), without I/O.

`parse_request` reads an upgrade request head; `Rules.check` applies every rule the server has
for a request (path, shutdown, version, subprotocol, Origin, the upgrade itself, the client's
identification, the token) in
the order docs/protocol.md 1.1 states (the limits on connections apply before, at accept, and
the limit per user after, in broker.limits); `accept_response` and `error_response` build the
bytes the server answers with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import parse_qs

from ..auth import Authenticator, AuthError, Identity
from ..config import origin_key
from ..errors import HandshakeError

__all__ = ["HandshakeError"]  # (defined with the other errors; raised and caught as handshake.HandshakeError)

# Longest request head the server reads before it refuses the request.
MAX_HEAD_BYTES = 16 << 10
# What a refusal quotes back of the request (its body is also the audit log's reason): never a
# header that may carry a secret (Authorization, a bearer subprotocol entry, the query string),
# and of the rest only short values, made printable.
SHOWN_CHARS = 100
SHOWN_PROTOCOL_CHARS = 20
SHOWN_PATH_CHARS = 32

# Every HTTP status an upgrade request may be refused with (here, by the limits of
# broker.limits: 429 and 503, and by the connection: 431, 500), for the metric of refusals.
# (the fallback transport's requests, protocol.md section 12, add 406, 408, 409, 411, 413 and 415)
REFUSAL_STATUSES = (400, 401, 403, 404, 405, 406, 408, 409, 411, 413, 415, 426, 429, 431, 500, 503)

# How a client says what it is (docs/protocol.md 1.1): `NAME/VERSION` in the Broker-Client
# header, or, for browsers (which cannot set headers on a WebSocket), in the query parameter
# `client`. Shown in the admin API's connections and in the connect log line.
CLIENT_HEADER = "broker-client"
CLIENT_QUERY = "client"
_CLIENT = re.compile(r"[A-Za-z0-9._-]{1,32}/[A-Za-z0-9._+-]{1,32}")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` as a refusal may quote it: at most `limit` characters, each one printable ASCII
    (others become `?`), cut with `...`."""
    text = "".join(c if " " <= c <= "~" else "?" for c in value[:limit])
    return text + "..." if len(value) > limit else text


def shown_protocols(offered: list[str]) -> str:
    """What a 400 says of the subprotocols a client offered: the short names, never an entry
    that may hold a token (`bearer.`, in any case, which is left out, or anything longer than
    a version name, which is counted)."""
    others = [p for p in offered if not p.lower().startswith("bearer.")]
    parts = [shown(p) for p in others if len(p) <= SHOWN_PROTOCOL_CHARS]
    hidden = len(others) - len(parts)
    if hidden:
        parts.append(f"{hidden} other entr{'y' if hidden == 1 else 'ies'} not shown")
    return ", ".join(parts) if parts else "a bearer token entry only"


class Request:
    """An upgrade request: its path (with the query string) and headers (names in lower case,
    every value of a repeated header kept in order)."""

    __slots__ = ("method", "path", "version", "headers")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, list[str]]) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers

    def header(self, name: str) -> str | None:
        """The value of a header that appears once or not at all (repeated ones are joined)."""
        values = self.headers.get(name)
        return None if values is None else ", ".join(values)

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every value of a header, stripped."""
        return [token.strip() for value in self.headers.get(name, ()) for token in value.split(",") if token.strip()]


def parse_request(head: bytes) -> Request:
    """Parse a request head (without its final blank line); raise HandshakeError(400) when it
    is not an HTTP/1.1 request."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(400, "the request is not an HTTP request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("HTTP/"):
        raise HandshakeError(400, "the request is not an HTTP request")
    method, path, version = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not _TOKEN_CHARS.issuperset(name):
            # the line is not quoted: it may be a header holding a secret, typed wrongly
            raise HandshakeError(400, f"malformed header line {len(headers) + 1}: a header is NAME: VALUE, with a token for its name")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return Request(method, path, version, headers)


def check_upgrade(request: Request) -> str:
    """Check what RFC 6455 requires of an upgrade request; returns Sec-WebSocket-Accept."""
    if request.method != "GET":
        raise HandshakeError(405, f"method {shown(request.method, 16)} is not allowed; a WebSocket upgrade is a GET", {"Allow": "GET"})
    if request.version != "HTTP/1.1":
        raise HandshakeError(400, f"{shown(request.version, 16)} is not supported; use HTTP/1.1")
    if "websocket" not in (t.lower() for t in request.tokens("upgrade")):
        raise HandshakeError(400, "missing 'Upgrade: websocket' header")
    if "upgrade" not in (t.lower() for t in request.tokens("connection")):
        raise HandshakeError(400, "missing 'Connection: Upgrade' header")
    version = request.header("sec-websocket-version")
    if version is None:
        raise HandshakeError(400, "missing Sec-WebSocket-Version header", {"Sec-WebSocket-Version": "13"})
    key = request.header("sec-websocket-key")
    if key is None:
        raise HandshakeError(400, "missing Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


class Accepted(NamedTuple):
    """An upgrade request the server accepts: the Sec-WebSocket-Accept value, who it is, and
    the client software it says it is (`NAME/VERSION`, None when it says nothing)."""

    accept: str
    identity: Identity
    client: str | None = None


def client_of(request: Request) -> str | None:
    """The `NAME/VERSION` a request says its client is (the Broker-Client header, else the
    query parameter `client`), None when it says nothing; raises HandshakeError(400) when
    it is not of that form."""
    value = request.header(CLIENT_HEADER)
    if value is None:
        values = parse_qs(request.path.partition("?")[2], keep_blank_values=True).get(CLIENT_QUERY)
        if not values:
            return None
        value = values[0]
    value = value.strip()
    if not _CLIENT.fullmatch(value):
        raise HandshakeError(
            400,
            f"the client identification {shown(value, 40)!r} is not NAME/VERSION (letters, digits, '.', '_', '-' "
            "and '+' in the version, 32 characters each at most; Broker-Client header or client query parameter)",
        )
    return value


class Rules:
    """The server's rules for upgrade requests. `origins`: the Origin values a browser may
    connect from (`allowed_origins`; empty: any; a request without Origin is not from a
    browser and passes)."""

    def __init__(self, path: str, subprotocol: str, authenticator: Authenticator, origins: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.subprotocol = subprotocol
        self.authenticator = authenticator
        self.origins = origins  # Config.origins: parsed once, in the form origin_key gives

    def check_path(self, request: Request, closing: bool = False) -> None:
        """The rules every request meets first, an upgrade or a fallback request: the path
        (404), then shutdown (503)."""
        path = request.path.partition("?")[0]
        if path != self.path:
            # a long path is not quoted: some clients put a key there
            at = shown(path) if len(path) <= SHOWN_PATH_CHARS else f"the path given ({len(path)} characters)"
            raise HandshakeError(404, f"no WebSocket endpoint at {at}; connect to {self.path}")
        if closing:
            raise HandshakeError(503, "server is shutting down")

    def check_origin(self, request: Request) -> str | None:
        """The Origin rule of the upgrade and of the fallback transport: the request's Origin
        (stripped; None: it sends none, it is not a browser), or HandshakeError 403 when a
        browser page of that origin may not connect (allowed_origins)."""
        origin = request.header("origin")
        if origin is None:
            return None
        origin = origin.strip()
        if self.origins and origin_key(origin) not in self.origins:
            raise HandshakeError(403, f"origin {shown(origin)} is not allowed (allowed_origins)", setting="allowed_origins")
        return origin

    def check(self, request: Request, closing: bool = False) -> Accepted:
        """Accept `request` or raise HandshakeError with the status and reason of the first
        rule it breaks."""
        self.check_path(request, closing)
        version = request.header("sec-websocket-version")
        if version is not None and version.strip() != "13":
            raise HandshakeError(426, f"unsupported WebSocket version {shown(version, 16)}; use 13", {"Sec-WebSocket-Version": "13"})
        offered = request.tokens("sec-websocket-protocol")
        if self.subprotocol not in offered:
            why = f"offered {shown_protocols(offered)}" if offered else "no Sec-WebSocket-Protocol header"
            raise HandshakeError(400, f"unsupported protocol version ({why}); this server speaks {self.subprotocol}")
        self.check_origin(request)
        accept = check_upgrade(request)
        client = client_of(request)
        try:
            identity = self.authenticator.identify(request.path, request.header("authorization"), offered)
        except AuthError as error:
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if error.status == 401 else {}
            raise HandshakeError(error.status, error.text, headers) from None
        return Accepted(accept, identity, client)


def accept_response(accept: str, subprotocol: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode("ascii")


def error_response(status: int, text: str, headers: dict[str, str] | None = None) -> bytes:
    body = (text + "\n").encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
