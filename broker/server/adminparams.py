"""The parameters of the admin API (broker.server.admin; the supervisor's,
broker.cluster.group_admin, reads them the same way): each checked, with a 400 naming it
otherwise; the messages of a server-side publish; the rows of /api/connections and the query
(filters, order, page) that selects them."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from ..errors import ErrorCode, RequestError
from ..messages import check_payload
from ..topics import is_pattern, matches, validate_pattern
from .adminguard import SHOWN


def publish_item(item, max_payload: int) -> tuple[str, bytes]:
    """The topic and payload of one message of /api/publish, or the RequestError a WebSocket
    publish of it would get."""
    if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
        raise RequestError(ErrorCode.BAD_MESSAGE, 'a message is {"topic": str, "data": base64} or {"topic": str, "text": str}')
    if "data" in item and isinstance(item["data"], str):
        try:
            payload = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(ErrorCode.BAD_MESSAGE, "data is not base64") from None
    elif "text" in item and isinstance(item["text"], str):
        payload = item["text"].encode()
    else:
        raise RequestError(ErrorCode.BAD_MESSAGE, 'a message carries "data" (base64) or "text"')
    check_payload(payload, max_payload)
    return item["topic"], payload


# The HTTP status of a refused single-message publish, by the error code of docs/protocol.md
# (400 for the others): what the client sent is wrong (400, 413), or the broker cannot take it
# now (503: its topics are at max_topics, or Redis did not take it in time).
PUBLISH_STATUS: dict[int, int] = {
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_TOPICS: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.FORBIDDEN: 403,
}


def publish_status(code: int) -> int:
    return PUBLISH_STATUS.get(code, 400)


MAX_USER_CHARS = 256  # a user name in a path of the API, at most


def user_param(request: web.Request) -> str:
    """The user a path of /api/users/ names (percent-decoded), or a 400."""
    user = request.match_info["user"]
    if not user or len(user) > MAX_USER_CHARS:
        raise web.HTTPBadRequest(reason=f"user: 1 to {MAX_USER_CHARS} characters")
    return user


async def subscription_body(request: web.Request) -> str:
    """The `subscription` of a body `{"subscription": PATTERN}` (a topic or pattern), or a 400."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"subscription"} or not isinstance(body["subscription"], str):
        raise web.HTTPBadRequest(reason='the body is {"subscription": "TOPIC OR PATTERN"}')
    try:
        validate_pattern(body["subscription"], LONGEST_TOPIC)
    except RequestError as exc:
        raise web.HTTPBadRequest(reason=f"subscription: {exc.text}") from None
    return body["subscription"]


# The header in which the supervisor of workers passes on the address of the operator whose
# request it forwards (a worker's admin socket is reached by its supervisor only).
OPERATOR_HEADER = "Broker-Operator"


def operator_of(request: web.Request, forwarded: bool = False) -> str:
    """Who asked, for the log of operator actions: the address the request came from (the key
    is shared, so that is what tells operators apart); `forwarded` (a worker's admin socket):
    the address its supervisor got the request from."""
    if forwarded:
        return request.headers.get(OPERATOR_HEADER, "supervisor")[:SHOWN]
    return request.remote or ""


def connection_row(conn, now: float) -> dict:
    """What /api/connections says of one connection."""
    box, session = conn.box, conn.session
    return {
        "id": conn.id,
        "peer": conn.peer,
        "user": conn.user,
        "client": conn.client,
        "subscriptions": sorted(session.subscriptions) if session is not None else [],
        "queue_bytes": box.pending if box is not None else 0,
        "received": session.received if session is not None else 0,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "age_s": round(now - conn.opened_at, 3),
        "idle_s": round(now - conn.last_seen, 3),
    }


LONGEST_TOPIC = 4096  # the most max_topic_length may be: a longer filter matches nothing
# How /api/connections sorts (`sort=`): the row's field, and the default order (the largest
# first, but for the ids, in the order the connections came).
CONNECTION_SORTS = {
    "id": ("id", "asc"),
    "pending": ("queue_bytes", "desc"),
    "received": ("received", "desc"),
    "bytes_in": ("bytes_in", "desc"),
    "bytes_out": ("bytes_out", "desc"),
    "age": ("age_s", "desc"),
    "idle": ("idle_s", "desc"),
    "subscriptions": ("subscriptions", "desc"),
}


class ConnectionQuery:
    """The parameters of /api/connections (each checked, a 400 naming it otherwise), and the
    rule they make: which rows, in which order, which page. The supervisor of workers applies
    the same rule to the rows of all its workers."""

    def __init__(
        self,
        sort: str,
        order: str,
        offset: int,
        limit: int,
        user: str | None,
        peer: str | None,
        client: str | None,
        subscription: str | None,
    ) -> None:
        self.sort, self.order, self.offset, self.limit = sort, order, offset, limit
        self.user, self.peer, self.client, self.subscription = user, peer, client, subscription

    @classmethod
    def of(cls, request: web.Request) -> ConnectionQuery:
        q = request.query
        sort = q.get("sort", "id")
        if sort not in CONNECTION_SORTS:
            raise web.HTTPBadRequest(reason=f"sort is one of {', '.join(CONNECTION_SORTS)}")
        order = q.get("order", CONNECTION_SORTS[sort][1])
        if order not in ("asc", "desc"):
            raise web.HTTPBadRequest(reason="order is asc or desc")
        subscription = q.get("subscription")
        if subscription is not None:
            try:
                validate_pattern(subscription, LONGEST_TOPIC)
            except RequestError as exc:
                raise web.HTTPBadRequest(reason=f"subscription: {exc.text}") from None
        for name in ("user", "peer", "client"):
            if len(q.get(name, "")) > SHOWN * 4:
                raise web.HTTPBadRequest(reason=f"{name} is longer than {SHOWN * 4} characters")
        return cls(
            sort,
            order,
            int_param(q.get("offset", "0"), "offset", 0, 1 << 40),
            connections_limit(request),
            q.get("user"),
            q.get("peer"),
            q.get("client"),
            subscription,
        )

    def selects(self, row: dict) -> bool:
        """Whether a row passes the filters: `user` (exact), `peer` (the address, with or
        without its port), `client` (the name, or NAME/VERSION), `subscription` (the
        connection holds that subscription, or one that matches that topic)."""
        if self.user is not None and row["user"] != self.user:
            return False
        if self.peer is not None and row["peer"] != self.peer and row["peer"].rpartition(":")[0].strip("[]") != self.peer.strip("[]"):
            return False
        if self.client is not None:
            client = row["client"] or ""
            if client != self.client and client.partition("/")[0] != self.client:
                return False
        if self.subscription is not None:
            held = row["subscriptions"]
            if self.subscription not in held and (is_pattern(self.subscription) or not any(matches(p, self.subscription) for p in held)):
                return False
        return True

    def key(self, row: dict):
        field = CONNECTION_SORTS[self.sort][0]
        value = row[field]
        return (len(value) if field == "subscriptions" else value, row["id"])

    def page(self, rows: list[dict]) -> list[dict]:
        """`rows` in order, the page of them asked for."""
        ordered = sorted(rows, key=self.key, reverse=self.order == "desc")
        return ordered[self.offset : self.offset + self.limit]


def topics_limit(request: web.Request) -> int:
    """The `limit` of /api/topics: 1 to 100,000, default 100."""
    return int_param(request.query.get("limit", "100"), "limit", 1, 100_000)


MAX_CONNECTIONS_LIMIT = 1_000_000


def connections_limit(request: web.Request) -> int:
    """The `limit` of /api/connections: 1 to 1,000,000, default 1,000."""
    return int_param(request.query.get("limit", "1000"), "limit", 1, MAX_CONNECTIONS_LIMIT)


def int_param(text: str, name: str, low: int, high: int) -> int:
    """A query or path parameter as an integer within [low, high], or a 400 naming it."""
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} is not an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be within {low} and {high}")
    return value
